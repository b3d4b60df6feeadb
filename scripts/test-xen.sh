#!/usr/bin/env bash
# Real Xen: boot Debian's Xen 4.17 with a Linux PV dom0 under QEMU (TCG), start Debian's Xen
# 4.17.7 toolstack in dom0 (xenstored, xen-init-dom0, xenconsoled), run the real-Xen suite
# (tests_xen/: dom0 alone, and across domains with PV domUs it creates with xl; the scenario
# files included) and the benchmarks in dom0; fail if any test fails.
# Needs root (apt-get, debootstrap, apt-get download of the toolstack) the first time; the set-up
# is cached under $XENLAB (default ~/.cache/xengrant-xenlab). About 1.5 min of set-up once; a run
# takes minutes (docs/real-xen.md has the figures; everything runs under `timeout`).
# Results: $XENLAB/results/{pytest.txt,bench.md,console.log}.  See docs/real-xen.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "test-xen: needs root (or sudo) for the one-time set-up (apt-get, debootstrap)" >&2
  exit 1
fi
exec xenlab/run.sh "$@"
