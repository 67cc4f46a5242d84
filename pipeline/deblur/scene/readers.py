"""Scene folders as users already have them: ``transforms.json`` or a COLMAP text model.

A scene is a folder (a prefix) holding its views and their poses:

- ``transforms.json``, the NeRF-synthetic / nerfstudio convention: camera-to-world matrices in
  the OpenGL axes (x right, y up, z back), intrinsics as ``fl_x, fl_y, cx, cy, w, h`` (top level
  or per frame) or ``camera_angle_x``, ``file_path`` relative to the folder (NeRF-synthetic
  leaves off ``.png``), optionally nerfstudio's ``ply_file_path`` (a point cloud to start from).
- COLMAP text, ``sparse/0/`` (or ``sparse/``): ``cameras.txt`` (pinhole models; distortion
  parameters are ignored), ``images.txt`` (world-to-camera quaternion and translation, OpenCV
  axes; images under ``images/``), ``points3D.txt`` (the cloud the Gaussians start from).

Everything is read through ``fetch(relative_path) -> bytes``, so a local folder and an S3
prefix are the same to this module. Poses come out world-to-camera in the OpenCV axes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from deblur.errors import SceneError
from deblur.scene.gaussians import read_ply_vertices
from deblur.scene.raster import Camera
from deblur.scene.se3 import invert, quaternion_to_matrix

Fetch = Callable[[str], bytes]
COLMAP_DIRS = ("sparse/0", "sparse")
OPENGL_TO_OPENCV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


@dataclass(frozen=True)
class Intrinsics:
    """A view's intrinsics as written: a size and a focal length, or only a field of view.

    ``camera`` resolves them against the decoded image's size (a scene's images may have been
    downscaled after its poses were computed: the intrinsics scale with them).
    """

    fx: float | None = None
    fy: float | None = None
    cx: float | None = None
    cy: float | None = None
    width: int | None = None
    height: int | None = None
    angle_x: float | None = None

    def camera(self, width: int, height: int) -> Camera:
        if self.fx is None:
            assert self.angle_x is not None
            f = 0.5 * width / math.tan(0.5 * self.angle_x)
            return Camera(f, f, width / 2, height / 2, width, height)
        w = self.width or width
        h = self.height or height
        fy = self.fy if self.fy is not None else self.fx
        cx = self.cx if self.cx is not None else w / 2
        cy = self.cy if self.cy is not None else h / 2
        return Camera(self.fx, fy, cx, cy, w, h).resized(width, height)


@dataclass(frozen=True)
class SceneView:
    """One view: its image's path relative to the scene folder and its camera."""

    path: str
    intrinsics: Intrinsics
    w2c: torch.Tensor  # (4, 4) world-to-camera, OpenCV axes


@dataclass(frozen=True)
class SceneData:
    """A scene's views in file order and the points (N, 3) and colours (N, 3) in [0, 1] it
    starts from, when it has any."""

    views: tuple[SceneView, ...]
    points: torch.Tensor | None
    colours: torch.Tensor | None
    format: str


def scene_format(paths: set[str]) -> str | None:
    """Which reader a scene folder needs, from its relative file paths; None if neither."""
    if "transforms.json" in paths:
        return "transforms"
    if any(f"{d}/images.txt" in paths for d in COLMAP_DIRS):
        return "colmap"
    return None


def read_scene(paths: set[str], fetch: Fetch, name: str) -> SceneData:
    """Read the scene whose folder holds ``paths``; ``name`` is the folder, for errors."""
    kind = scene_format(paths)
    if kind == "transforms":
        return read_transforms(fetch("transforms.json"), fetch, name)
    if kind == "colmap":
        base = next(d for d in COLMAP_DIRS if f"{d}/images.txt" in paths)
        points = fetch(f"{base}/points3D.txt") if f"{base}/points3D.txt" in paths else None
        return read_colmap(fetch(f"{base}/cameras.txt"), fetch(f"{base}/images.txt"), points,
                           name)
    raise SceneError("no_poses", f"{name}: no poses: add transforms.json or a COLMAP text "
                     "model (sparse/0/cameras.txt, images.txt, points3D.txt) to the folder")


def _intrinsics(block: dict, fallback: Intrinsics | None) -> Intrinsics | None:
    if "fl_x" in block:
        return Intrinsics(fx=float(block["fl_x"]), fy=float(block.get("fl_y", block["fl_x"])),
                          cx=_opt(block.get("cx")), cy=_opt(block.get("cy")),
                          width=_opt_int(block.get("w")), height=_opt_int(block.get("h")))
    if "camera_angle_x" in block:
        return Intrinsics(angle_x=float(block["camera_angle_x"]))
    return fallback


