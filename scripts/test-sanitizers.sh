#!/usr/bin/env bash
# The C extension's tests under AddressSanitizer and UndefinedBehaviorSanitizer.
#
# _cext parses untrusted bytes (the service's GNTTAB_OP hot path) and writes
# into machine memory (the copy/map/unmap/grant runs), so an out-of-bounds
# access there would be a crash or a corrupted table, not an exception.  This
# builds a sanitized copy of the package in a temporary directory and runs the
# tests that drive every C path against its Python reference (differential,
# hypothesis) and the service's fuzz test with it.  Any report aborts the run.
#
# Usage: bash scripts/test-sanitizers.sh [PYTEST ARGS...]
set -euo pipefail
. "$(dirname "$0")/_venv.sh" test
CC=${CC:-cc}
asan=$("$CC" -print-file-name=libasan.so)
ubsan=$("$CC" -print-file-name=libubsan.so)
if [ ! -e "$asan" ] || [ ! -e "$ubsan" ]; then
  echo "test-sanitizers: $CC has no libasan/libubsan (install gcc)" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r src/xengrant "$tmp/xengrant"
rm -f "$tmp"/xengrant/_cext*.so
inc=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
suffix=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
"$CC" -shared -fPIC -O1 -g -std=c11 -fno-omit-frame-pointer \
  -fsanitize=address,undefined -fno-sanitize-recover=undefined \
  -I"$inc" src/xengrant/*.c -o "$tmp/xengrant/_cext$suffix"
# The sanitized copy comes first on sys.path; check that it is the one imported.
got=$(PYTHONPATH="$tmp" LD_PRELOAD="$asan:$ubsan" ASAN_OPTIONS=detect_leaks=0 \
  .venv/bin/python -c 'import xengrant._cext as c; print(c.__file__)')
case "$got" in
  "$tmp"/*) ;;
  *) echo "test-sanitizers: imported $got, not the sanitized build" >&2; exit 1 ;;
esac
# PYTHONMALLOC=malloc: every object in its own heap block, so ASan sees overruns
# of bytes/bytearray buffers too.  Leak checking is off: CPython keeps
# interned objects to the end on purpose.
export PYTHONPATH="$tmp" LD_PRELOAD="$asan:$ubsan" PYTHONMALLOC=malloc \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1
echo "== pytest (C paths under ASan + UBSan)"
# --capture=sys: a report goes to the real stderr, not to a capture lost in the abort
exec .venv/bin/python -m pytest -q -p no:cacheprovider --capture=sys \
  tests/test_fastpath.py tests/test_fastpath_copy.py tests/test_fastpath_map.py \
  tests/test_bulk_paths.py tests/test_service_fast.py tests/test_service_fuzz.py \
  tests/test_service_protocol.py tests/test_service_wait.py tests/test_service_calls.py tests/test_service_ring.py tests/test_ring_client_diff.py tests/test_abi.py tests/test_service_backing.py \
  tests/test_fidelity.py "$@"
