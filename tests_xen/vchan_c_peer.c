/* The C side of the vchan interop tests (tests_xen/test_vchan_xen.py): Debian's libxenvchan.
 *
 *   vchan_c_peer server DOMID PATH LEFT_MIN RIGHT_MIN send|recv|echo|ping TOTAL SEED
 *   vchan_c_peer client DOMID PATH send|recv|echo|ping TOTAL SEED
 *
 * send: TOTAL bytes of xorshift64 data (SEED) in chunks of random size 1..65536, then close.
 * recv: read until TOTAL bytes came (or the peer closed), then close.
 * psend, precv: the same with the stream's bytes encoding their own offset: the u64 at stream
 *   offset 8k is 8k | SEED << 48 (little-endian; chunks still of random sizes), so precv tells
 *   where a stream went wrong and what it read there: it prints "diag bad N first F last L" and
 *   up to 16 lines "run START END word HEX HEX" (a run of wrong bytes, fewer than 64 apart; the
 *   aligned words read at its first and last) before the "bytes" line; exits 3 when one was wrong.
 * echo: TOTAL times, receive one byte and send it back.
 * ping: TOTAL times, send one byte and receive it back; prints "us PER_ROUND_TRIP" too.
 * Prints "bytes N crc HEX" (zlib's CRC-32 of the bytes sent or received) and exits 0 when all
 * TOTAL bytes went through, 1 otherwise; send/recv also print "secs S" before it (the stream's
 * time from the first write or read to the last, set-up excluded).
 * A server prints "ready" once its xenstore nodes are written.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <libxenvchan.h>

static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint64_t rng;
static uint64_t tagw; /* SEED << 48: the pattern's tag */

static unsigned char pattern(uint64_t off) { return (unsigned char)(((off & ~7ull) | tagw) >> (8 * (off & 7))); }

static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

int main(int argc, char **argv)
{
    if (argc < 7) {
        fprintf(stderr, "usage: see the source\n");
        return 2;
    }
    int server = strcmp(argv[1], "server") == 0;
    int domid = atoi(argv[2]);
    const char *path = argv[3];
    int a = server ? 6 : 4;
    if (argc < a + 3)
        return 2;
    int pat = argv[a][0] == 'p' && argv[a][1] != 'i';
    int sending = strcmp(argv[a] + pat, "send") == 0;
    uint64_t total = strtoull(argv[a + 1], NULL, 0);
    rng = strtoull(argv[a + 2], NULL, 0) | 1;
    tagw = (strtoull(argv[a + 2], NULL, 0) & 0xFFFF) << 48;
    struct libxenvchan *v = server
        ? libxenvchan_server_init(NULL, domid, path, atoi(argv[4]), atoi(argv[5]))
        : libxenvchan_client_init(NULL, domid, path);
    if (!v) {
        perror("libxenvchan init");
        return 1;
    }
    v->blocking = 1;
    if (server) {
        printf("ready\n");
        fflush(stdout);
    }
    if (strcmp(argv[a], "echo") == 0 || strcmp(argv[a], "ping") == 0) {
        int ping = argv[a][0] == 'p';
        struct timespec t0, t1;
        unsigned char b = 0;
        uint64_t i;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (i = 0; i < total; i++) {
            if (ping) {
                b = (unsigned char)i;
                if (libxenvchan_send(v, &b, 1) != 1 || libxenvchan_recv(v, &b, 1) != 1 ||
                    b != (unsigned char)i)
                    break;
            } else if (libxenvchan_recv(v, &b, 1) != 1 || libxenvchan_send(v, &b, 1) != 1) {
                break;
            }
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double us = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / 1e3;
        printf("us %.1f\nbytes %llu crc 0\n", i ? us / (double)i : 0.0, (unsigned long long)i);
        fflush(stdout);
        libxenvchan_close(v);
        return i == total ? 0 : 1;
    }
    static unsigned char buf[65536];
    struct timespec s0, s1;
    clock_gettime(CLOCK_MONOTONIC, &s0);
    uint32_t crc = 0xFFFFFFFFu;
    uint64_t done = 0, bad = 0, first = 0, last = 0, run_start = 0, w_start = 0, w_last = 0;
    int runs = 0;
    crc_init();
    while (done < total) {
        size_t n;
        int r;
        if (sending) {
            n = 1 + next() % sizeof buf;
            if (n > total - done)
                n = total - done;
            for (size_t i = 0; i < n; i++)
                buf[i] = pat ? pattern(done + i) : (unsigned char)next();
            r = libxenvchan_write(v, buf, n);
        } else {
            n = sizeof buf;
            if (n > total - done)
                n = total - done;
            r = libxenvchan_read(v, buf, n);
        }
        if (r <= 0)
            break;
        for (int i = 0; i < r; i++)
            crc = crc_table[(crc ^ buf[i]) & 0xFF] ^ (crc >> 8);
        for (int i = 0; pat && !sending && i < r; i++) {
            uint64_t o = done + (uint64_t)i;
            if (buf[i] == pattern(o))
                continue;
            /* wrong bytes closer than 64 are one run (as domu_agent.PatternCheck) */
            if (bad && o - last >= 64 && runs++ < 16)
                printf("run %llu %llu word %016llx %016llx\n", (unsigned long long)run_start,
                       (unsigned long long)last + 1, (unsigned long long)w_start,
                       (unsigned long long)w_last);
            uint64_t w = 0;
            if ((o & ~7ull) >= done && (o & ~7ull) + 8 <= done + (uint64_t)r)
                memcpy(&w, buf + ((o & ~7ull) - done), 8);
            if (!bad || o - last >= 64) {
                run_start = o;
                w_start = w;
            }
            if (!bad++)
                first = o;
            last = o;
            w_last = w;
        }
        done += (uint64_t)r;
    }
    if (bad && runs++ < 16)
        printf("run %llu %llu word %016llx %016llx\n", (unsigned long long)run_start,
               (unsigned long long)last + 1, (unsigned long long)w_start,
               (unsigned long long)w_last);
    clock_gettime(CLOCK_MONOTONIC, &s1);
    printf("secs %.6f\n", (s1.tv_sec - s0.tv_sec) + (s1.tv_nsec - s0.tv_nsec) / 1e9);
    if (pat && !sending)
        printf("diag bad %llu first %llu last %llu\n", (unsigned long long)bad,
               (unsigned long long)first, (unsigned long long)last);
    printf("bytes %llu crc %08x\n", (unsigned long long)done, crc ^ 0xFFFFFFFFu);
    fflush(stdout);
    libxenvchan_close(v);
    return bad ? 3 : done == total ? 0 : 1;
}
