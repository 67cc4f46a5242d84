"""The DeblurGS fit: Gaussians and each view's camera motion, from blurry views.

For each blurry view the camera moves during the exposure from a start to an end pose; both
are twists applied to the view's initial pose (``exp(xi) @ w2c``) and sub-frame poses lie on
the straight line between the two twists (the paper's camera-motion curve at first order).
A step renders one view at ``subframes`` poses, averages the renders into a synthetic blurry
image and compares it with the input (L1 + D-SSIM). Gaussians and motions are optimised
together with Adam; densification follows 3DGS (clone small, split large, prune transparent)
under Gaussian Densification Annealing: no densification before ``densify_from``, and a
gradient threshold that starts high and decays while the poses settle, so Gaussians are not
multiplied at places only a wrong pose asked for. Each view's output is the sharp render at
its mid-exposure pose.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deblur.config import SceneConfig
from deblur.errors import SceneError
from deblur.scene.gaussians import Gaussians
from deblur.scene.raster import Camera, Renderer, render
from deblur.scene.se3 import camera_centre, quaternion_to_matrix, se3_exp

INIT_MOTION = 1e-3  # the start and end twists begin this far apart: at zero the blur is
# symmetric in the motion and its gradient vanishes


@dataclass
class SceneFit:
    """What a fit recovers.

    Args:
        gaussians: the sharp scene.
        starts, mids, ends: (V, 4, 4) each view's world-to-camera pose at the start, middle
            and end of its exposure (the sharp outputs are rendered at the middle).
        fit_psnr: (V,) PSNR (dB) of each re-blurred render against its input.
        steps, seconds: the optimisation's length.
    """

    gaussians: Gaussians
    starts: torch.Tensor
    mids: torch.Tensor
    ends: torch.Tensor
    fit_psnr: list[float]
    steps: int
    seconds: float


def ssim_map_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - SSIM of (H, W, 3) images in [0, 1], 11x11 Gaussian window (sigma 1.5), as 3DGS."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    coords = torch.arange(11, dtype=x.dtype, device=x.device) - 5
    g = torch.exp(-coords ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)
    a = x.permute(2, 0, 1)[None]
    b = y.permute(2, 0, 1)[None]

    def blur(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(v, window, padding=5, groups=3)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return 1 - ssim.mean()


def grad_threshold(step: int, config: SceneConfig) -> float:
    """Gaussian Densification Annealing: the densification threshold at ``step``.

    Log-linear from ``densify_grad_start`` at ``densify_from`` to ``densify_grad_end`` at
    ``densify_anneal_until``, constant after.
    """
    span = max(1, config.densify_anneal_until - config.densify_from)
    f = min(1.0, max(0.0, (step - config.densify_from) / span))
    return math.exp((1 - f) * math.log(config.densify_grad_start)
                    + f * math.log(config.densify_grad_end))


def _decay(start: float, end: float, step: int, steps: int) -> float:
    f = min(1.0, step / max(1, steps - 1))
    return math.exp((1 - f) * math.log(start) + f * math.log(end))


class _Fit:
    """One scene's optimisation state: parameters, Adam, densification statistics."""

    def __init__(self, gaussians: Gaussians, images: list[torch.Tensor],
                 cameras: list[Camera], w2c: torch.Tensor, config: SceneConfig,
                 renderer: Renderer) -> None:
        self.config = config
        self.images = images  # V x (H, W, 3) in [0, 1]
        self.cameras = cameras
        self.w2c = w2c  # (V, 4, 4) initial poses
        self.renderer = renderer
        gen = torch.Generator().manual_seed(config.seed)
        views = len(w2c)
        direction = torch.randn(views, 6, generator=gen)
        direction = (INIT_MOTION * direction / direction.norm(dim=1, keepdim=True)).to(w2c)
        self.xi_start = (-direction / 2).requires_grad_(True)
        self.xi_end = (direction / 2).requires_grad_(True)
        self.g = gaussians
        for tensor in self.g.tensors().values():
            tensor.requires_grad_(True)
        centres = camera_centre(w2c)
        # 3DGS's scene extent: the camera centres' radius (and at least the cloud's spread
        # seen from them, for a burst whose cameras barely move)
        spread = (gaussians.means.detach() - centres.mean(0)).norm(dim=1).median()
        self.extent = float(max((centres - centres.mean(0)).norm(dim=1).max() * 1.1,
                                0.1 * spread))
        self.optimiser = torch.optim.Adam([
            {"params": [self.g.means], "lr": config.lr_means * self.extent, "name": "means"},
            {"params": [self.g.log_scales], "lr": config.lr_scales, "name": "log_scales"},
            {"params": [self.g.quats], "lr": config.lr_quats, "name": "quats"},
            {"params": [self.g.opacity_logits], "lr": config.lr_opacity,
             "name": "opacity_logits"},
            {"params": [self.g.f_dc], "lr": config.lr_colour, "name": "f_dc"},
            {"params": [self.xi_start, self.xi_end], "lr": config.lr_pose, "name": "pose"},
        ], eps=1e-15)
        self.times = torch.linspace(0, 1, config.subframes, device=w2c.device)
        self._reset_stats()

    def _reset_stats(self) -> None:
        g = len(self.g)
        self.grad_sum = torch.zeros(g, device=self.w2c.device)
        self.grad_count = torch.zeros(g, device=self.w2c.device)

    def poses(self, view: int, times: torch.Tensor) -> torch.Tensor:
        """(T, 4, 4) world-to-camera poses of ``view`` at exposure times ``times`` in [0, 1]."""
        xi = (1 - times[:, None]) * self.xi_start[view] + times[:, None] * self.xi_end[view]
        return se3_exp(xi) @ self.w2c[view]

    def step(self, step: int, view: int) -> float:
        config = self.config
        for group in self.optimiser.param_groups:
            if group["name"] == "means":
                group["lr"] = _decay(config.lr_means, config.lr_means_final, step,
                                     config.steps) * self.extent
            elif group["name"] == "pose":
                group["lr"] = _decay(config.lr_pose, config.lr_pose_final, step, config.steps)
        camera = self.cameras[view]
        out = self.renderer(self.g, self.poses(view, self.times), camera, None)
        out.means2d.retain_grad()
        blurry = out.images.mean(0).clamp(0, 1)
        target = self.images[view]
        loss = (1 - config.ssim_lambda) * (blurry - target).abs().mean()
        if config.ssim_lambda:
            loss = loss + config.ssim_lambda * ssim_map_loss(blurry, target)
        if not torch.isfinite(loss):
            value = float(loss.detach())
            raise SceneError("non_finite_loss", f"the loss became {value} at step {step}: "
                             "lower scene.lr_means / scene.lr_pose or check the poses")
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        with torch.no_grad():
            # the screen-space gradient in 3DGS's units (normalised device coordinates)
            grad = out.means2d.grad * torch.tensor([camera.width / 2, camera.height / 2],
                                                   device=self.w2c.device)
            seen = out.visible.any(0)
            self.grad_sum[seen] += grad.norm(dim=-1).amax(0)[seen]
            self.grad_count[seen] += 1
        return float(loss.detach())

    def densify(self, step: int) -> None:
        """Clone small and split large Gaussians with a high mean gradient; prune."""
        config = self.config
        with torch.no_grad():
            grads = self.grad_sum / self.grad_count.clamp_min(1)
            hot = grads >= grad_threshold(step, config)
            if len(self.g) >= config.max_gaussians:
                hot[:] = False
            scale = torch.exp(self.g.log_scales).amax(1)
            small = scale <= 0.01 * self.extent  # 3DGS's percent_dense
            clone = hot & small
            split = hot & ~small
            room = config.max_gaussians - len(self.g)
            if int(clone.sum() + split.sum()) > room:  # keep the hottest within the cap
                limit = grads.masked_fill(~hot, -1).topk(max(0, room)).values.min() \
                    if room > 0 else float("inf")
                clone &= grads >= limit
                split &= grads >= limit
            new: dict[str, list[torch.Tensor]] = {n: [] for n in Gaussians.NAMES}
            tensors = self.g.tensors()
            for name in Gaussians.NAMES:
                new[name].append(tensors[name][clone])
            if split.any():
                s = torch.exp(self.g.log_scales[split])
                rot = quaternion_to_matrix(self.g.quats[split])
                for _ in range(2):
                    offset = (rot @ (torch.randn_like(s) * s)[..., None])[..., 0]
                    new["means"].append(self.g.means[split] + offset)
                    new["log_scales"].append(self.g.log_scales[split] - math.log(1.6))
                    for name in ("quats", "opacity_logits", "f_dc"):
                        new[name].append(tensors[name][split])
            keep = ~split
            keep &= torch.sigmoid(self.g.opacity_logits) >= config.prune_opacity
            if step > config.opacity_reset_every > 0:
                keep &= scale <= 0.1 * self.extent  # 3DGS prunes huge ones once reset
            self._replace(keep, {n: torch.cat(v) for n, v in new.items()})
            self._reset_stats()

    def reset_opacity(self) -> None:
        with torch.no_grad():
            low = math.log(0.01 / 0.99)
            self.g.opacity_logits.clamp_(max=low)
            state = self.optimiser.state.get(self.g.opacity_logits, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].zero_()

    def _replace(self, keep: torch.Tensor, added: dict[str, torch.Tensor]) -> None:
        """Keep the rows ``keep`` of every Gaussian tensor, append ``added``; Adam's moments
        follow their rows (new rows start at zero), as 3DGS does."""
        count = len(next(iter(added.values())))
        for group in self.optimiser.param_groups:
            name = group["name"]
            if name == "pose":
                continue
            old = group["params"][0]
            fresh = torch.cat([old.detach()[keep], added[name]]).requires_grad_(True)
            state = self.optimiser.state.pop(old, None)
            if state:
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = torch.cat([state[key][keep],
                                            state[key].new_zeros((count, *old.shape[1:]))])
                self.optimiser.state[fresh] = state
            group["params"][0] = fresh
            setattr(self.g, name, fresh)


