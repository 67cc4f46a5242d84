"""The DeblurGS fit on a CPU (issue 27's measure): one synthetic scene, 8 views at 64x48,
blurred by camera motion during the exposure, poses with noise. The deblurred views must be
at least 2 dB closer (PSNR) to the sharp references than the blurry inputs, and the
recovered mid-exposure poses closer to the true ones than the noisy poses it started from."""

from __future__ import annotations

import math

import pytest
import torch

from deblur.config import SceneConfig
from deblur.dev.scenes import make_synthetic_scene
from deblur.observe.quality import psnr
from deblur.scene.gaussians import Gaussians
from deblur.scene.optimise import fit_scene, render_views
from deblur.scene.se3 import camera_centre, rotation_angle

pytestmark = pytest.mark.slow

# A CPU schedule: 3DGS's 30,000 steps compressed to 250, with learning rates raised
# to match (docs/benchmarks.md has this run's figures).
CPU_SCHEDULE = SceneConfig(steps=250, subframes=4, densify_from=50, densify_until=175,
                           densify_every=50, densify_anneal_until=150, opacity_reset_every=0,
                           lr_means=0.0016, lr_means_final=0.00016, lr_colour=0.01,
                           lr_scales=0.01, lr_pose=0.003, lr_pose_final=0.0003,
                           max_gaussians=5000)


def _pose_errors(poses: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """Mean rotation error (degrees) and camera-centre error (world units)."""
    angle = rotation_angle(poses[:, :3, :3], truth[:, :3, :3]).mean()
    centre = (camera_centre(poses) - camera_centre(truth)).norm(dim=1).mean()
    return math.degrees(float(angle)), float(centre)


def test_deblurgs_recovers_sharp_views_and_poses_on_a_cpu() -> None:
    torch.manual_seed(0)
    scene = make_synthetic_scene(seed=0, views=8, width=64, height=48)
    fit = fit_scene(Gaussians.from_points(scene.points, scene.colours), list(scene.blurry),
                    [scene.camera] * 8, scene.noisy_mid, CPU_SCHEDULE)
    outputs = render_views(fit, [scene.camera] * 8)
    blurry = sum(psnr(scene.blurry[i].numpy(), scene.sharp[i].numpy()) for i in range(8)) / 8
    deblurred = sum(psnr(outputs[i].numpy(), scene.sharp[i].numpy()) for i in range(8)) / 8
    print(f"PSNR blurry {blurry:.2f} dB, deblurred {deblurred:.2f} dB; {fit.seconds:.0f} s, "
          f"{len(fit.gaussians)} Gaussians")
    assert deblurred >= blurry + 2.0
    noisy_rot, noisy_centre = _pose_errors(scene.noisy_mid, scene.true_mid)
    rot, centre = _pose_errors(fit.mids, scene.true_mid)
    print(f"pose error: noisy {noisy_rot:.3f} deg / {noisy_centre:.4f}, recovered "
          f"{rot:.3f} deg / {centre:.4f}")
    assert rot < noisy_rot and centre < noisy_centre