def _opt(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _opt_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def read_transforms(data: bytes, fetch: Fetch, name: str) -> SceneData:
    """``transforms.json`` (NeRF-synthetic or nerfstudio) -> SceneData."""
    where = f"{name}/transforms.json"
    try:
        doc = json.loads(data)
        frames = doc["frames"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SceneError("bad_scene", f"{where}: not a transforms.json with 'frames' "
                         f"({exc})") from exc
    top = _intrinsics(doc, None)
    views = []
    for i, frame in enumerate(frames):
        intr = _intrinsics(frame, top)
        try:
            c2w = torch.tensor(frame["transform_matrix"], dtype=torch.float64)
            path = str(frame["file_path"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SceneError("bad_scene", f"{where}: frame {i} needs file_path and a 4x4 "
                             f"transform_matrix ({exc})") from exc
        if intr is None:
            raise SceneError("bad_scene", f"{where}: no intrinsics for {path!r}: add fl_x "
                             "(and w, h) or camera_angle_x")
        if c2w.shape != (4, 4) or not torch.isfinite(c2w).all():
            raise SceneError("no_poses", f"{where}: {path!r} has no finite 4x4 "
                             "transform_matrix")
        path = path.removeprefix("./")
        if "." not in path.rsplit("/", 1)[-1]:
            path += ".png"  # NeRF-synthetic writes file_path without its extension
        views.append(SceneView(path, intr, invert((c2w @ OPENGL_TO_OPENCV.double())).float()))
    points = colours = None
    if doc.get("ply_file_path"):
        ply = str(doc["ply_file_path"]).removeprefix("./")
        cols = read_ply_vertices(fetch(ply), f"{name}/{ply}")
        points = torch.from_numpy(np.stack([cols["x"], cols["y"], cols["z"]], 1)).float()
        if all(c in cols for c in ("red", "green", "blue")):
            colours = torch.from_numpy(
                np.stack([cols["red"], cols["green"], cols["blue"]], 1)).float() / 255
    return SceneData(tuple(views), points, colours, "transforms")


_COLMAP_MODELS = {  # model -> how its first parameters map to fx, fy, cx, cy
    "SIMPLE_PINHOLE": (0, 0, 1, 2), "PINHOLE": (0, 1, 2, 3), "SIMPLE_RADIAL": (0, 0, 1, 2),
    "RADIAL": (0, 0, 1, 2), "OPENCV": (0, 1, 2, 3), "FULL_OPENCV": (0, 1, 2, 3),
    "SIMPLE_RADIAL_FISHEYE": (0, 0, 1, 2), "OPENCV_FISHEYE": (0, 1, 2, 3)}


def _lines(data: bytes) -> list[str]:
    return [line for line in data.decode("utf-8", "replace").splitlines()
            if not line.startswith("#")]


def read_colmap(cameras: bytes, images: bytes, points: bytes | None, name: str
                ) -> SceneData:
    """COLMAP's text model -> SceneData (image paths under ``images/``)."""
    intrinsics: dict[str, Intrinsics] = {}
    for line in _lines(cameras):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 5 or parts[1] not in _COLMAP_MODELS:
            raise SceneError("bad_scene", f"{name}: cameras.txt line {line!r}: model must be "
                             f"one of {', '.join(_COLMAP_MODELS)}")
        fx, fy, cx, cy = (float(parts[4 + i]) for i in _COLMAP_MODELS[parts[1]])
        intrinsics[parts[0]] = Intrinsics(fx=fx, fy=fy, cx=cx, cy=cy, width=int(parts[2]),
                                          height=int(parts[3]))
    lines = _lines(images)
    views = []
    i = 0
    while i < len(lines):
        parts = lines[i].split()
        if len(parts) < 10:  # a blank line between entries, or a stray keypoint line
            i += 1
            continue
        quat = torch.tensor([float(v) for v in parts[1:5]])
        trans = torch.tensor([float(v) for v in parts[5:8]])
        if parts[8] not in intrinsics:
            raise SceneError("bad_scene", f"{name}: images.txt: {parts[9]!r} names camera "
                             f"{parts[8]} that cameras.txt does not define")
        w2c = torch.eye(4)
        w2c[:3, :3] = quaternion_to_matrix(quat)
        w2c[:3, 3] = trans
        views.append(SceneView("images/" + " ".join(parts[9:]), intrinsics[parts[8]], w2c))
        i += 2  # the next line lists the image's 2D points (possibly empty)
    pts = cols = None
    if points is not None:
        rows = [line.split() for line in _lines(points) if line.strip()]
        if rows:
            table = np.array([[float(v) for v in r[1:7]] for r in rows], dtype=np.float32)
            pts = torch.from_numpy(table[:, :3])
            cols = torch.from_numpy(table[:, 3:6]) / 255
    views.sort(key=lambda v: v.path)
    return SceneData(tuple(views), pts, cols, "colmap")
