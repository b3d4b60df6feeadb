#!/bin/bash
# Assemble the dom0 payload: xengrant (pure Python + a _cext built for CPython 3.11, dom0's
# Python), the real-Xen suite (tests_xen/), the scenario files, the benchmark, run.sh, and the
# PV domUs' boot files (domu/: build-domu.sh).
# usage: build-payload.sh OUT_DIR
# The extension is compiled here against Debian bookworm's python3.11 headers (libpython3.11-dev,
# the same ABI and glibc as dom0's bookworm python3.11); dom0 has no compiler.
set -euo pipefail
R=$(cd "$(dirname "$0")/.." && pwd); H=$R/xenlab
O=${1:?usage: build-payload.sh OUT_DIR}
rm -rf "$O" && mkdir -p "$O"
(cd "$R/src" && find xengrant -name '*.py' -o -name py.typed) | while read -r f; do
  mkdir -p "$O/$(dirname "$f")" && cp "$R/src/$f" "$O/$f"
done
INC=
for d in /usr/include/python3.11 \
         "$(python3.11 -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null)"; do
  [ -n "$d" ] && [ -f "$d/Python.h" ] && { INC=$d; break; }
done
[ -n "$INC" ] || { echo "build-payload: no Python 3.11 headers (apt-get install libpython3.11-dev)" >&2; exit 1; }
EXTRA=
[ -d /usr/include/x86_64-linux-gnu/python3.11 ] && EXTRA=-I/usr/include/x86_64-linux-gnu/python3.11
${CC:-cc} -O2 -std=c11 -fPIC -shared -Wall -Wno-missing-field-initializers -I"$INC" $EXTRA \
  "$R"/src/xengrant/*.c -o "$O/xengrant/_cext.cpython-311-x86_64-linux-gnu.so"
cp -r "$R/tests_xen" "$O/tests_xen"
# the portable suites tests_xen/test_portable_xen.py runs on real Xen (not collected on their own)
mkdir -p "$O/portable" && cp "$R"/tests/test_portable_evtchn.py "$R"/tests/test_portable_xenstore.py "$O/portable/"
# the examples that run on real Xen (tests_xen/test_examples_xen.py): real_xen.py in dom0, the
# split driver's backend in dom0 and its frontend in a domU
mkdir -p "$O/examples/split_driver" && cp "$R/examples/real_xen.py" "$O/examples/" \
  && cp "$R"/examples/split_driver/*.py "$O/examples/split_driver/"
mkdir -p "$O/scenarios" && cp "$R"/tests/scenarios/*.py "$R"/tests/scenarios/*.json "$O/scenarios/" 2>/dev/null || true
mkdir -p "$O/benchmarks" && cp "$R/benchmarks/bench_xen.py" "$R/benchmarks/bench_xen_domu.py" "$O/benchmarks/"
# the C baseline of the cross-domain benchmark: static, so neither dom0 nor the domU needs the libs
${CC:-cc} -O2 -static -Wall -o "$O/benchmarks/xgbench" "$R/benchmarks/xgbench.c" -lxengnttab \
  -lxenevtchn -lxentoolcore -lxentoollog -lpthread 2>&1 | grep -v 'statically linked' >&2 || true
cp "$H/payload-run.sh" "$O/run.sh" && chmod +x "$O/run.sh"
find "$O" -name __pycache__ -prune -exec rm -rf {} +
# the C side of the vchan interop tests (tests_xen/test_vchan_xen.py): Debian's libxenvchan, static
mkdir -p "$O/tests_xen/bin" && ${CC:-cc} -O2 -static -Wall -o "$O/tests_xen/bin/vchan_c_peer" \
  "$R/tests_xen/vchan_c_peer.c" -lxenvchan -lxenstore -lxengnttab -lxenevtchn -lxentoolcore \
  -lxentoollog -lpthread 2>&1 | grep -v 'statically linked' >&2 || true
# the vector-register check run in dom0 and a domU at once (tests_xen/test_fpu_xen.py)
${CC:-cc} -O2 -static -Wall -o "$O/tests_xen/bin/fpu_probe" "$R/tests_xen/fpu_probe.c" 2>&1 \
  | grep -v 'statically linked' >&2 || true
# the PV domUs' kernel and initramfs (python3.11 + xengrant + the agent), for tests_xen/domu.py
"$H/build-domu.sh" "$O/domu" "$O/xengrant" "$R/tests_xen/domu_agent.py" "$O/benchmarks/xgbench" \
  "$O/tests_xen/bin/vchan_c_peer" "$O/examples/split_driver" "$O/tests_xen/bin/fpu_probe"
