/* The C baseline of the cross-domain benchmark (benchmarks/bench_xen_domu.py): what xengrant.linux
 * does across domains, done with Debian's libxengnttab/libxengntshr and libxenevtchn.
 * Built static by xenlab/build-payload.sh (libxen-dev's .a files); one copy runs in dom0, one in
 * the domU (its agent starts it).
 *
 *   xgbench cycle  DOMID ITERS REF        share 1 page with DOMID + map DOMID's REF + write a byte
 *                                          + unmap + unshare, ITERS times: us per cycle
 *   xgbench batch  DOMID ITERS REF...     map DOMID's refs as one contiguous range + touch each page
 *                                          + unmap, ITERS times: us per batch
 *   xgbench evping DOMID N                bind an unbound port for DOMID, print it, wait for the
 *                                          peer's first event, then N notify/wait round trips: us each
 *   xgbench evpong DOMID PORT N           bind to DOMID's PORT, notify once, then answer N events
 *
 * Every wait is bounded (10 s per event): a peer that dies ends the run with an error, not a hang.
 * Output: one line "RESULT <name> <microseconds>" (or "PORT <n>" first for evping).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <xenevtchn.h>
#include <xengnttab.h>

#define die(...) do { int e_ = errno; fprintf(stderr, "xgbench: " __VA_ARGS__); \
    fprintf(stderr, " (errno %d %s)\n", e_, strerror(e_)); exit(1); } while (0)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* one event on xce within 10 s (the port is unmasked again), else exit */
static void wait_event(xenevtchn_handle *xce) {
    struct pollfd pfd = { .fd = xenevtchn_fd(xce), .events = POLLIN };
    if (poll(&pfd, 1, 10000) <= 0) die("no event in 10 s");
    xenevtchn_port_or_error_t p = xenevtchn_pending(xce);
    if (p < 0) die("xenevtchn_pending");
    xenevtchn_unmask(xce, p);
}

static void drain(xenevtchn_handle *xce) {
    struct pollfd pfd = { .fd = xenevtchn_fd(xce), .events = POLLIN };
    while (poll(&pfd, 1, 0) > 0) {
        xenevtchn_port_or_error_t p = xenevtchn_pending(xce);
        if (p < 0) return;
        xenevtchn_unmask(xce, p);
    }
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 4) die("usage: xgbench cycle|batch|evping|evpong DOMID ...");
    const char *mode = argv[1];
    uint32_t dom = (uint32_t)strtoul(argv[2], NULL, 0);
    if (!strcmp(mode, "cycle") || !strcmp(mode, "batch")) {
        int iters = atoi(argv[3]);
        int n = argc - 4;
        if (n < 1 || n > 4096) die("give 1..4096 refs");
        uint32_t *refs = calloc(n, sizeof *refs);
        for (int i = 0; i < n; i++) refs[i] = (uint32_t)strtoul(argv[4 + i], NULL, 0);
        xengnttab_handle *xgt = xengnttab_open(NULL, 0);
        xengntshr_handle *xgs = xengntshr_open(NULL, 0);
        if (!xgt || !xgs) die("xengnttab_open/xengntshr_open");
        double t = now();
        for (int it = 0; it < iters; it++) {
            if (!strcmp(mode, "cycle")) {
                uint32_t mine;
                void *s = xengntshr_share_pages(xgs, dom, 1, &mine, 1);
                if (!s) die("xengntshr_share_pages");
                volatile char *m = xengnttab_map_grant_ref(xgt, dom, refs[0],
                                                           PROT_READ | PROT_WRITE);
                if (!m) die("xengnttab_map_grant_ref d%u ref %u", dom, refs[0]);
                m[0] = 'C';
                xengnttab_unmap(xgt, (void *)m, 1);
                xengntshr_unshare(xgs, s, 1);
            } else {
                volatile char *m = xengnttab_map_domain_grant_refs(xgt, n, dom, refs,
                                                                   PROT_READ | PROT_WRITE);
                if (!m) die("xengnttab_map_domain_grant_refs of %d", n);
                for (int i = 0; i < n; i++) m[i * 4096L] = 'C';
                xengnttab_unmap(xgt, (void *)m, n);
            }
        }
        printf("RESULT %s %.1f\n", mode, (now() - t) / iters * 1e6);
        return 0;
    }
    xenevtchn_handle *xce = xenevtchn_open(NULL, 0);
    if (!xce) die("xenevtchn_open");
    if (!strcmp(mode, "evping")) {
        int n = atoi(argv[3]);
        xenevtchn_port_or_error_t p = xenevtchn_bind_unbound_port(xce, dom);
        if (p < 0) die("xenevtchn_bind_unbound_port");
        printf("PORT %d\n", p);
        wait_event(xce);                          /* the peer bound and said go */
        double t = now();
        for (int i = 0; i < n; i++) {
            xenevtchn_notify(xce, p);
            wait_event(xce);
        }
        printf("RESULT evping %.1f\n", (now() - t) / n * 1e6);
        return 0;
    }
    if (!strcmp(mode, "evpong") && argc >= 5) {
        uint32_t remote = (uint32_t)strtoul(argv[3], NULL, 0);
        int n = atoi(argv[4]);
        xenevtchn_port_or_error_t p = xenevtchn_bind_interdomain(xce, dom, remote);
        if (p < 0) die("xenevtchn_bind_interdomain d%u port %u", dom, remote);
        drain(xce);                               /* Xen marks a new interdomain port pending */
        xenevtchn_notify(xce, p);                 /* go */
        for (int i = 0; i < n; i++) {
            wait_event(xce);
            xenevtchn_notify(xce, p);
        }
        printf("RESULT evpong 0\n");
        return 0;
    }
    die("unknown mode %s", mode);
}
