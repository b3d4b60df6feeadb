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
# tests/test_xenstore_tools.py runs Debian's xenstore tools and libxenstore against the service.
if ! command -v xenstore-ls >/dev/null || [ ! -f /usr/include/xenstore.h ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xenstore-utils libxen-dev >/dev/null
  else
    echo "note: xenstore-utils / libxen-dev missing; the xenstore tool tests will skip" >&2
  fi
fi
echo "== ruff"; .venv/bin/ruff check src tests tests_xen benchmarks examples
echo "== mypy"; .venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
