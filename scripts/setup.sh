#!/usr/bin/env bash
# Create .venv from the pinned requirements and install the fluxchat package into it (editable), once;
# a re-run is quick.
#   bash scripts/setup.sh            runtime packages
#   bash scripts/setup.sh --dev      + test packages (pytest, ruff, playwright)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
stamp=".venv/.installed-$(cat requirements*.txt pyproject.toml | sha1sum | cut -c1-12)-$(basename $req .txt)"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -r "$req"
  # The library the commands import; editable, so a change to fluxchat/ needs no re-install.
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
  touch "$stamp"
fi
