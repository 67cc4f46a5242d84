#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh test     with the test extras
# torch: a user's GPU machine brings its own CUDA build; when no torch is importable we install
# the CPU build torch==2.13.0 first, so pip never pulls a multi-GB CUDA wheel by accident.
# torchvision (the optional `gpu` extra, for nvJPEG) is never installed here: it must match the
# machine's torch and is only useful with CUDA (docs/deploy.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "deblur needs Python 3.11+"'
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU build)"
  "${PIP[@]}" install 'torch==2.13.0'
fi
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
"${PIP[@]}" install -e ".${extras}" 2>&1 | grep -v -e '^WARNING: Location' -e '^$' || true
.venv/bin/python -c 'import deblur, torch, ray' >/dev/null
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
