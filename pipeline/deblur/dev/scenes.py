"""Synthetic scenes for DeblurGS with known geometry, texture and camera motion.

A scene is three textured rectangles (a backdrop and two panels at other depths and angles,
so the views see parallax and occlusion), ray-cast exactly (3x3 samples per pixel), not
rendered with Gaussians: the fit is checked against images its own model did not make. Each
view's camera moves during the exposure (a different rotation and translation per view);
the blurry view is the mean of 16 renders along that motion, the sharp reference the render
at mid-exposure. ``transforms.json`` carries the mid poses with noise as structure from motion
on blurry images would give them, and ``points3D.ply`` a sparse noisy cloud on the surfaces.

Layout (``DIR-reference`` mirrors ``DIR``, as ``deblur samples`` does for images):
``DIR/scene_000/{transforms.json, points3D.ply, images/view_000.png, …}`` and
``DIR-reference/scene_000/{transforms.json (true poses), images/view_000.png (sharp)}``.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deblur.dev.samples import make_scene, reference_folder
from deblur.scene.gaussians import ply_table_bytes
from deblur.scene.raster import Camera
from deblur.scene.se3 import interpolate, invert, se3_exp, so3_exp

BLUR_SUBFRAMES = 16  # renders averaged into one blurry view
SUPERSAMPLE = 3  # rays per pixel side: anti-aliased references


@dataclass(frozen=True)
class Panel:
    """A textured rectangle: centre, unit axes (texture x and y), half sizes, texture."""

    centre: np.ndarray
    axis_u: np.ndarray
    axis_v: np.ndarray
    half_u: float
    half_v: float
    texture: np.ndarray  # (h, w, 3) float in [0, 1]


@dataclass
class SyntheticScene:
    """Views of one scene; poses (V, 4, 4) world-to-camera, OpenCV axes; images (V, H, W, 3)
    float in [0, 1]."""

    camera: Camera
    blurry: torch.Tensor
    sharp: torch.Tensor
    true_mid: torch.Tensor
    true_start: torch.Tensor
    true_end: torch.Tensor
    noisy_mid: torch.Tensor
    points: torch.Tensor
    colours: torch.Tensor


def _panel(rng: np.random.Generator, centre: tuple[float, float, float], half: tuple[float, float],
           yaw: float, pitch: float, texture_px: int) -> Panel:
    rot = so3_exp(torch.tensor([pitch, yaw, 0.0], dtype=torch.float64)).numpy()
    texture = make_scene(rng, texture_px, int(texture_px * half[0] / half[1])).astype(
        np.float32) / 255
    return Panel(np.array(centre), rot[:, 0], rot[:, 1], half[0], half[1], texture)


def _panels(rng: np.random.Generator) -> list[Panel]:
    # textures of about one texel per view pixel at the default 64x48: edges the views can
    # resolve, not sub-pixel clutter that only averages out
    return [_panel(rng, (0.0, 0.0, 6.0), (5.0, 4.0), 0.0, 0.0, 80),
            _panel(rng, (-0.9, 0.3, 3.6), (0.9, 0.8), math.radians(20), math.radians(5), 40),
            _panel(rng, (1.0, -0.5, 4.6), (0.8, 0.9), math.radians(-25), math.radians(-10), 40)]


def _sample(texture: np.ndarray, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Bilinear texture lookup at s, t in [0, 1] (N,) -> (N, 3)."""
    h, w = texture.shape[:2]
    x = np.clip(s * (w - 1), 0, w - 1)
    y = np.clip(t * (h - 1), 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = texture[y0, x0] * (1 - fx) + texture[y0, x1] * fx
    bottom = texture[y1, x0] * (1 - fx) + texture[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def raycast(panels: list[Panel], w2c: np.ndarray, camera: Camera) -> np.ndarray:
    """The exact image (H, W, 3) of ``panels`` from pose ``w2c`` (nearest hit per ray)."""
    n = SUPERSAMPLE
    ys, xs = np.mgrid[0:camera.height * n, 0:camera.width * n].astype(np.float64)
    u = (xs + 0.5) / n
    v = (ys + 0.5) / n
    dirs_cam = np.stack([(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy,
                         np.ones_like(u)], -1).reshape(-1, 3)
    rot = w2c[:3, :3]
    origin = -rot.T @ w2c[:3, 3]
    dirs = dirs_cam @ rot  # (N, 3) world directions (R^T d for each row)
    best = np.full(len(dirs), np.inf)
    colour = np.zeros((len(dirs), 3))
    for panel in panels:
        normal = np.cross(panel.axis_u, panel.axis_v)
        denom = dirs @ normal
        with np.errstate(divide="ignore", invalid="ignore"):
            t = ((panel.centre - origin) @ normal) / denom
        hit = origin + t[:, None] * dirs
        rel = hit - panel.centre
        s = rel @ panel.axis_u / panel.half_u
        r = rel @ panel.axis_v / panel.half_v
        ok = (t > 0) & (t < best) & (np.abs(s) <= 1) & (np.abs(r) <= 1)
        best[ok] = t[ok]
        colour[ok] = _sample(panel.texture, (s[ok] + 1) / 2, (r[ok] + 1) / 2)
    image = colour.reshape(camera.height, n, camera.width, n, 3).mean((1, 3))
    return image


def _look_at(centre: np.ndarray, target: np.ndarray, roll: float) -> torch.Tensor:
    forward = (target - centre) / np.linalg.norm(target - centre)
    right = np.cross([0.0, 1.0, 0.0], forward)  # world y points down (OpenCV)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rot = np.stack([right, down, forward])
    rot = so3_exp(torch.tensor([0.0, 0.0, roll], dtype=torch.float64)).numpy() @ rot
    w2c = np.eye(4)
    w2c[:3, :3] = rot
    w2c[:3, 3] = -rot @ centre
    return torch.from_numpy(w2c)


def make_synthetic_scene(seed: int = 0, views: int = 8, width: int = 64, height: int = 48,
                         blur_px: float = 5.0, rotation_noise_deg: float = 1.0,
                         translation_noise: float = 0.04, points: int = 2000
                         ) -> SyntheticScene:
    """One scene's blurry and sharp views, true and noisy poses, and a sparse cloud.

    Args:
        blur_px: typical length (pixels) of each view's motion blur.
        rotation_noise_deg, translation_noise: the pose noise of transforms.json (degrees,
            world units; the panels are 3.6 to 6 units away).
    """
    rng = np.random.default_rng(seed)
    panels = _panels(rng)
    focal = 0.9 * width
    camera = Camera(focal, focal, width / 2, height / 2, width, height)
    target = np.array([0.0, 0.0, 4.5])
    mids, starts, ends, noisy, blurry, sharp = [], [], [], [], [], []
    for i in range(views):
        x = -0.8 + 1.6 * i / max(1, views - 1)
        centre = np.array([x, rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15)])
        mid = _look_at(centre, target + rng.normal(0, 0.1, 3), rng.uniform(-0.05, 0.05))
        # the motion during the exposure: a camera-frame twist, mostly a turn (hand shake)
        axis = rng.normal(0, 1, 3) * np.array([1.0, 1.0, 0.3])
        angle = blur_px / focal * rng.uniform(0.7, 1.3)
        motion = np.concatenate([rng.normal(0, 0.3 * angle, 3), angle * axis / np.linalg.norm(
            axis)])
        half = se3_exp(torch.from_numpy(motion / 2))
        start, end = invert(half) @ mid, half @ mid
        times = torch.linspace(0, 1, BLUR_SUBFRAMES, dtype=torch.float64)
        frames = [raycast(panels, p.numpy(), camera) for p in interpolate(start, end, times)]
        blurry.append(np.mean(frames, 0))
        sharp.append(raycast(panels, mid.numpy(), camera))
        noise = np.concatenate([rng.normal(0, translation_noise / math.sqrt(3), 3),
                                rng.normal(0, math.radians(rotation_noise_deg) / math.sqrt(3),
                                           3)])
        noisy.append(se3_exp(torch.from_numpy(noise)) @ mid)
        mids.append(mid)
        starts.append(start)
        ends.append(end)
    cloud, colours = _cloud(rng, panels, np.stack([m.numpy() for m in mids]), camera, points)

    def stack(items: list) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(i) for i in items])).float()

    # 8-bit views, as files carry them (and a little sensor noise on the blurry ones)
    blurry_q = np.clip(np.stack(blurry) + rng.normal(0, 0.5 / 255, np.shape(blurry)), 0, 1)
    blurry_q = np.round(blurry_q * 255) / 255
    sharp_q = np.round(np.clip(np.stack(sharp), 0, 1) * 255) / 255
    return SyntheticScene(camera, stack(list(blurry_q)), stack(list(sharp_q)), stack(mids),
                          stack(starts), stack(ends), stack(noisy),
                          torch.from_numpy(cloud).float(), torch.from_numpy(colours).float())


