#!/usr/bin/env bash
# The main job: two domains on the embedded hypervisor share, map, copy and unshare.
set -euo pipefail
. "$(dirname "$0")/_venv.sh"
exec .venv/bin/xengrant demo "$@"
