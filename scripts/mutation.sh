#!/usr/bin/env bash
# Mutation testing of the hypervisor core (src/xengrant/emu/) and the guest table
# (src/xengrant/guest/gnttab.py), with the C fast paths off (XENGRANT_FASTPATH=0).
# Not in CI: a full sample takes about half an hour on two cores.  Run it before
# resolving an issue that changes the rules; TESTING.md has the last figure.
#
#   bash scripts/mutation.sh                    # the recorded sample: 300 mutants, seed 20
#   bash scripts/mutation.sh --sample 40        # a quick look
#   bash scripts/mutation.sh --only entry.py    # one module (a regex over the paths)
#   bash scripts/mutation.sh --line src/xengrant/emu/entry.py:72   # every mutant of one line
#   bash scripts/mutation.sh --list             # the sample, run nothing
#
# It prints the score and every surviving mutant.  A survivor that changes
# nothing gets a comment at its line: "# mutation: equivalent — why".
set -euo pipefail
. "$(dirname "$0")/_venv.sh" test,mutation
exec nice -n "${NICE:-10}" .venv/bin/python scripts/mutation.py "$@"
