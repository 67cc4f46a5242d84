"""Rendering Gaussians to images: our differentiable PyTorch rasteriser, and gsplat on CUDA.

Ours follows the 3DGS image formation (Kerbl et al. 2023; Zwicker et al.'s EWA splatting):
each Gaussian's 3D covariance is projected with the Jacobian of the perspective map, dilated
by 0.3 px^2 (the anti-aliasing low-pass filter), and the pixels alpha-composite the Gaussians
front to back, sorted by the depth of their centres. Instead of 3DGS's per-tile loops it is
sparse and vectorised: one (pixel, Gaussian) pair for every pixel of every Gaussian's 3-sigma
box, all pairs sorted by pixel then depth, alpha per pair, and the transmittance as a
segmented cumulative sum of log(1 - alpha). Work and memory follow the pairs (the Gaussians'
footprints), not pixels x Gaussians: at 64x48 with a few thousand Gaussians a render and its
gradient take tens of milliseconds on a CPU core, and autograd differentiates it as is.

gsplat (an optional extra, ``deblur[scene-gpu]``) is imported only when a CUDA device renders;
it compiles its CUDA kernels on first use. ``tests/test_scene_gpu.py`` compares the two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from deblur.scene.gaussians import Gaussians

NEAR = 0.01  # Gaussians closer than this (world units, camera z) are not drawn
MIN_ALPHA = 1 / 255  # 3DGS skips contributions below one level of 8-bit colour
MAX_ALPHA = 0.99  # and caps alpha so transmittance never reaches zero (a finite gradient)
DILATION = 0.3  # px^2 added to every 2D covariance: the EWA low-pass filter


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics in pixels (pixel centres at +0.5, as 3DGS and gsplat).

    Args:
        fx: focal length along x. fy: along y. cx, cy: principal point.
        width, height: image size.
    """

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def resized(self, width: int, height: int) -> Camera:
        """The same camera for its image resized to ``width`` x ``height``."""
        sx, sy = width / self.width, height / self.height
        return Camera(self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy, width, height)

    def scaled(self, factor: float) -> Camera:
        """The same camera for its image scaled by ``factor`` (the resolution scale)."""
        return self.resized(max(1, round(self.width * factor)),
                            max(1, round(self.height * factor)))

    def matrix(self) -> torch.Tensor:
        return torch.tensor([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1]])


@dataclass
class Render:
    """One batch of renders.

    Args:
        images: (S, H, W, 3) colours.
        means2d: (S, G, 2) projected centres; call ``retain_grad`` before backward to read
            the screen-space gradient densification uses.
        visible: (S, G) whether each Gaussian was drawn in each render.
        pairs: (pixel, Gaussian) pairs evaluated: the work, for diagnostics (0 for gsplat).
    """

    images: torch.Tensor
    means2d: torch.Tensor
    visible: torch.Tensor
    pairs: int = 0


