#!/usr/bin/env bash
# The GPU proof in one command (docs/benchmarks.md, "GPU proof"), within 8 minutes on one
# H100/H200:
#
#   bash scripts/gpu_check.sh            on the GPU machine: torch must be a CUDA build and
#                                        torchvision the release paired with it (the exact pip
#                                        command is printed when not); then the gpu-marked
#                                        tests; then bench/gpu.py for the whole table, written to
#                                        docs/benchmarks/gpu-<date>-<gpu>.jsonl and printed
#   bash scripts/gpu_check.sh prepare    where PyPI is reachable, for a GPU machine that has
#                                        torch but not Ray (and cannot download): Ray and what it
#                                        needs, for that machine's Python, into .whl/ (ignored
#                                        by git) to carry along with the working tree
#
# On the GPU machine a .whl/ folder is installed into a private folder (never over the
# machine's own packages) only when `import ray` fails there. Ray's wheel (about 80 MB) is
# over what such a machine is usually sent with a working tree (64 MiB), so `prepare` repacks
# it without the parts deblur never loads (Java jars, RLlib, Serve, LLM, the dashboard's web
# client) as a .tar.xz of about 30 MB.
#
# Settings (environment): PYTHON (default .venv/bin/python when it has torch, else python3);
# GPU_CHECK_BUDGET_S (480: the whole check); GPU_CHECK_TESTS_S (150: the tests' share);
# DEVICE_PYTHON (3.12: `prepare`'s target Python); GPU_BENCH_ARGS (extra bench/gpu.py options).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$SECONDS
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
TESTS_S=${GPU_CHECK_TESTS_S:-150}
SITE=${DEBLUR_CARRIED_SITE:-/tmp/deblur-carried-site}

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch' 2>/dev/null; then
  PY=.venv/bin/python
else
  PY=python3
fi

say() { echo "gpu_check: $*"; }

