"""Our PyTorch rasteriser against gsplat's CUDA one (issue 27): the same Gaussians and poses
give the same images within tolerance. Needs CUDA and the ``scene-gpu`` extra (gsplat, which
compiles its kernels on the first call: minutes)."""

from __future__ import annotations

import pytest
import torch

from deblur.scene.gaussians import SH_C0, Gaussians
from deblur.scene.raster import Camera, render, render_gsplat
from deblur.scene.se3 import se3_exp

pytestmark = pytest.mark.gpu


def test_our_rasteriser_matches_gsplat() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("gsplat")
    gen = torch.Generator().manual_seed(0)
    count = 2000
    g = Gaussians(means=(torch.rand(count, 3, generator=gen) - 0.5) * torch.tensor([4, 3, 1.0])
                  + torch.tensor([0, 0, 5.0]),
                  log_scales=torch.log(0.02 + 0.08 * torch.rand(count, 3, generator=gen)),
                  quats=torch.rand(count, 4, generator=gen) - 0.5,
                  opacity_logits=(torch.rand(count, generator=gen) - 0.3) * 4,
                  f_dc=(torch.rand(count, 3, generator=gen) - 0.5) / SH_C0)
    g = Gaussians(**{n: t.cuda() for n, t in g.tensors().items()})
    camera = Camera(80.0, 80.0, 64.0, 48.0, 128, 96)
    w2c = se3_exp(torch.tensor([[0.0] * 6, [0.05, -0.02, 0.1, 0.02, -0.03, 0.01]])).cuda()
    ours = render(g, w2c, camera).images
    theirs = render_gsplat(g, w2c, camera).images
    assert ours.shape == theirs.shape
    # gsplat stops a pixel's list at transmittance 1e-4 and evaluates in float32 on tiles:
    # differences of a fraction of a level at most
    assert (ours - theirs).abs().mean() < 2e-3
    assert (ours - theirs).abs().max() < 5e-2