def _cloud(rng: np.random.Generator, panels: list[Panel], mids: np.ndarray, camera: Camera,
           count: int) -> tuple[np.ndarray, np.ndarray]:
    """Points on the panels where some view sees them, with noise: a sparse SfM-like cloud."""
    pts, cols = [], []
    while sum(len(p) for p in pts) < count:
        panel = panels[int(rng.integers(len(panels)))]
        s, r = rng.uniform(-1, 1, 2)
        p = panel.centre + s * panel.half_u * panel.axis_u + r * panel.half_v * panel.axis_v
        cam = mids[:, :3, :3] @ p + mids[:, :3, 3]
        u = camera.fx * cam[:, 0] / cam[:, 2] + camera.cx
        v = camera.fy * cam[:, 1] / cam[:, 2] + camera.cy
        if not ((cam[:, 2] > 0) & (u >= 0) & (u < camera.width) & (v >= 0)
                & (v < camera.height)).any():
            continue
        pts.append((p + rng.normal(0, 0.01, 3))[None])
        cols.append(_sample(panel.texture, np.array([(s + 1) / 2]), np.array([(r + 1) / 2])))
    return np.concatenate(pts), np.concatenate(cols)


def _png(image: torch.Tensor) -> bytes:
    out = io.BytesIO()
    Image.fromarray((image.numpy() * 255).round().clip(0, 255).astype(np.uint8)).save(
        out, format="PNG")
    return out.getvalue()


