#!/usr/bin/env bash
# Set up what the tests need and run them.
#   scripts/test.sh [PYTEST ARGS]           the whole suite, slow tests included (what CI runs)
#   scripts/test.sh --quick [PYTEST ARGS]   the quick tier: no Ray, no servers, no training
# The quick tier's selection lives in tests/conftest.py (QUICK_MARKEXPR), which also marks and
# checks the tests that would not belong to it; it needs none of the system tools, so it skips
# scripts/install_tools.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
if [ "${1:-}" = "--quick" ]; then
  quick=1
  shift
fi
bash scripts/setup.sh test
[ "$quick" = 1 ] || bash scripts/install_tools.sh
export PATH="$PWD/.tools/bin:$PWD/.venv/bin:$PATH"
if [ "$quick" = 1 ]; then
  markexpr=$(.venv/bin/python -c 'from tests.conftest import QUICK_MARKEXPR; print(QUICK_MARKEXPR)')
  exec .venv/bin/python -m pytest -q -m "$markexpr" "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
