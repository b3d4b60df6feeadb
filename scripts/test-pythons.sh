#!/usr/bin/env bash
# The whole pytest suite on every Python that pyproject.toml claims (requires-python),
# each in its own venv (.venv-3.X), with pytest-xdist over the machine's cores.
# Usage: bash scripts/test-pythons.sh [3.X ...] [-- PYTEST-ARGS]
#   no versions: every claimed one (3.9 .. 3.13).
# Interpreters come from pyenv (/root/.pyenv/versions/3.X.*/bin/python, or $PYENV_ROOT), else
# python3.X on the PATH.  A claimed version with no interpreter is an error, never a skip.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. scripts/_pythons.sh
versions=()
while [ $# -gt 0 ]; do
  case $1 in
    --) shift; break ;;
    *) versions+=("$1"); shift ;;
  esac
done
[ ${#versions[@]} -gt 0 ] || versions=("${CLAIMED[@]}")
need_pythons "${versions[@]}" || exit 1

jobs=$(nproc 2>/dev/null || echo 2)
failed=()
for v in "${versions[@]}"; do
  py=$(find_python "$v")
  echo "== Python $v ($py)"
  ( PYTHON=$py VENV=.venv-$v . scripts/_venv.sh test
    ".venv-$v/bin/python" -m pip install -q --disable-pip-version-check pytest-xdist
    ".venv-$v/bin/python" -m pytest -q -p no:cacheprovider -n "$jobs" "$@" ) || failed+=("$v")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "test-pythons: FAILED on Python ${failed[*]}" >&2; exit 1
fi
echo "test-pythons: the suite passed on Python ${versions[*]}"