def _transforms(scene: SyntheticScene, poses: torch.Tensor, cloud: bool) -> dict:
    """nerfstudio's transforms.json: camera-to-world in OpenGL axes."""
    flip = np.diag([1.0, -1.0, -1.0, 1.0])
    cam = scene.camera
    frames = [{"file_path": f"images/view_{i:03d}.png",
               "transform_matrix": (invert(p.double()).numpy() @ flip).tolist()}
              for i, p in enumerate(poses)]
    doc = {"fl_x": cam.fx, "fl_y": cam.fy, "cx": cam.cx, "cy": cam.cy, "w": cam.width,
           "h": cam.height, "camera_model": "OPENCV", "frames": frames}
    return doc | {"ply_file_path": "points3D.ply"} if cloud else doc


def write_scenes(folder: str | Path, count: int = 1, views: int = 8, width: int = 64,
                 height: int = 48, seed: int = 0) -> list[Path]:
    """Write ``count`` synthetic scenes under ``folder`` (references beside it); their paths."""
    folder = Path(folder)
    out = []
    for index in range(count):
        scene = make_synthetic_scene(seed + index, views, width, height)
        base = folder / f"scene_{index:03d}"
        ref = reference_folder(folder) / f"scene_{index:03d}"
        for root in (base, ref):
            (root / "images").mkdir(parents=True, exist_ok=True)
        for i in range(views):
            (base / "images" / f"view_{i:03d}.png").write_bytes(_png(scene.blurry[i]))
            (ref / "images" / f"view_{i:03d}.png").write_bytes(_png(scene.sharp[i]))
        (base / "transforms.json").write_text(
            json.dumps(_transforms(scene, scene.noisy_mid, True), indent=1))
        (ref / "transforms.json").write_text(
            json.dumps(_transforms(scene, scene.true_mid, False), indent=1))
        colours = (scene.colours.numpy() * 255).round().clip(0, 255).astype(np.uint8)
        (base / "points3D.ply").write_bytes(ply_table_bytes({
            "x": scene.points[:, 0].numpy(), "y": scene.points[:, 1].numpy(),
            "z": scene.points[:, 2].numpy(), "red": colours[:, 0], "green": colours[:, 1],
            "blue": colours[:, 2]}))
        out.append(base)
    return out
