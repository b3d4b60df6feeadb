#!/bin/bash
# Boot Xen 4.17 + a Linux PV dom0 under QEMU (TCG) and run PAYLOAD_DIR/run.sh as root in dom0.
# usage: boot.sh PAYLOAD_DIR [LOG] [TIMEOUT_S]
# Exit status: run.sh's; 125 if dom0 never reported; 126 if the initramfs could not be built.
# Everything dom0 prints, and Xen's own console, goes to LOG.
L=${XENLAB:-${XDG_CACHE_HOME:-$HOME/.cache}/xengrant-xenlab}; H=$(cd "$(dirname "$0")" && pwd)
P=${1:?usage: boot.sh PAYLOAD_DIR [LOG] [TIMEOUT_S]}; LOG=${2:-$L/harness.log}; TO=${3:-600}
[ -x "$P/run.sh" ] || { echo "no executable run.sh in $P" >&2; exit 126; }
"$H/build-initrd.sh" "$P" >/dev/null || exit 126
start=$(date +%s)
# -cpu max needs smap=0 for Xen under TCG (else dom0 dies at once in create_bounce_frame).
# spec-ctrl=eager-fpu: Xen saves and restores a vCPU's FPU/vector state at every switch. Its
# default on the CPU model -cpu max shows (AMD) is lazy switching through CR0.TS and #NM, and
# under QEMU's TCG a domU's AVX registers then came back wrong now and then: 64-byte runs of
# zeros or stale data in memcpy'd vchan streams (docs/real-xen.md; tests_xen/test_fpu_xen.py).
# XENLAB_XEN_EXTRA replaces it (XENLAB_XEN_EXTRA= boots with Xen's default, to see the fault).
XEN_EXTRA=${XENLAB_XEN_EXTRA-spec-ctrl=eager-fpu}
timeout "$TO" qemu-system-x86_64 \
  -machine q35,accel=tcg -cpu max -m 3G -smp 2 -nographic -no-reboot -nodefaults -serial stdio \
  -kernel "$L/xen" \
  -append "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=2 loglvl=all guest_loglvl=all noreboot smap=0 $XEN_EXTRA" \
  -initrd "$L/vmlinuz console=hvc0 earlyprintk=xen rdinit=/init quiet,$L/initrd.img" \
  > "$LOG" 2>&1 < /dev/null
echo "xenlab: qemu exit $?, $(( $(date +%s) - start )) s, log $LOG" >&2
rc=$(sed -n 's/.*HARNESS_RC=\([0-9]*\).*/\1/p' "$LOG" | tail -1)
exit "${rc:-125}"
