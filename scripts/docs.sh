#!/usr/bin/env bash
# The API reference (docs/api/, Sphinx autodoc + napoleon over the docstrings) into
# docs/_build/html, warnings as errors: a docstring that does not render, a broken
# cross-reference or an object described twice fails the build.
# Usage: bash scripts/docs.sh   (sets up .venv-docs with the package and Sphinx)
set -euo pipefail
VENV=.venv-docs . "$(dirname "$0")/_venv.sh" docs
rm -rf docs/_build
.venv-docs/bin/sphinx-build -q -W --keep-going -b html docs/api docs/_build/html
echo "docs: the API reference is in docs/_build/html/index.html"
