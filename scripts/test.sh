#!/usr/bin/env bash
# The whole test suite: lint, types, and pytest (C-header checks included).
set -euo pipefail
. "$(dirname "$0")/_venv.sh" test
# The ABI tests compile C against Xen's and Linux's real headers.
if [ ! -f /usr/include/xen/grant_table.h ] || [ ! -f /usr/include/xen/gntdev.h ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libxen-dev linux-libc-dev >/dev/null
  else
    echo "note: libxen-dev / linux-libc-dev headers missing; header tests will skip" >&2
  fi
fi
echo "== ruff"; .venv/bin/ruff check src tests tests_xen benchmarks examples
echo "== mypy"; .venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
