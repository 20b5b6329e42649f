#!/usr/bin/env bash
# Installs what tests/browser/ needs on a fresh Debian machine:
#   - Debian's `chromium` package (the browser the tests drive), and
#   - the `playwright` Python package into .venv (its Python API and driver only).
# Deliberately NOT `playwright install`: that downloads a browser build from outside the
# package registries, which fails on a closed network. The tests launch /usr/bin/chromium.
#
# Usage: bash scripts/ci_browser_deps.sh        (as root, or with sudo available)
#        PYTHON=/path/to/python bash scripts/ci_browser_deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
if [ ! -x "$PYTHON" ]; then
    echo "error: $PYTHON not found; create the virtual environment first (see README set-up)" >&2
    exit 1
fi

if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq chromium
fi

"$PYTHON" -m pip install -q "playwright>=1.40,<2"

# Show what the tests will use (chromium's wrapper may print a harmless shell warning first).
chromium --version 2>/dev/null || true
"$PYTHON" -c "from importlib.metadata import version; print('playwright', version('playwright'))"
