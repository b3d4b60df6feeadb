#!/usr/bin/env bash
# Install each wheel of wheelhouse/ (scripts/wheels.sh) into a clean venv of its Python with no
# compiler to be found (cc, gcc, ... on the PATH fail; CC=/bin/false; pip takes binaries only),
# then run the demo and the smoke test there, from outside the source tree.
# Usage: bash scripts/test-wheels.sh [3.X ...]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. scripts/_pythons.sh
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=("${CLAIMED[@]}")
need_pythons "${versions[@]}" || exit 1

work=$(mktemp -d /tmp/xengrant-wheeltest.XXXXXX)
trap 'rm -rf "$work"' EXIT
nocc=$work/nocc
mkdir -p "$nocc"
for c in cc gcc c++ g++ clang x86_64-linux-gnu-gcc aarch64-linux-gnu-gcc; do
  printf '#!/bin/sh\necho "no compiler here (scripts/test-wheels.sh)" >&2; exit 1\n' > "$nocc/$c"
  chmod +x "$nocc/$c"
done
for v in "${versions[@]}"; do
  py=$(find_python "$v")
  tag=cp${v/./}
  whl=$(ls wheelhouse/xengrant-*-"$tag"-"$tag"-manylinux*.whl 2>/dev/null | head -1)
  [ -n "$whl" ] || { echo "test-wheels: no manylinux wheel for Python $v (run scripts/wheels.sh)" >&2; exit 1; }
  echo "== $whl on Python $v"
  "$py" -m venv "$work/venv-$v"
  (
    cd "$work"
    export PATH="$nocc:$work/venv-$v/bin:$PATH" CC=/bin/false CXX=/bin/false
    ! cc --version >/dev/null 2>&1
    "$work/venv-$v/bin/python" -m pip install -q --disable-pip-version-check --no-index \
      --only-binary :all: "$ROOT/$whl"
    "$work/venv-$v/bin/python" -m xengrant --version
    "$work/venv-$v/bin/python" -m xengrant demo > "$work/demo-$v.txt"
    tail -1 "$work/demo-$v.txt"
    XENGRANT_SOCKET="$work/none.sock" "$work/venv-$v/bin/python" -m xengrant demo --processes \
      > "$work/demo-processes-$v.txt"
    tail -1 "$work/demo-processes-$v.txt"
    "$work/venv-$v/bin/python" -W error "$ROOT/tests/smoke/smoke.py"
  )
done
echo "test-wheels: the wheels installed without a compiler and ran on Python ${versions[*]}"
