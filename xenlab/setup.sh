#!/bin/bash
# One-time preparation of the real-Xen harness (idempotent; needs root and Debian bookworm apt
# sources). About 1 min and 400 MB the first time; a few seconds when everything is cached.
# Produces under $XENLAB (default ~/.cache/xengrant-xenlab):
#   xen        Debian's Xen 4.17 hypervisor, gunzipped (QEMU's multiboot loader wants the ELF32)
#   vmlinuz    Debian's bookworm kernel, booted as a PV dom0
#   ex/linux/lib/modules/KV/kernel/drivers/xen   the Xen driver modules (gntdev, gntalloc, ...)
#   ex/bb      busybox-static (init, insmod, poweroff)
#   rootfs/    bookworm minbase + python3 (3.11) + pytest + libxengnttab1 (the C grant library)
#   toolstack/ Debian's Xen 4.17 toolstack (xl, xenstored, xen-init-dom0, xenconsoled and their
#              libraries), unpacked with dpkg-deb -x (no maintainer scripts), added to dom0's rootfs
# On the host: qemu-system-x86, gcc, libpython3.11-dev (dom0's _cext) and libxen-dev (the C
# benchmark, linked statically against libxengnttab/libxenevtchn).
set -euo pipefail
L=${XENLAB:-${XDG_CACHE_HOME:-$HOME/.cache}/xengrant-xenlab}
mkdir -p "$L/debs" && cd "$L"
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
# The toolstack, version 4.17.7 from bookworm(-security) as the hypervisor: dom0 runs xenstored,
# xen-init-dom0, xenconsoled and xl from it to create PV domUs.
TOOLSTACK="xen-utils-4.17 xen-utils-common xenstore-utils libxenmisc4.17 libxencall1 libxenevtchn1
  libxenforeignmemory1 libxengnttab1 libxenstore4 libxentoollog1 libxentoolcore1 libxendevicemodel1
  libxenhypfs1 libyajl2"
toolstack() {
  [ -x "$L/toolstack/usr/lib/xen-4.17/bin/xl" ] && return 0
  mkdir -p "$L/debs/toolstack" && rm -rf "$L/toolstack.new"
  # shellcheck disable=SC2086
  (cd "$L/debs/toolstack" && apt-get download -q $TOOLSTACK >/dev/null 2>&1) \
    || { $SUDO apt-get update -qq && (cd "$L/debs/toolstack" && apt-get download -q $TOOLSTACK >/dev/null); }
  for d in "$L"/debs/toolstack/*.deb; do dpkg-deb -x "$d" "$L/toolstack.new"; done
  rm -rf "$L/toolstack" && mv "$L/toolstack.new" "$L/toolstack"
  echo "xenlab: toolstack unpacked in $L/toolstack"
}
if [ -f "$L/.setup-done" ] && [ -x "$L/rootfs/usr/bin/python3" ] && [ -f "$L/xen" ] \
   && [ -f "$L/vmlinuz" ] && command -v qemu-system-x86_64 >/dev/null \
   && [ -f /usr/include/python3.11/Python.h ] && command -v cc >/dev/null \
   && [ -f /usr/lib/x86_64-linux-gnu/libxengnttab.a ]; then
  toolstack
  echo "xenlab: already set up in $L (kernel $(cat "$L/kernel-version"))"
  exit 0
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  qemu-system-x86 debootstrap cpio gzip gcc libpython3.11-dev libxen-dev >/dev/null
KV=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: linux-image-\([0-9].*\)/\1/p' | head -1)
echo "$KV" > "$L/kernel-version"
cd debs
ls xen-hypervisor-4.17-amd64_*.deb >/dev/null 2>&1 || apt-get download xen-hypervisor-4.17-amd64
ls linux-image-"${KV}"_*.deb >/dev/null 2>&1 || apt-get download linux-image-"$KV"
ls busybox-static_*.deb >/dev/null 2>&1 || apt-get download busybox-static
cd "$L"
mkdir -p ex/xen ex/linux ex/bb
dpkg-deb -x debs/xen-hypervisor-4.17-amd64_*.deb ex/xen
if [ ! -f "ex/linux/boot/vmlinuz-$KV" ]; then
  dpkg-deb -x debs/linux-image-"${KV}"_*.deb ex/linux
  # keep only the Xen driver modules (the rest is 300+ MB we never load)
  mv "ex/linux/lib/modules/$KV/kernel/drivers/xen" ex/xen-mods
  rm -rf "ex/linux/lib/modules/$KV/kernel" && mkdir -p "ex/linux/lib/modules/$KV/kernel/drivers"
  mv ex/xen-mods "ex/linux/lib/modules/$KV/kernel/drivers/xen"
fi
dpkg-deb -x debs/busybox-static_*.deb ex/bb
zcat ex/xen/boot/xen-4.17-amd64.gz > xen
cp "ex/linux/boot/vmlinuz-$KV" vmlinuz
# the Debian mirror apt uses on this machine
MIRROR=$(awk '/^URIs:/{print $2}' /etc/apt/sources.list.d/*.sources 2>/dev/null \
         | grep -v security | head -1 || true)
if [ ! -x rootfs/usr/bin/python3 ]; then
  rm -rf rootfs
  $SUDO debootstrap --variant=minbase --include=python3,python3-pytest,libxengnttab1 \
    bookworm rootfs $MIRROR
fi
toolstack
touch "$L/.setup-done"
echo "xenlab: setup done in $L (kernel $KV)"
