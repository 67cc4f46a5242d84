"""DeblurGS scenes against their blurry inputs and against per-image MIMO-UNet.

Synthetic scenes (``deblur.dev.scenes``: ray-cast textured panels, camera motion during each
exposure, noisy poses, a sparse cloud) at each size given; for each scene: the blurry views'
PSNR/SSIM against the sharp references (the baseline, measured in the same run), the views
re-rendered sharp by a DeblurGS fit (``scene/optimise.py`` with the schedule of
``--config``, as a scene job runs it), and each view deblurred alone by MIMO-UNet with the
shipped weights (the job path's ``Deblurrer``); seconds per scene for both.

    .venv/bin/python bench/scenes.py [--sizes 64x48,96x72] [--scenes 1] [--views 8]
        [--config configs/scene-cpu.yaml] [--weights weights/mimo-unet-synthetic.safetensors]
        [--device cpu|cuda] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def bench_scene(seed: int, views: int, width: int, height: int, scene_config: object,
                deblurrer: object, device: str) -> dict[str, object]:
    from deblur.dev.scenes import make_synthetic_scene
    from deblur.observe.quality import psnr, ssim
    from deblur.scene.gaussians import Gaussians
    from deblur.scene.optimise import fit_scene, render_views
    from deblur.scene.raster import renderer_for

    scene = make_synthetic_scene(seed, views, width, height)
    sharp = [s.numpy() for s in scene.sharp]
    blurry = [b.numpy() for b in scene.blurry]
    renderer, line = renderer_for(torch.device(device), "auto")
    start = Gaussians.from_points(scene.points, scene.colours)
    start = Gaussians(**{n: t.to(device) for n, t in start.tensors().items()})
    began = time.monotonic()
    fit = fit_scene(start, [b.to(device) for b in scene.blurry], [scene.camera] * views,
                    scene.noisy_mid.to(device), scene_config, renderer)  # type: ignore[arg-type]
    rendered = [r.cpu().numpy() for r in render_views(fit, [scene.camera] * views, renderer)]
    gs_seconds = time.monotonic() - began
    began = time.monotonic()
    as_uint8 = [(b * 255).round().astype(np.uint8) for b in blurry]
    restored = [deblurrer.deblur([b])[0] for b in as_uint8]  # type: ignore[attr-defined]
    unet_seconds = time.monotonic() - began

    def mean(fn: object, outs: list[np.ndarray]) -> float:
        return float(np.mean([fn(o, s) for o, s in zip(outs, sharp)]))  # type: ignore[operator]

    return {"seed": seed, "size": f"{width}x{height}", "views": views, "rasteriser": line,
            "blurry_psnr": mean(psnr, blurry), "blurry_ssim": mean(ssim, blurry),
            "deblurgs_psnr": mean(psnr, rendered), "deblurgs_ssim": mean(ssim, rendered),
            "mimo_psnr": mean(psnr, restored), "mimo_ssim": mean(ssim, restored),
            "deblurgs_seconds": gs_seconds, "mimo_seconds": unet_seconds,
            "gaussians": len(fit.gaussians), "steps": fit.steps}


def main(argv: list[str] | None = None) -> int:
    from deblur import config as config_mod
    from deblur.config import ModelConfig
    from deblur.model.weights import load_model
    from deblur.run.inference import Deblurrer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64x48,96x72")
    parser.add_argument("--scenes", type=int, default=1)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--config", default=str(ROOT / "configs" / "scene-cpu.yaml"))
    parser.add_argument("--weights", default=str(ROOT / "weights" /
                                                 "mimo-unet-synthetic.safetensors"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    scene_config = config_mod.load(args.config).scene
    model = ModelConfig(weights=args.weights, device=args.device, compile="off")
    deblurrer = Deblurrer(load_model(model), model)
    rows = []
    print(f"{'scene':>5} {'size':>7}  {'blurry':>13}  {'DeblurGS':>13}  {'MIMO-UNet':>13}  "
          f"{'s DeblurGS':>10} {'s MIMO':>7}  Gaussians")
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.lower().split("x"))
        for seed in range(args.scenes):
            r = bench_scene(seed, args.views, width, height, scene_config, deblurrer,
                            args.device)
            rows.append(r)
            print(f"{seed:>5} {r['size']:>7}  {r['blurry_psnr']:6.2f} {r['blurry_ssim']:.3f}"
                  f"  {r['deblurgs_psnr']:6.2f} {r['deblurgs_ssim']:.3f}"
                  f"  {r['mimo_psnr']:6.2f} {r['mimo_ssim']:.3f}"
                  f"  {r['deblurgs_seconds']:10.1f} {r['mimo_seconds']:7.2f}  {r['gaussians']}",
                  flush=True)
    print(f"({rows[0]['rasteriser']}; {args.views} views per scene, schedule {args.config}: "
          f"{rows[0]['steps']} steps; PSNR dB / SSIM against the sharp references)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
