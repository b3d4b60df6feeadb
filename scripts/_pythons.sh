# Sourced by test-pythons.sh, wheels.sh, test-wheels.sh: the Pythons xengrant claims, and where
# their interpreters are.
# CLAIMED: every version requires-python admits that CI tests (keep in step with pyproject.toml).
CLAIMED=(3.9 3.10 3.11 3.12 3.13)

# find_python 3.X -> the path of an interpreter of that version (pyenv's under $PYENV_ROOT,
# default /root/.pyenv, newest patch first; else python3.X on the PATH); fails if there is none.
find_python() {
  local v=$1 root=${PYENV_ROOT:-/root/.pyenv} p
  for p in $(ls -d "$root"/versions/"$v".*/bin/python 2>/dev/null | sort -V -r) \
           "$(command -v "python$v" || true)"; do
    if [ -n "$p" ] && [ -x "$p" ] \
       && [ "$("$p" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$v" ]; then
      echo "$p"; return 0
    fi
  done
  return 1
}

# need_pythons 3.X ... : fail, naming them, if any has no interpreter (a claimed version is never
# skipped silently).
need_pythons() {
  local v missing=()
  for v in "$@"; do find_python "$v" >/dev/null || missing+=("$v"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "no interpreter for Python ${missing[*]} (claimed by pyproject.toml's requires-python);" \
         "install it (e.g. pyenv install ${missing[0]}) -- not skipping it" >&2
    return 1
  fi
}
