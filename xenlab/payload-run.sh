#!/bin/sh
# Runs in dom0 as /opt/payload/run.sh: the real-Xen suite, then the benchmark.
# Output sections are fenced by markers that xenlab/run.sh cuts out of the console log.
cd /opt/payload || exit 1
export PYTHONPATH=/opt/payload PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
PYTEST_ARGS=${XENGRANT_PYTEST_ARGS:-}
echo "@@@XENGRANT-PYTEST-BEGIN"
python3 -m pytest -p no:cacheprovider -v --color=no -rfEs -o console_output_style=classic tests_xen $PYTEST_ARGS 2>&1
rc=$?
echo "== dom0 kernel messages about grants (Linux prints deferrals only at debug level):"
dmesg | grep -iE 'g\.e\.|gntdev|gntalloc|grant' | grep -v 'Grant table' | tail -20
echo "@@@XENGRANT-PYTEST-END rc=$rc"
if [ -f benchmarks/bench_xen.py ] && [ -z "${XENGRANT_NO_BENCH:-}" ]; then
  echo "@@@XENGRANT-BENCH-BEGIN"
  python3 benchmarks/bench_xen.py 2>&1 || echo "benchmark failed: $?"
  echo "@@@XENGRANT-BENCH-END"
fi
exit $rc