prepare() {
  local pyver=${DEVICE_PYTHON:-3.12} tmp ray_version
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  ray_version=$("$PY" -c 'import ray; print(ray.__version__)' 2>/dev/null || echo 2.60.0)
  local pip=("$PY" -m pip --disable-pip-version-check download --only-binary=:all:
             --python-version "$pyver" --implementation cp
             --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
             --platform manylinux2014_x86_64)
  say "downloading Ray $ray_version and its missing requirements for Python $pyver"
  # Ray's own requirements that a torch-only image lacks (the rest: click, filelock, msgpack,
  # packaging, protobuf, pyyaml, requests come with such images).
  "${pip[@]}" --no-deps -d "$tmp" "ray==$ray_version" jsonschema jsonschema-specifications \
    referencing rpds-py >/dev/null
  # Ray Train's (`deblur train` on the GPU): pydantic with the pydantic-core it pins, resolved
  # here, keeping only the packages such images lack (never a second numpy or protobuf).
  mkdir "$tmp/train"
  "${pip[@]}" -d "$tmp/train" "pydantic>=2.5,<3" "tensorboardX>=1.9" >/dev/null
  mv "$tmp"/train/pydantic-* "$tmp"/train/pydantic_core-* "$tmp"/train/annotated_types-* \
     "$tmp"/train/typing_inspection-* "$tmp"/train/tensorboard[Xx]-* "$tmp"/ 2>/dev/null || true
  rm -rf "$tmp/train"
  mkdir -p .whl
  grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  rm -f .whl/ray-*.tar.xz .whl/*.whl
  mkdir "$tmp/ray"
  "$PY" - "$tmp"/ray-*.whl "$tmp/ray" <<'PY'
import os, sys, zipfile  # unzip, keeping the modes (raylet and gcs_server are executables)
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for info in wheel.infolist():
        path = wheel.extract(info, sys.argv[2])
        if info.external_attr >> 16:
            os.chmod(path, (info.external_attr >> 16) & 0o777)
PY
  rm -rf "$tmp/ray/ray/jars" "$tmp/ray/ray/rllib" "$tmp/ray/ray/serve" "$tmp/ray/ray/llm" \
         "$tmp/ray/ray/dashboard/client"
  tar -C "$tmp/ray" -cf - . | xz -6 -T0 > ".whl/ray-$ray_version-cp${pyver/./}-slim.tar.xz"
  rm "$tmp"/ray-*.whl
  mv "$tmp"/*.whl .whl/
  say "ready: $(du -sh .whl | cut -f1) in .whl/ ($(ls .whl | tr '\n' ' '))"
  say "send it with the working tree (it is ignored by git) and run: bash scripts/gpu_check.sh"
}

install_carried() {
  # deblur from the source tree when it is not installed (a bare GPU image).
  if ! "$PY" -c 'import deblur' 2>/dev/null; then
    export PYTHONPATH=$ROOT/pipeline${PYTHONPATH:+:$PYTHONPATH}
  fi
  if "$PY" -c 'import ray' 2>/dev/null; then
    return 0
  fi
  local wheels archives
  wheels=$(compgen -G '.whl/*.whl' || true)
  archives=$(compgen -G '.whl/*.tar.xz' || true)
  if [ -z "$wheels$archives" ]; then
    say "ray is not importable and no .whl/ was carried: the Ray rows will say so" \
        "(bash scripts/gpu_check.sh prepare, where PyPI is reachable, makes .whl/)"
    return 0
  fi
  mkdir -p "$SITE"
  if [ -n "$wheels" ]; then
    # shellcheck disable=SC2086 - file names from the glob above, no spaces
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" $wheels || say "pip could not install .whl/*.whl (made for another Python?)"
  fi
  for archive in $archives; do
    tar -C "$SITE" -xJf "$archive" || say "could not unpack $archive"
  done
  # Absolute, so Ray's worker processes (which inherit it) import the same packages.
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  if "$PY" -c 'import ray' 2>/dev/null; then
    say "ray carried from .whl/ (in $SITE): $("$PY" -c 'import ray; print(ray.__version__)')"
  else
    say "ray from .whl/ does not import: $("$PY" -c 'import ray' 2>&1 | tail -1)"
  fi
}

preflight() {
  # Exit 2: no CUDA torch, nothing to measure. Exit 3: torchvision missing or not the release
  # paired with torch (the rest runs; the nvJPEG rows and tests say why they were skipped).
  "$PY" - <<'PY'
import io
import sys

try:
    import torch
except ImportError as exc:
    print(f"gpu_check: torch does not import ({exc}): install a CUDA build of torch "
          f"(docs/deploy.md), or set PYTHON to the interpreter that has it")
    sys.exit(2)

version = torch.__version__.split("+")[0]
major, minor = (int(v) for v in version.split(".")[:2])
cuda = torch.version.cuda
index = f"https://download.pytorch.org/whl/cu{cuda.replace('.', '')}" if cuda else (
    "https://download.pytorch.org/whl/cu126")
if not torch.cuda.is_available():
    build = f"a CUDA {cuda} build that sees no device" if cuda else "a CPU build"
    print(f"gpu_check: torch {torch.__version__} is {build}: this check needs an NVIDIA GPU "
          f"and a CUDA build of torch, e.g. pip install 'torch=={version}' --index-url "
          f"{index} (the CUDA index that suits your driver)")
    sys.exit(2)
paired = f"0.{minor + 15}" if major == 2 else None  # torch 2.N pairs with torchvision 0.(N+15)
command = (f"pip install --no-deps 'torchvision=={paired}.*' --index-url {index}"
           if paired else "the torchvision release paired with your torch (its README's table)")
device = torch.cuda.get_device_name(0)
try:
    import torchvision
    from torchvision.io import decode_jpeg, encode_jpeg
except Exception as exc:  # noqa: BLE001 - absent, or built for another torch
    print(f"gpu_check: torchvision does not import ({type(exc).__name__}: "
          f"{' '.join(str(exc).split())[:200]}); for torch {torch.__version__}: {command}")
    sys.exit(3)
if paired and not torchvision.__version__.startswith(paired + "."):
    print(f"gpu_check: torchvision {torchvision.__version__} is not the release paired with "
          f"torch {torch.__version__} ({paired}.x): {command}")
    sys.exit(3)
from PIL import Image

buf = io.BytesIO()
Image.new("RGB", (64, 48), (200, 100, 50)).save(buf, "JPEG", quality=95)
try:
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    pixels = decode_jpeg([data], device="cuda")[0]
    encode_jpeg([pixels], quality=90)[0].cpu()
except Exception as exc:  # noqa: BLE001
    print(f"gpu_check: torchvision {torchvision.__version__} imports but nvJPEG fails on "
          f"{device} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}): {command}")
    sys.exit(3)
print(f"gpu_check: torch {torch.__version__} (CUDA {cuda}) on {device}; torchvision "
      f"{torchvision.__version__} with nvJPEG: ok")
PY
}

remaining() { echo $((BUDGET_S - (SECONDS - START))); }

if [ "${1:-}" = "prepare" ]; then
  prepare
  exit 0
fi
if [ $# -gt 0 ]; then
  echo "usage: bash scripts/gpu_check.sh [prepare]" >&2
  exit 2
fi

install_carried
status=0
preflight || status=$?
if [ "$status" -eq 2 ]; then
  exit 2
fi

# The gpu-marked tests, from the files that have some (collecting the whole suite would import
# test-only packages a GPU image need not have).
mapfile -t gpu_files < <(grep -rl --include='test_*.py' 'mark\.gpu' tests | sort)
say "pytest -m gpu: ${gpu_files[*]}"
tests_status=0
timeout "$TESTS_S" "$PY" -m pytest -q -m gpu -p no:cacheprovider "${gpu_files[@]}" \
  || tests_status=$?
if [ "$tests_status" -ne 0 ]; then
  say "gpu tests: exit $tests_status$([ "$tests_status" -eq 124 ] && echo " (over ${TESTS_S} s)")"
fi

# The table: rows not started once the budget is nearly spent are skipped by the bench itself
# (--max-minutes), and an interrupt at the very end still prints what was measured.
left=$(remaining)
minutes=$(awk -v s="$left" 'BEGIN { m = (s - 120) / 60; printf "%.1f", (m < 0.5 ? 0.5 : m) }')
say "bench/gpu.py: ${left} s left of ${BUDGET_S}, rows start within ${minutes} min"
bench_status=0
# shellcheck disable=SC2086 - GPU_BENCH_ARGS is a list of options
timeout -s INT -k 20 "$((left > 30 ? left - 10 : 20))" "$PY" bench/gpu.py \
  --jsonl 'docs/benchmarks/gpu-{date}-{gpu}.jsonl' --max-minutes "$minutes" \
  ${GPU_BENCH_ARGS:-} || bench_status=$?
say "done in $((SECONDS - START)) s: preflight exit $status, tests exit $tests_status," \
    "bench exit $bench_status"
if [ "$status" -ne 0 ]; then
  exit "$status"  # 3: the torchvision line above says what to install
fi
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