def fit_scene(gaussians: Gaussians, images: list[torch.Tensor], cameras: list[Camera],
              w2c: torch.Tensor, config: SceneConfig, renderer: Renderer = render,
              on_step: Callable[[int, int], None] | None = None) -> SceneFit:
    """Fit ``gaussians`` and the views' motions to blurry ``images`` (H, W, 3) in [0, 1].

    ``gaussians`` is optimised in place (densification replaces its tensors); the returned
    ``SceneFit.gaussians`` is a detached copy of the result.

    Args:
        cameras: each view's intrinsics at its image's size.
        w2c: (V, 4, 4) initial world-to-camera poses (OpenCV axes).
        on_step: called as (step, Gaussian count) every 10 steps, for progress and metrics.
    """
    started = time.monotonic()
    fit = _Fit(gaussians, images, cameras, w2c, config, renderer)
    gen = torch.Generator().manual_seed(config.seed)
    views = len(w2c)
    order: list[int] = []
    for step in range(config.steps):
        if not order:
            order = torch.randperm(views, generator=gen).tolist()
        fit.step(step, order.pop())
        done = step + 1
        if config.densify_from <= done <= config.densify_until \
                and done % config.densify_every == 0 and done < config.steps:
            fit.densify(done)
        if config.opacity_reset_every and done % config.opacity_reset_every == 0 \
                and done <= config.densify_until and done < config.steps:
            fit.reset_opacity()
        if on_step is not None and (done % 10 == 0 or done == config.steps):
            on_step(done, len(fit.g))
    with torch.no_grad():
        fit_psnr = []
        for view in range(views):
            blurry = renderer(fit.g, fit.poses(view, fit.times), cameras[view],
                              None).images.mean(0)
            mse = float(((blurry.clamp(0, 1) - images[view]) ** 2).mean())
            fit_psnr.append(10 * math.log10(1 / max(mse, 1e-12)))
        starts, mids, ends = (
            torch.stack([fit.poses(v, torch.tensor([t], device=w2c.device))[0]
                         for v in range(views)])
            for t in (0.0, 0.5, 1.0))
        scene = Gaussians(**{n: t.detach() for n, t in fit.g.tensors().items()})
    return SceneFit(scene, starts, mids, ends, fit_psnr, config.steps,
                    time.monotonic() - started)


def render_views(fit: SceneFit, cameras: list[Camera], renderer: Renderer = render
                 ) -> list[torch.Tensor]:
    """Each view's sharp render (H, W, 3) in [0, 1] at its mid-exposure pose and camera."""
    with torch.no_grad():
        return [renderer(fit.gaussians, fit.mids[v:v + 1], cam, None).images[0].clamp(0, 1)
                for v, cam in enumerate(cameras)]
