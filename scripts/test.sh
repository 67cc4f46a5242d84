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
# The quick loop skips re-running setup (about half a minute of pip) while the venv is the one
# setup made from the current pyproject.toml and setup.sh, for this checkout (a venv may be
# shared between clones); the full suite always runs it.
stamp=.venv/.test-setup-done
set_up() {
  [ "$quick" = 1 ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ] &&
    .venv/bin/python -c 'import deblur, os, sys; sys.exit(not deblur.__file__.startswith(os.getcwd() + "/"))' 2>/dev/null
}
if ! set_up; then
  bash scripts/setup.sh test
  touch "$stamp"
fi
[ "$quick" = 1 ] || bash scripts/install_tools.sh
export PATH="$PWD/.tools/bin:$PWD/.venv/bin:$PATH"
# Two workers, a module each at a time, longest modules first (tests/conftest.py, "parallel
# runs"): on 2 cores much of the suite's time is spent waiting on Ray, subprocesses and
# servers, which two workers overlap. DEBLUR_TEST_WORKERS=0 runs in this one process.
parallel=(-n "${DEBLUR_TEST_WORKERS:-2}" --dist loadscope --no-loadscope-reorder)
if [ "$quick" = 1 ]; then
  markexpr=$(.venv/bin/python -c 'from tests.conftest import QUICK_MARKEXPR; print(QUICK_MARKEXPR)')
  exec .venv/bin/python -m pytest -q "${parallel[@]}" -m "$markexpr" "$@"
fi
exec .venv/bin/python -m pytest -q "${parallel[@]}" "$@"
