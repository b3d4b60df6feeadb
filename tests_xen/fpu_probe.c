/* Does a process's vector register state survive its vCPU being switched out and back in?
 *
 *   fpu_probe avx|sse SECONDS TAG
 *
 * Loads four vector registers (ymm0-3 with VEX-encoded vmovdqu: what glibc's AVX2 memcpy
 * uses; or xmm0-3 with legacy SSE movdqu) with values made of TAG, spins a while touching no
 * vector register, stores them back and compares; again and again for SECONDS.  Prints
 * "mode M checks N lost L" and, for the first few losses, "lost at CHECK: HEX..." (the
 * registers' 16 u64s as stored: another process's TAG there means its state leaked in, zeros
 * mean the state was reset), and exits 1 when any check lost its values.
 *
 * Run in dom0 and a PV domU at once with different TAGs (tests_xen/test_fpu_xen.py): on Xen
 * 4.17 under QEMU 7.2 TCG with Xen's lazy FPU switching (the default on this AMD CPU model)
 * the domU's AVX registers come back wrong now and then -- the cause of the lab's vchan
 * corruption across domains (docs/real-xen.md).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: fpu_probe avx|sse SECONDS TAG\n");
        return 2;
    }
    int avx = strcmp(argv[1], "avx") == 0;
    double end = now() + atof(argv[2]);
    uint64_t tag = strtoull(argv[3], NULL, 0);
    uint64_t in[16] __attribute__((aligned(32))), out[16] __attribute__((aligned(32)));
    unsigned long checks = 0, lost = 0;
    int words = avx ? 16 : 8;
    while (now() < end) {
        for (int i = 0; i < 16; i++)
            in[i] = tag << 32 | (uint64_t)(checks & 0xFFFFFF) << 8 | (uint64_t)i;
        memset(out, 0, sizeof out);
        unsigned long spin = 200000;
        if (avx)
            __asm__ volatile("vmovdqu (%[in]), %%ymm0\n\tvmovdqu 32(%[in]), %%ymm1\n\t"
                             "vmovdqu 64(%[in]), %%ymm2\n\tvmovdqu 96(%[in]), %%ymm3\n\t"
                             "1: dec %[n]\n\tjnz 1b\n\t"
                             "vmovdqu %%ymm0, (%[out])\n\tvmovdqu %%ymm1, 32(%[out])\n\t"
                             "vmovdqu %%ymm2, 64(%[out])\n\tvmovdqu %%ymm3, 96(%[out])"
                             : [n] "+r"(spin)
                             : [in] "r"(in), [out] "r"(out)
                             : "memory", "xmm0", "xmm1", "xmm2", "xmm3");
        else
            __asm__ volatile("movdqu (%[in]), %%xmm0\n\tmovdqu 16(%[in]), %%xmm1\n\t"
                             "movdqu 32(%[in]), %%xmm2\n\tmovdqu 48(%[in]), %%xmm3\n\t"
                             "1: dec %[n]\n\tjnz 1b\n\t"
                             "movdqu %%xmm0, (%[out])\n\tmovdqu %%xmm1, 16(%[out])\n\t"
                             "movdqu %%xmm2, 32(%[out])\n\tmovdqu %%xmm3, 48(%[out])"
                             : [n] "+r"(spin)
                             : [in] "r"(in), [out] "r"(out)
                             : "memory", "xmm0", "xmm1", "xmm2", "xmm3");
        if (memcmp(in, out, (size_t)words * 8) != 0) {
            if (lost++ < 4) {
                printf("lost at %lu:", checks);
                for (int i = 0; i < words; i++)
                    printf(" %016llx", (unsigned long long)out[i]);
                printf("\n");
            }
        }
        checks++;
    }
    printf("mode %s checks %lu lost %lu\n", argv[1], checks, lost);
    fflush(stdout);
    return lost ? 1 : 0;
}
