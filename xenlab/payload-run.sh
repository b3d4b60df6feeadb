#!/bin/sh
# Runs in dom0 as /opt/payload/run.sh: start the toolstack's daemons (xenstored, the C one;
# xen-init-dom0; xenconsoled) so that tests can xl create PV domUs, then the real-Xen suite, then
# the benchmark. Output sections are fenced by markers that xenlab/run.sh cuts out of the console log.
cd /opt/payload || exit 1
export PYTHONPATH=/opt/payload:/opt/payload/tests_xen PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
PYTEST_ARGS=${XENGRANT_PYTEST_ARGS:-}
PYTEST_TIMEOUT=${XENGRANT_PYTEST_TIMEOUT:-1800}
X=/usr/lib/xen-4.17/bin
t() { echo "xenlab: T+$(cut -d' ' -f1 /proc/uptime) $*"; }
if [ -x $X/xenstored ]; then
  mkdir -p /var/run/xen /var/run/xenstored /var/lib/xenstored /var/log/xen/console /var/lib/xen/dump \
           /var/lock /run/lock
  t "starting xenstored"
  $X/xenstored --pid-file /var/run/xen/xenstored.pid || echo "xenlab: xenstored failed: $?"
  for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    [ -S /var/run/xenstored/socket ] && break; sleep 0.5
  done
  timeout 60 $X/xen-init-dom0 || echo "xenlab: xen-init-dom0 failed: $?"
  $X/xenconsoled --pid-file=/var/run/xen/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console \
    || echo "xenlab: xenconsoled failed: $?"
  t "toolstack up"
fi
echo "@@@XENGRANT-PYTEST-BEGIN"
eval "set -- $PYTEST_ARGS"   # XENGRANT_PYTEST_ARGS='-k "a or b"' keeps its quotes
# the whole suite, unless the arguments name files or tests of it themselves
WHAT=tests_xen
for a in "$@"; do case $a in tests_xen/*) WHAT= ;; esac; done
timeout "$PYTEST_TIMEOUT" python3 -m pytest -p no:cacheprovider -v --color=no -rfEs \
  -o console_output_style=classic --durations=15 $WHAT "$@" 2>&1
rc=$?
echo "== dom0 kernel messages about grants (Linux prints deferrals only at debug level):"
dmesg | grep -iE 'g\.e\.|gntdev|gntalloc|grant' | grep -v 'Grant table' | tail -20
[ -x $X/xl ] && { echo "== xl list at the end:"; timeout 30 $X/xl list; }
echo "@@@XENGRANT-PYTEST-END rc=$rc"
t "suite done"
if [ -d benchmarks ] && [ -z "${XENGRANT_NO_BENCH:-}" ]; then
  echo "@@@XENGRANT-BENCH-BEGIN"
  if [ -f benchmarks/bench_xen.py ]; then
    timeout 600 python3 benchmarks/bench_xen.py 2>&1 || echo "benchmark failed: $?"
    echo
  fi
  if [ -f benchmarks/bench_xen_domu.py ]; then
    timeout 600 python3 benchmarks/bench_xen_domu.py 2>&1 || echo "cross-domain benchmark failed: $?"
  fi
  echo "@@@XENGRANT-BENCH-END"
fi
exit $rc
