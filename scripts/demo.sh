#!/usr/bin/env bash
# Set up, make synthetic blurry samples (with their sharp originals), deblur them with the
# checkpoint shipped in weights/ as an evaluation job (a manifest with a reference column), and
# print the measured gain. Ray runs in this process, storage is local.
# The checkpoint was trained here on synthetic camera shake (weights/README.md): it is for this
# demo and for blur like it. For real camera blur use the authors' GoPro checkpoints
# (README: 'Real weights') or fine-tune with `deblur train --init`.
#   bash scripts/demo.sh                     # the shipped checkpoint
#   WEIGHTS=/path/MIMO-UNet.pkl bash scripts/demo.sh
#   bash scripts/demo.sh --random-weights    # smoke test of the pipeline: NOT deblurred
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WEIGHTS=${WEIGHTS:-weights/mimo-unet-synthetic.safetensors}
weights=(--weights "$WEIGHTS")
for arg in "$@"; do [ "$arg" = "--random-weights" ] && weights=(); done
rm -rf demo
.venv/bin/deblur samples demo/blurry --count 8
.venv/bin/python - <<'PY'
from pathlib import Path

rows = ["key,reference"] + [f"blurry/{p.name},blurry-reference/{p.stem}.png"
                            for p in sorted(Path("demo/blurry").glob("*.jpg"))]
Path("demo/eval.csv").write_text("\n".join(rows) + "\n")
PY
.venv/bin/deblur run demo/eval.csv demo/deblurred "${weights[@]}" \
  --job-root demo/deblurred/_deblur/demo --shard-size 4 "$@"
# The job measured its inputs and its outputs against the references (summary.json): print
# its own figures, and put one before/after pair side by side.
.venv/bin/python - <<'PY'
import json
from pathlib import Path

import numpy as np
from PIL import Image

q = json.loads(Path("demo/deblurred/_deblur/demo/summary.json").read_text())["quality"]
print(f"\ndemo: PSNR {q['mean_psnr_in']:.2f} -> {q['mean_psnr']:.2f} dB ({q['psnr_gain']:+.2f} dB), "
      f"SSIM {q['mean_ssim_in']:.3f} -> {q['mean_ssim']:.3f} ({q['ssim_gain']:+.3f}), mean of "
      f"{q['psnr_count']} images vs their sharp originals (the job's figures: deblur status)")
blurry = np.asarray(Image.open("demo/blurry/sample_000.jpg").convert("RGB"))
sharp = np.asarray(Image.open("demo/blurry-reference/sample_000.png").convert("RGB"))
out = np.asarray(Image.open("demo/deblurred/blurry/sample_000.jpg").convert("RGB"))
gap = np.full((blurry.shape[0], 6, 3), 255, np.uint8)
Image.fromarray(np.concatenate([blurry, gap, out, gap, sharp], axis=1)).save(
    "demo/before-after.png", optimize=True)
PY
echo "demo: inputs in demo/blurry, outputs in demo/deblurred/blurry, sharp originals in"
echo "demo: demo/blurry-reference; blurry | deblurred | sharp: demo/before-after.png"
echo "demo: job ledger under demo/deblurred/_deblur/demo/ (deblur report demo/deblurred/_deblur/demo)"