def project(gaussians: Gaussians, w2c: torch.Tensor, camera: Camera
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EWA projection for S poses: means2d (S,G,2), conics (S,G,3), depths (S,G), radii (S,G)."""
    rot, trans = w2c[:, :3, :3], w2c[:, :3, 3]
    cam = gaussians.means[None] @ rot.transpose(1, 2) + trans[:, None]  # (S, G, 3)
    z = cam[..., 2]
    zs = z.clamp_min(NEAR)
    # the Jacobian is taken at a point clamped to 1.3x the field of view (as 3DGS), so
    # Gaussians far off-screen do not get huge footprints
    tx = (cam[..., 0] / zs).clamp((-0.15 * camera.width - camera.cx) / camera.fx,
                                  (1.15 * camera.width - camera.cx) / camera.fx) * zs
    ty = (cam[..., 1] / zs).clamp((-0.15 * camera.height - camera.cy) / camera.fy,
                                  (1.15 * camera.height - camera.cy) / camera.fy) * zs
    zero = torch.zeros_like(zs)
    jac = torch.stack([camera.fx / zs, zero, -camera.fx * tx / (zs * zs),
                       zero, camera.fy / zs, -camera.fy * ty / (zs * zs)],
                      -1).reshape(*zs.shape, 2, 3)  # (S, G, 2, 3)
    t = jac @ rot[:, None]  # (S, G, 2, 3)
    cov2d = t @ gaussians.covariances()[None] @ t.transpose(-1, -2)  # (S, G, 2, 2)
    a = cov2d[..., 0, 0] + DILATION
    b = cov2d[..., 0, 1]
    c = cov2d[..., 1, 1] + DILATION
    det = (a * c - b * b).clamp_min(1e-12)
    conics = torch.stack([c / det, -b / det, a / det], -1)  # inverse covariance (a, b, c)
    mid = 0.5 * (a + c)
    radii = 3 * torch.sqrt(mid + torch.sqrt((mid * mid - det).clamp_min(0.01)))
    means2d = torch.stack([camera.fx * cam[..., 0] / zs + camera.cx,
                           camera.fy * cam[..., 1] / zs + camera.cy], -1)
    return means2d, conics, z, radii


def render(gaussians: Gaussians, w2c: torch.Tensor, camera: Camera,
           background: torch.Tensor | None = None) -> Render:
    """Render ``gaussians`` from S world-to-camera poses (S, 4, 4) with our rasteriser."""
    means2d, conics, depth, _radii = project(gaussians, w2c, camera)
    s, g = depth.shape
    device = depth.device
    width, height = camera.width, camera.height
    with torch.no_grad():
        # each Gaussian's bounding box in pixels: the exact box of its ellipse out to 3 sigma,
        # or to where its alpha falls below MIN_ALPHA if that is nearer (nothing is drawn
        # beyond it anyway; a faint Gaussian then costs fewer pairs)
        reach = torch.sqrt((2 * torch.log(gaussians.opacities().detach() / MIN_ALPHA))
                           .clamp_min(0)).clamp_max(3)
        det = conics[..., 0] * conics[..., 2] - conics[..., 1] ** 2
        ext_x = reach * torch.sqrt((conics[..., 2] / det).clamp_min(0))
        ext_y = reach * torch.sqrt((conics[..., 0] / det).clamp_min(0))
        mx, my = means2d[..., 0], means2d[..., 1]
        x0 = (mx - ext_x - 0.5).ceil().clamp(0, width).long()  # pixel centres at +0.5
        x1 = (mx + ext_x - 0.5).floor().clamp(-1, width - 1).long() + 1
        y0 = (my - ext_y - 0.5).ceil().clamp(0, height).long()
        y1 = (my + ext_y - 0.5).floor().clamp(-1, height - 1).long() + 1
        box_w, box_h = (x1 - x0).clamp_min(0), (y1 - y0).clamp_min(0)
        visible = (depth > NEAR) & (box_w > 0) & (box_h > 0)
        area = torch.where(visible, box_w * box_h, 0).reshape(-1)  # (S*G,)
        # one (pixel, Gaussian) pair per pixel of each box
        owner = torch.repeat_interleave(torch.arange(s * g, device=device), area)
        local = torch.arange(len(owner), device=device) - torch.repeat_interleave(
            torch.cumsum(area, 0) - area, area)
        bw = box_w.reshape(-1)[owner]
        px = x0.reshape(-1)[owner] + local % bw
        py = y0.reshape(-1)[owner] + local // bw
        view = owner // g
        pixel = (view * height + py) * width + px  # (N,) in the S x H x W images
        rank = torch.argsort(torch.argsort(depth, dim=1), dim=1).reshape(-1)[owner]
        order = torch.argsort(pixel * g + rank)  # by pixel, then front to back
        owner, pixel, px, py = owner[order], pixel[order], px[order], py[order]
        _, counts = torch.unique_consecutive(pixel, return_counts=True)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    mean = means2d.reshape(-1, 2)[owner]
    conic = conics.reshape(-1, 3)[owner]
    gid = owner % g
    dx = px.to(mean.dtype) + 0.5 - mean[:, 0]
    dy = py.to(mean.dtype) + 0.5 - mean[:, 1]
    power = -0.5 * (conic[:, 0] * dx * dx + conic[:, 2] * dy * dy) - conic[:, 1] * dx * dy
    alpha = (gaussians.opacities()[gid] * torch.exp(power.clamp_max(0))).clamp_max(MAX_ALPHA)
    alpha = torch.where(alpha >= MIN_ALPHA, alpha, torch.zeros_like(alpha))
    # transmittance before each pair: a segmented exclusive product over each pixel's list,
    # as a cumulative sum of log(1 - alpha) (float64: the sum runs over all pixels)
    log_t = torch.log1p(-alpha).double()
    excl = torch.cumsum(log_t, 0) - log_t
    before = torch.exp(excl - excl[first]).to(alpha.dtype)
    weights = alpha * before
    pixels = s * height * width
    colour = torch.zeros(pixels, 3, dtype=alpha.dtype, device=device).index_add(
        0, pixel, weights[:, None] * gaussians.colours()[gid])
    if background is not None:
        remaining = torch.zeros(pixels, dtype=log_t.dtype, device=device).index_add(
            0, pixel, log_t)
        colour = colour + torch.exp(remaining).to(colour.dtype)[:, None] * background.to(colour)
    return Render(images=colour.reshape(s, height, width, 3), means2d=means2d,
                  visible=visible, pairs=len(owner))


Renderer = Callable[[Gaussians, torch.Tensor, Camera, "torch.Tensor | None"], Render]


def renderer_for(device: torch.device, backend: str = "auto") -> tuple[Renderer, str]:
    """The rasteriser for ``device`` and a line that says which and why.

    ``auto``: gsplat on CUDA when it imports, ours otherwise; ``torch``: ours everywhere;
    ``gsplat``: gsplat on CUDA (ours on a CPU, where gsplat cannot run), an error with the fix
    when it does not import.
    """
    if backend == "torch" or device.type != "cuda":
        return render, f"scene rasteriser: ours (PyTorch) on {device.type}"
    try:
        import gsplat  # noqa: F401  (optional extra; compiles CUDA kernels on first use)
    except ImportError as exc:
        if backend == "gsplat":
            raise RuntimeError("scene.rasteriser is 'gsplat' but gsplat does not import "
                               f"({exc}): pip install 'deblur[scene-gpu]'") from exc
        return render, f"scene rasteriser: ours (PyTorch) on cuda: gsplat not installed ({exc})"
    return render_gsplat, "scene rasteriser: gsplat on cuda"


def render_gsplat(gaussians: Gaussians, w2c: torch.Tensor, camera: Camera,
                  background: torch.Tensor | None = None) -> Render:
    """Render with gsplat's CUDA rasteriser, the same image formation as ``render``."""
    from gsplat import rasterization

    s = w2c.shape[0]
    ks = camera.matrix().to(w2c)[None].expand(s, -1, -1)
    images, _alphas, meta = rasterization(
        means=gaussians.means, quats=gaussians.quats, scales=torch.exp(gaussians.log_scales),
        opacities=gaussians.opacities(), colors=gaussians.colours(), viewmats=w2c, Ks=ks,
        width=camera.width, height=camera.height, near_plane=NEAR, eps2d=DILATION,
        packed=False, backgrounds=None if background is None else background[None].expand(s, -1))
    radii = meta["radii"]  # (S, G) before gsplat 1.5, (S, G, 2) since
    visible = (radii > 0).all(-1) if radii.dim() == 3 else radii > 0
    return Render(images=images, means2d=meta["means2d"], visible=visible)
