"""Held-out evaluation of trained weights on synthetic camera shake.

scikit-image's bundled photographs (never in a training set of this project) are blurred by
the training generator (``deblur.train.blur.blur_image``, a fixed seed: the same blurry set
every run), deblurred through the job path (``deblur.model.load_model`` and
``deblur.run.inference.Deblurrer``, as `deblur run --weights` runs them), and compared with
the sharp originals: mean PSNR and SSIM of the outputs, and of the blurry inputs as the
baseline measured in the same run.

    .venv/bin/python bench/train_eval.py weights/mimo-unet-synthetic.safetensors [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

# Photographs only (clock is already motion-blurred; horse, logo, … are drawings).
IMAGES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "moon", "brick",
          "grass", "gravel", "text", "immunohistochemistry")
SEED = 2026


def held_out_set(seed: int = SEED) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, sharp, blurry) uint8 RGB for every evaluation photograph."""
    import skimage.data

    from deblur.train.blur import blur_image

    out = []
    for index, name in enumerate(IMAGES):
        sharp = np.asarray(getattr(skimage.data, name)())
        if sharp.ndim == 2:
            sharp = np.repeat(sharp[:, :, None], 3, axis=2)
        sharp = np.ascontiguousarray(sharp[:, :, :3].astype(np.uint8))
        out.append((name, sharp, blur_image(sharp, seed, index)))
    return out


def evaluate(weights: str, model: str = "mimo-unet", seed: int = SEED,
             device: str = "cpu") -> dict[str, object]:
    from deblur.config import ModelConfig
    from deblur.model.weights import load_model
    from deblur.observe.quality import psnr, ssim
    from deblur.run.inference import Deblurrer

    config = ModelConfig(name=model, weights=weights, device=device, compile="off")
    deblurrer = Deblurrer(load_model(config), config)
    rows = []
    began = time.monotonic()
    for name, sharp, blurry in held_out_set(seed):
        restored = deblurrer.deblur([blurry])[0]
        rows.append({"image": name, "size": f"{sharp.shape[1]}x{sharp.shape[0]}",
                     "blurry_psnr": psnr(blurry, sharp), "blurry_ssim": ssim(blurry, sharp),
                     "psnr": psnr(restored, sharp), "ssim": ssim(restored, sharp)})
    means = {k: float(np.mean([r[k] for r in rows]))
             for k in ("blurry_psnr", "blurry_ssim", "psnr", "ssim")}
    return {"weights": weights, "model": model, "seed": seed, "images": rows, "mean": means,
            "gain_db": means["psnr"] - means["blurry_psnr"],
            "seconds": round(time.monotonic() - began, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights")
    parser.add_argument("--model", default="mimo-unet")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    result = evaluate(args.weights, args.model, args.seed, args.device)
    print(f"{'image':22} {'size':>9}  {'blurry PSNR/SSIM':>17}  {'output PSNR/SSIM':>17}")
    for r in result["images"]:  # type: ignore[union-attr]
        print(f"{r['image']:22} {r['size']:>9}  {r['blurry_psnr']:8.2f} {r['blurry_ssim']:.4f}"
              f"  {r['psnr']:8.2f} {r['ssim']:.4f}")
    m = result["mean"]
    print(f"{'mean':22} {'':>9}  {m['blurry_psnr']:8.2f} {m['blurry_ssim']:.4f}"  # type: ignore[index]
          f"  {m['psnr']:8.2f} {m['ssim']:.4f}")  # type: ignore[index]
    print(f"gain: {result['gain_db']:+.2f} dB PSNR over the blurry input "
          f"({len(IMAGES)} scikit-image photographs, seed {args.seed}, {result['seconds']} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
