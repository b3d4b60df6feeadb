#!/usr/bin/env bash
# The sdist (dist/xengrant-*.tar.gz, from scripts/wheels.sh) is complete: unpacked in a temporary
# directory and installed (not editable) with its test extra into a clean venv, its own tests run
# there -- conftest.py, helpers, scenario files, docs and examples all come from the sdist.
# Usage: bash scripts/test-sdist.sh [PYTEST-ARGS]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
sdist=$(ls dist/xengrant-*.tar.gz 2>/dev/null | head -1)
[ -n "$sdist" ] || { echo "test-sdist: no dist/xengrant-*.tar.gz (run scripts/wheels.sh)" >&2; exit 1; }
work=$(mktemp -d /tmp/xengrant-sdist.XXXXXX)
trap 'rm -rf "$work"' EXIT
tar xzf "$sdist" -C "$work"
tree=$(ls -d "$work"/xengrant-*/)
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$sdist[test]" pytest-xdist
cd "$tree"
rm -rf src  # the tests must import the installed package, not the unpacked sources
echo "== the sdist's tests ($sdist)"
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider -n "$(nproc 2>/dev/null || echo 2)" "$@"
