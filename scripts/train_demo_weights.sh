#!/usr/bin/env bash
# Reproduce weights/mimo-unet-synthetic.safetensors (the demo checkpoint, weights/README.md):
#   1. sharp photographs from four Debian wallpaper packages (apt-get download: the .deb files
#      only, nothing is installed; needs `apt-get update` done once), downscaled to 768 px
#      on the long side, plus 12 procedural scenes of `deblur samples` (seed 1: not the demo's);
#   2. `deblur train --synthetic` on them (camera shake made on the fly, pipeline/deblur/train/blur.py);
#   3. bench/train_eval.py: PSNR/SSIM on scikit-image's photographs (never trained on).
# Everything goes under build/train-demo/ (git-ignored); the wallpapers are not committed.
# What weights/ was made with (2 CPU cores; weights/README.md has the two stages, the first
# of which ran before --rotate and the Lomiri photographs existed):
#   MINUTES=95 bash scripts/train_demo_weights.sh
#   RUN=build/train-demo/run2 INIT=build/train-demo/run/checkpoints/step-00001500.pt \
#     STEPS=2400 LR=2e-4 MIN_SCALE=0.5 MINUTES=55 bash scripts/train_demo_weights.sh
# On a GPU: GPUS=1 CROP=256 BATCH=8 STEPS=20000 LR=2e-4 bash scripts/train_demo_weights.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=build/train-demo
STEPS=${STEPS:-4000}
CROP=${CROP:-64}
BATCH=${BATCH:-4}
LR=${LR:-3e-4}
GPUS=${GPUS:-0}
THREADS=${THREADS:-2}
MINUTES=${MINUTES:-}
RUN=${RUN:-$WORK/run}
INIT=${INIT:-}
MIN_SCALE=${MIN_SCALE:-1.0}
mkdir -p "$WORK/deb" "$WORK/sharp"

# Photographs only (the packages also hold illustrations); licences in weights/README.md.
PLASMA=(BytheWater ColdRipple ColorfulCups EveningGlow FallenLeaf Grey Kite OneStandsOut Path
        summer_1am)
MATE=(Aqua Blinds Dune FreshFlower Garden GreenMeadow LadyBird RainDrops Storm TwoWings Wood
      YellowFlower)
# Lomiri (Ubuntu Touch) wallpapers: the photographs of the 2018 community set and one of 2021
# (the rest are drawings); CC-BY / CC-BY-SA / CC0 per their debian/copyright.
LOMIRI=(Bridge_by_Sander_Klootwijk Dragonfly_by_Bolly Picture_0B_by_freespace
        Picture_1A_by_freespace Wine_by_Jakkub_Mede aitzgorri_by_Aitzol_Berasategi
        analogpattern_by_Peter_Nerlich free_by_Peter_Nerlich friends_by_Aitzol_Berasategi
        greentock_by_Peter_Nerlich life_by_Aitzol_Berasategi picosdeeuropa_by_Aitzol_Berasategi
        seeding_by_Clements_Engelhardt sunset_by_Aitzol_Berasategi Kleiber_by_Lukas_Baubkus)
fetch() {  # fetch PACKAGE DIR: download and unpack one .deb once
  if [ ! -d "$WORK/deb/$2" ]; then
    (cd "$WORK/deb" && apt-get download "$1")
    dpkg-deb -x "$WORK"/deb/"$1"_*.deb "$WORK/deb/$2"
  fi
}
fetch plasma-workspace-wallpapers plasma
fetch mate-backgrounds mate
fetch lomiri-wallpapers-16.04 lomiri
fetch lomiri-wallpapers-20.04 lomiri-20.04
files=()
for name in "${PLASMA[@]}"; do
  dir="$WORK/deb/plasma/usr/share/wallpapers/$name/contents/images"
  pick="$dir/1920x1080.jpg"; [ -f "$pick" ] || pick=$(ls "$dir"/*.jpg | tail -1)
  files+=("plasma-$name=$pick")
done
for name in "${MATE[@]}"; do
  files+=("mate-$name=$WORK/deb/mate/usr/share/backgrounds/mate/nature/$name.jpg")
done
for name in "${LOMIRI[@]}"; do
  pick=$(ls "$WORK"/deb/lomiri*/usr/share/backgrounds/"$name.jpg" | head -1)
  files+=("lomiri-$name=$pick")  # "lomiri-" sorts before "plasma-": the held-out pair stays
done
.venv/bin/python - "$WORK/sharp" "${files[@]}" <<'EOF'
import sys
from pathlib import Path

from PIL import Image

from deblur.dev.samples import write_samples

out = Path(sys.argv[1])
for item in sys.argv[2:]:
    name, path = item.split("=", 1)
    target = out / f"{name}.png"
    if target.exists():
        continue
    img = Image.open(path).convert("RGB")
    scale = 768 / max(img.size)  # downscaling also removes the wallpapers' JPEG artefacts
    img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS).save(target)
scenes = out.parent / "scenes"
if not scenes.exists():
    write_samples(scenes, count=12, seed=1)
    for ref in sorted(Path(f"{scenes}-reference").glob("*.png")):
        ref.rename(out / f"dev-scene-{ref.stem}.png")
print(f"{len(list(out.glob('*.png')))} sharp training images in {out}")
EOF

# --holdout 2: the last two by name (plasma-Path, plasma-summer_1am) give the PSNR printed
# while training; the reported figure is bench/train_eval.py's, on scikit-image's photographs.
# A run that dies (a lost Ray instance, a killed process) is started again: it resumes from its
# last checkpoint in $WORK/run. MINUTES bounds the whole loop, not each attempt.
end=$(( $(date +%s) + ${MINUTES:-100000} * 60 ))
for attempt in 1 2 3 4 5 6 7 8; do
  left=$(( end - $(date +%s) ))
  [ "$left" -gt 60 ] || break
  limit=()
  [ -n "$MINUTES" ] && limit=(--time-limit "$(awk "BEGIN {print $left / 60 - 1}")")
  init=()
  [ -n "$INIT" ] && init=(--init "$INIT")
  if .venv/bin/deblur train --synthetic "$WORK/sharp" "$RUN" --steps "$STEPS" \
      --crop "$CROP" --batch "$BATCH" --lr "$LR" --min-scale "$MIN_SCALE" "${init[@]}" \
      --gpus-per-worker "$GPUS" \
      --cpus-per-worker "$THREADS" --threads "$THREADS" --checkpoint-every 100 \
      --eval-every 100 --eval-size 384 --holdout 2 "${limit[@]}"; then
    break
  fi
  echo "train_demo_weights: attempt $attempt stopped; resuming from the last checkpoint"
  sleep 5
done
# best.safetensors: the step with the best PSNR on the two held-out wallpapers (chosen without
# looking at scikit-image's photographs, which only measure it).
.venv/bin/python bench/train_eval.py "$RUN/best.safetensors" --json "$RUN/eval.json"
echo "to ship: cp $RUN/best.safetensors weights/mimo-unet-synthetic.safetensors"
