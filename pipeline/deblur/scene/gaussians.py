"""The scene: 3D Gaussians (Kerbl et al. 2023), and their standard 3DGS ``.ply``.

Each Gaussian has a mean, log-scales (three axes), a rotation quaternion (w, x, y, z), an
opacity logit and a colour as the degree-0 spherical-harmonic coefficient ``f_dc`` (so the
.ply opens in common splat viewers: colour = 0.5 + SH_C0 * f_dc). Parameters are stored in
the representation the optimiser works on; the activations live here, in one place.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from deblur.errors import SceneError
from deblur.scene.se3 import quaternion_to_matrix

SH_C0 = 0.28209479177387814  # the degree-0 real spherical harmonic, 1 / (2 sqrt(pi))

PLY_FIELDS = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
              "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
"""The 3DGS layout (degree-0 colour only): what the reference implementation writes and
viewers read; normals are zeros, as there."""


@dataclass
class Gaussians:
    """Tensors of one scene, G Gaussians; each a leaf the optimiser owns.

    Args:
        means: (G, 3) centres in world units.
        log_scales: (G, 3) log standard deviations along the Gaussian's axes.
        quats: (G, 4) rotations (w, x, y, z), normalised when used.
        opacity_logits: (G,) logit of the opacity.
        f_dc: (G, 3) degree-0 SH colour coefficients.
    """

    means: torch.Tensor
    log_scales: torch.Tensor
    quats: torch.Tensor
    opacity_logits: torch.Tensor
    f_dc: torch.Tensor

    NAMES = ("means", "log_scales", "quats", "opacity_logits", "f_dc")

    def __len__(self) -> int:
        return self.means.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.NAMES}

    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.opacity_logits)

    def colours(self) -> torch.Tensor:
        """(G, 3) RGB in [0, 1]-ish; not clamped above (the renderer clamps the image)."""
        return (0.5 + SH_C0 * self.f_dc).clamp_min(0)

    def covariances(self) -> torch.Tensor:
        """(G, 3, 3) world covariances R S S^T R^T."""
        rot = quaternion_to_matrix(self.quats)
        rs = rot * torch.exp(self.log_scales)[:, None, :]  # R @ diag(s)
        return rs @ rs.transpose(-1, -2)

    @classmethod
    def from_points(cls, points: torch.Tensor, colours: torch.Tensor,
                    opacity: float = 0.1) -> Gaussians:
        """Isotropic Gaussians on points (G, 3) with colours (G, 3) in [0, 1].

        Each scale is the mean distance to its three nearest neighbours, as 3DGS initialises
        from a structure-from-motion cloud, so the cloud covers its surfaces without holes.
        """
        points = points.float()
        dist = torch.cdist(points, points)
        dist.fill_diagonal_(float("inf"))
        k = min(3, max(1, len(points) - 1))
        near = dist.topk(k, largest=False).values.mean(-1).clamp_min(1e-4)
        count = len(points)
        quats = torch.zeros(count, 4)
        quats[:, 0] = 1
        return cls(means=points.clone(),
                   log_scales=torch.log(near)[:, None].repeat(1, 3),
                   quats=quats,
                   opacity_logits=torch.full((count,), float(np.log(opacity / (1 - opacity)))),
                   f_dc=(colours.float().clamp(0, 1) - 0.5) / SH_C0)


def ply_table_bytes(columns: dict[str, np.ndarray]) -> bytes:
    """Named equal-length columns (float32 or uint8) as a binary little-endian .ply."""
    names = list(columns)
    count = len(columns[names[0]])
    kinds = {np.dtype(np.uint8): ("uchar", "u1"), np.dtype(np.float32): ("float", "<f4")}
    dtype = np.dtype([(n, kinds[columns[n].dtype][1]) for n in names])
    table = np.empty(count, dtype=dtype)
    for name in names:
        table[name] = columns[name]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {count}"]
    header += [f"property {kinds[columns[n].dtype][0]} {n}" for n in names]
    header.append("end_header")
    return ("\n".join(header) + "\n").encode("ascii") + table.tobytes()


def ply_bytes(gaussians: Gaussians) -> bytes:
    """The scene as a binary little-endian .ply in the 3DGS layout."""
    with torch.no_grad():
        g = len(gaussians)
        columns = [gaussians.means, torch.zeros(g, 3), gaussians.f_dc,
                   gaussians.opacity_logits[:, None], gaussians.log_scales,
                   torch.nn.functional.normalize(gaussians.quats, dim=-1)]
        data = torch.cat([c.detach().float().cpu() for c in columns], 1).numpy()
    return ply_table_bytes({name: np.ascontiguousarray(data[:, i])
                            for i, name in enumerate(PLY_FIELDS)})


_PLY_TYPES = {"float": "f4", "float32": "f4", "double": "f8", "float64": "f8", "uchar": "u1",
              "uint8": "u1", "char": "i1", "int8": "i1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4",
              "uint32": "u4"}


def read_ply_vertices(data: bytes, name: str) -> dict[str, np.ndarray]:
    """The vertex element of a binary little-endian or ASCII .ply as named columns.

    Enough for our own files and for point clouds beside a scene (x y z, red green blue);
    list properties (faces) are not read. Errors name the file and what is wrong.
    """
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise SceneError("bad_scene", f"{name}: not a .ply file (no 'ply' magic / end_header)")
    lines = data[:end].decode("ascii", "replace").splitlines()
    body = data[data.index(b"\n", end) + 1:]
    fmt, count, props, in_vertex = "", 0, [], False
    for line in lines:
        parts = line.split()
        if parts[:1] == ["format"]:
            fmt = parts[1]
        elif parts[:1] == ["element"]:
            in_vertex = parts[1] == "vertex"
            if in_vertex:
                count = int(parts[2])
        elif parts[:1] == ["property"] and in_vertex:
            if parts[1] == "list" or parts[1] not in _PLY_TYPES:
                raise SceneError("bad_scene",
                                 f"{name}: vertex property {line.strip()!r} is not supported")
            props.append((parts[2], _PLY_TYPES[parts[1]]))
    if fmt == "ascii":
        table = np.loadtxt(io.StringIO(body.decode("ascii")), ndmin=2, max_rows=count)
        return {p: table[:, i] for i, (p, _) in enumerate(props)}
    if fmt != "binary_little_endian":
        raise SceneError("bad_scene", f"{name}: .ply format {fmt!r} is not supported: write "
                         "binary_little_endian or ascii")
    dtype = np.dtype([(p, "<" + t) for p, t in props])
    if len(body) < dtype.itemsize * count:
        raise SceneError("bad_scene",
                         f"{name}: truncated .ply ({len(body)} bytes for {count} vertices)")
    table = np.frombuffer(body, dtype=dtype, count=count)
    return {p: np.asarray(table[p]) for p, _ in props}


def gaussians_from_ply(data: bytes, name: str = "scene.ply") -> Gaussians:
    """Read back a .ply written by ``ply_bytes`` (or any 3DGS .ply, higher SH ignored)."""
    cols = read_ply_vertices(data, name)
    missing = [f for f in PLY_FIELDS if f not in cols and not f.startswith("n")]
    if missing:
        raise SceneError("bad_scene", f"{name}: not a 3DGS .ply: missing {', '.join(missing)}")

    def stack(*names: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([cols[n] for n in names], 1).astype(np.float32))

    return Gaussians(means=stack("x", "y", "z"),
                     log_scales=stack("scale_0", "scale_1", "scale_2"),
                     quats=stack("rot_0", "rot_1", "rot_2", "rot_3"),
                     opacity_logits=torch.from_numpy(cols["opacity"].astype(np.float32)),
                     f_dc=stack("f_dc_0", "f_dc_1", "f_dc_2"))
