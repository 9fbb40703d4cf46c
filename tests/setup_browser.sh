#!/usr/bin/env bash
# Browser for tests/test_browser.py: Debian's chromium (Playwright's own browser download cannot reach
# its CDN here) and Playwright's Python client, which drives it through `executable_path`.
# Idempotent: a second run only checks and returns.
#     bash tests/setup_browser.sh            # uses .venv/bin/python, or $PYTHON
set -euo pipefail
cd "$(dirname "$0")/.."
PLAYWRIGHT_VERSION=$(sed -n 's/^playwright==//p' requirements-dev.txt)  # one pin, in requirements-dev.txt
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup_browser: installing Debian chromium (~1 min)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

if ! "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('playwright') != '$PLAYWRIGHT_VERSION')" 2>/dev/null; then
    echo "setup_browser: installing playwright==$PLAYWRIGHT_VERSION"
    "$PYTHON" -m pip install -q "playwright==$PLAYWRIGHT_VERSION"
fi
echo "setup_browser: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium ?'), playwright $PLAYWRIGHT_VERSION"
