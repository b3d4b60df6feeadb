#!/bin/bash
# Build the PV domUs' boot files: the dom0 kernel (booted PV again) and an initramfs with busybox,
# the Xen user-space drivers (xen-evtchn, xen-gntdev, xen-gntalloc), python3.11 with a trimmed
# standard library and its bytecode (imports in ~1.5 s under TCG instead of 5-8 s), xengrant
# (byte-compiled here) and the test agent (tests_xen/domu_agent.py), started by domu-init.sh.
# usage: build-domu.sh OUT_DIR XENGRANT_DIR AGENT.py [XGBENCH [VCHAN_C_PEER [SPLIT_DRIVER_DIR
#        [FPU_PROBE]]]]
#   -> OUT_DIR/{vmlinuz,initrd.img}
# XGBENCH: the static C benchmark program (benchmarks/xgbench.c), as /opt/xgbench.
# VCHAN_C_PEER: the static C libxenvchan peer (tests_xen/vchan_c_peer.c), as /opt/vchan_c_peer
# (libxenstore reaches xenstore through /dev/xen/xenbus in the domU).
# SPLIT_DRIVER_DIR: examples/split_driver, as /opt/split_driver (the agent runs its frontend).
# FPU_PROBE: the static vector-register check (tests_xen/fpu_probe.c), as /opt/fpu_probe.
set -euo pipefail
L=${XENLAB:-${XDG_CACHE_HOME:-$HOME/.cache}/xengrant-xenlab}; H=$(cd "$(dirname "$0")" && pwd)
O=${1:?usage: build-domu.sh OUT_DIR XENGRANT_DIR AGENT.py}; XG=${2:?}; AGENT=${3:?}
KV=$(cat "$L/kernel-version"); R=$L/rootfs
S=$(mktemp -d); trap 'rm -rf "$S"' EXIT
mkdir -p "$O" "$S"/{bin,proc,sys,dev,tmp,lib/modules/xen,usr/bin,usr/lib,lib64,lib/x86_64-linux-gnu,opt}
cp "$L/ex/bb/bin/busybox" "$S/bin/busybox"
for a in sh cat; do ln -s busybox "$S/bin/$a"; done
for m in xen-evtchn xen-gntdev xen-gntalloc; do
  cp "$(find "$L/ex/linux/lib/modules/$KV" -name "$m.ko")" "$S/lib/modules/xen/"
done
cp "$R/usr/bin/python3.11" "$S/usr/bin/" && ln -s python3.11 "$S/usr/bin/python3"
cp -L "$R/lib64/ld-linux-x86-64.so.2" "$S/lib64/"
for l in libc.so.6 libm.so.6 libz.so.1 libexpat.so.1 libffi.so.8; do
  cp -L "$R/lib/x86_64-linux-gnu/$l" "$S/lib/x86_64-linux-gnu/"
done
cp -a "$R/usr/lib/python3.11" "$S/usr/lib/"
rm -rf "$S"/usr/lib/python3.11/{test,idlelib,tkinter,ensurepip,lib2to3,pydoc_data,distutils,unittest,email,http,xmlrpc,sqlite3,curses,dbm,venv,wsgiref,turtledemo,config-3.11-x86_64-linux-gnu,site-packages,dist-packages} \
       "$S"/usr/lib/python3.11/lib-dynload/{_test*,_sqlite3*,_curses*,_dbm*,_ssl*,_hashlib*,_tkinter*,_codecs_*,readline*,nis*,ossaudiodev*,_xx*,xx*,audioop*}
cp -a "$XG" "$S/opt/xengrant"
find "$S/opt/xengrant" -name __pycache__ -prune -exec rm -rf {} +
# bytecode for the domU's CPython 3.11 (every 3.11.x shares the format); unchecked: no stat of sources
PYC=$(command -v python3.11 || true)
if [ -n "$PYC" ]; then
  "$PYC" -m compileall -q -j0 --invalidation-mode unchecked-hash "$S/opt/xengrant" >/dev/null
fi
cp "$AGENT" "$S/opt/agent.py"
[ -n "${4:-}" ] && [ -x "$4" ] && cp "$4" "$S/opt/xgbench"
[ -n "${5:-}" ] && [ -x "$5" ] && cp "$5" "$S/opt/vchan_c_peer"
if [ -n "${6:-}" ] && [ -d "$6" ]; then
  mkdir -p "$S/opt/split_driver" && cp "$6"/*.py "$S/opt/split_driver/"
  if [ -n "$PYC" ]; then
    "$PYC" -m compileall -q --invalidation-mode unchecked-hash "$S/opt/split_driver" >/dev/null
  fi
fi
[ -n "${7:-}" ] && [ -x "$7" ] && cp "$7" "$S/opt/fpu_probe"
cp "$H/domu-init.sh" "$S/init" && chmod +x "$S/init"
(cd "$S" && find . | cpio -o -H newc --quiet | gzip -1 > "$O/initrd.img")
cp "$L/vmlinuz" "$O/vmlinuz"
echo "xenlab: domU initramfs $(du -sh "$S" | cut -f1) unpacked, $(du -h "$O/initrd.img" | cut -f1)" >&2
