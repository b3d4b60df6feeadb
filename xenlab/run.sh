#!/bin/bash
# The project's real-Xen test run: set up (cached), build the payload, boot Xen 4.17 + a Linux PV
# dom0 under QEMU (TCG), run tests_xen/ and the benchmark in dom0, and bring the results back.
#
# usage: xenlab/run.sh [OUT_DIR]       (default: $XENLAB/results)
#   OUT_DIR/console.log   everything dom0 and Xen printed
#   OUT_DIR/pytest.txt    pytest's output in dom0
#   OUT_DIR/bench.md      the benchmark's table
# Exit status: pytest's in dom0 (0 = all passed); 125 if dom0 never reported; 126 build failure.
# Environment: XENLAB (cache dir), XENLAB_TIMEOUT (s, default 2700: the whole QEMU run),
# XENGRANT_PYTEST_TIMEOUT (s, default 1800: pytest in dom0), XENGRANT_NO_BENCH=1 to skip the
# benchmarks (XENGRANT_BENCH_DOMU_ONLY=1: only the cross-domain one), XENGRANT_PYTEST_ARGS to pass pytest a subset (-k ...),
# XENGRANT_DOM0_ENV='NAME=VALUE ...' exported for pytest in dom0 (e.g. XENGRANT_VCHAN_STRESS=20),
# XENLAB_XEN_EXTRA to replace Xen's extra boot options (boot.sh), XENLAB_SKIP_SETUP=1 to not
# run setup.sh.
set -uo pipefail
H=$(cd "$(dirname "$0")" && pwd)
export XENLAB=${XENLAB:-${XDG_CACHE_HOME:-$HOME/.cache}/xengrant-xenlab}
OUT=${1:-$XENLAB/results}
mkdir -p "$OUT"
if [ -z "${XENLAB_SKIP_SETUP:-}" ]; then
  "$H/setup.sh" || exit 126
fi
P=$XENLAB/payload
"$H/build-payload.sh" "$P" || exit 126
if [ -n "${XENGRANT_NO_BENCH:-}" ]; then rm -rf "$P/benchmarks"; fi
if [ -n "${XENGRANT_BENCH_DOMU_ONLY:-}" ]; then rm -f "$P/benchmarks/bench_xen.py"; fi
if [ -n "${XENGRANT_PYTEST_TIMEOUT:-}" ]; then
  sed -i "s|^PYTEST_TIMEOUT=.*|PYTEST_TIMEOUT=$XENGRANT_PYTEST_TIMEOUT|" "$P/run.sh"
fi
if [ -n "${XENGRANT_PYTEST_ARGS:-}" ]; then
  sed -i "s|^PYTEST_ARGS=.*|PYTEST_ARGS='$XENGRANT_PYTEST_ARGS'|" "$P/run.sh"
fi
if [ -n "${XENGRANT_DOM0_ENV:-}" ]; then   # e.g. 'XENGRANT_VCHAN_STRESS=20': exported in dom0
  sed -i "s|^PYTEST_ARGS=|export $XENGRANT_DOM0_ENV; PYTEST_ARGS=|" "$P/run.sh"
fi
"$H/boot.sh" "$P" "$OUT/console.log" "${XENLAB_TIMEOUT:-2700}"
rc=$?
# dom0's lines, without Xen's own console lines
section() { sed -n "/@@@XENGRANT-$1-BEGIN/,/@@@XENGRANT-$1-END/p" "$OUT/console.log" \
            | grep -v '^(XEN)' | grep -v '@@@XENGRANT-' | tr -d '\r'; }
section PYTEST > "$OUT/pytest.txt"
section BENCH > "$OUT/bench.md"
echo "==== pytest in dom0 (real Xen 4.17) ===="
cat "$OUT/pytest.txt"
if [ -s "$OUT/bench.md" ]; then echo "==== benchmark in dom0 ===="; cat "$OUT/bench.md"; fi
if [ "$rc" = 125 ]; then
  echo "xenlab: dom0 never reported; the end of $OUT/console.log:" >&2
  tail -40 "$OUT/console.log" >&2
fi
echo "xenlab: exit $rc (results in $OUT)"
exit "$rc"
