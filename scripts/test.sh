#!/usr/bin/env bash
# The test command: sets up .venv (pinned), the headless browser for the app test, then runs the suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
if [ -f tests/setup_browser.sh ]; then bash tests/setup_browser.sh; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
