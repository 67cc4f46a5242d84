#!/usr/bin/env bash
# Set up everything the tests need and run the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/install_tools.sh
export PATH="$PWD/.tools/bin:$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest -q "$@"
