#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh test     with the test extras
# torch: a user's GPU machine brings its own CUDA build and we never touch it. When no torch is
# importable: on a machine without an NVIDIA GPU we ask PyTorch's own CPU index for the CPU
# build (PyPI's default torch wheel for Linux is the multi-GB CUDA build), falling back to the
# default index when that index cannot be reached; with an NVIDIA GPU, the default (CUDA) build.
# Either way the last line says which build was installed.
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
TORCH_VERSION=2.13.0
CPU_INDEX=${DEBLUR_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 || [ -e /proc/driver/nvidia/version ]; then
    echo "setup: NVIDIA GPU found: installing torch==$TORCH_VERSION from the default index"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  elif .venv/bin/python - "$CPU_INDEX" <<'PY' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10).read(1)
PY
  then
    echo "setup: no NVIDIA GPU: installing torch==$TORCH_VERSION+cpu from $CPU_INDEX"
    # Only torch itself carries the +cpu label, so its dependencies still come from the
    # default index.
    "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" --extra-index-url "$CPU_INDEX"
  else
    echo "setup: no NVIDIA GPU, and $CPU_INDEX cannot be reached: installing" \
         "torch==$TORCH_VERSION from the default index (may be the large CUDA build)"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  fi
fi
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
"${PIP[@]}" install -e ".${extras}" 2>&1 | grep -v -e '^WARNING: Location' -e '^$' || true
.venv/bin/python -c 'import deblur, torch, ray' >/dev/null
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch
build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
print("torch", torch.__version__, build)'))"
