#!/usr/bin/env bash
# Create .venv from the pinned requirements (once; re-run is quick). Usage: source-free, idempotent.
#   bash scripts/setup.sh            runtime packages
#   bash scripts/setup.sh --dev      + test packages
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
stamp=".venv/.installed-$(cat requirements*.txt | sha1sum | cut -c1-12)-$(basename $req .txt)"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -r "$req"
  touch "$stamp"
fi
