"""Rigid poses: the SE(3) exponential and logarithm, and interpolation between two poses.

Poses are world-to-camera 4x4 matrices in the OpenCV convention (x right, y down, z forward).
A twist ``xi`` is ``(rho, omega)``: translation part first, rotation part last. Everything is
batched over leading dimensions and differentiable (the small-angle branches use the Taylor
series, so the gradient at zero motion is finite: a view's motion starts there).
"""

from __future__ import annotations

import torch

_SMALL = 1e-4  # below this angle (rad) the closed forms lose precision: use the series


def hat(omega: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) skew-symmetric matrices."""
    x, y, z = omega.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(
        *omega.shape[:-1], 3, 3)


def _coefficients(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A = sin t / t, B = (1 - cos t) / t^2, C = (t - sin t) / t^3, safe at t = 0."""
    small = theta < _SMALL
    t = torch.where(small, torch.ones_like(theta), theta)  # no 0/0 in the unused branch
    t2 = theta * theta
    a = torch.where(small, 1 - t2 / 6, torch.sin(t) / t)
    b = torch.where(small, 0.5 - t2 / 24, (1 - torch.cos(t)) / (t * t))
    c = torch.where(small, 1 / 6 - t2 / 120, (t - torch.sin(t)) / (t * t * t))
    return a, b, c


def so3_exp(omega: torch.Tensor) -> torch.Tensor:
    """(..., 3) axis-angle -> (..., 3, 3) rotation (Rodrigues)."""
    theta = omega.norm(dim=-1)
    a, b, _ = _coefficients(theta)
    k = hat(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand_as(k)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def se3_exp(xi: torch.Tensor) -> torch.Tensor:
    """(..., 6) twists -> (..., 4, 4) rigid transforms."""
    rho, omega = xi[..., :3], xi[..., 3:]
    theta = omega.norm(dim=-1)
    a, b, c = _coefficients(theta)
    k = hat(omega)
    k2 = k @ k
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device).expand_as(k)
    rot = eye + a[..., None, None] * k + b[..., None, None] * k2
    v = eye + b[..., None, None] * k + c[..., None, None] * k2
    out = torch.zeros(*xi.shape[:-1], 4, 4, dtype=xi.dtype, device=xi.device)
    out[..., :3, :3] = rot
    out[..., :3, 3] = (v @ rho[..., None])[..., 0]
    out[..., 3, 3] = 1
    return out


def so3_log(rot: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotations -> (..., 3) axis-angle, for angles below pi (not differentiated)."""
    cos = ((rot.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    theta = torch.acos(cos)
    vee = torch.stack([rot[..., 2, 1] - rot[..., 1, 2], rot[..., 0, 2] - rot[..., 2, 0],
                       rot[..., 1, 0] - rot[..., 0, 1]], -1)
    a, _, _ = _coefficients(theta)
    return vee / (2 * a[..., None])


def se3_log(pose: torch.Tensor) -> torch.Tensor:
    """(..., 4, 4) rigid transforms -> (..., 6) twists; the inverse of ``se3_exp``."""
    omega = so3_log(pose[..., :3, :3])
    theta = omega.norm(dim=-1)
    a, b, _ = _coefficients(theta)
    k = hat(omega)
    eye = torch.eye(3, dtype=pose.dtype, device=pose.device).expand_as(k)
    # V^-1 = I - K/2 + (1 - A / (2B)) / theta^2 K^2; the bracket tends to 1/12 at theta = 0
    t2 = torch.where(theta < _SMALL, torch.ones_like(theta), theta * theta)
    d = torch.where(theta < _SMALL, torch.full_like(theta, 1 / 12), (1 - a / (2 * b)) / t2)
    v_inv = eye - 0.5 * k + d[..., None, None] * (k @ k)
    rho = (v_inv @ pose[..., :3, 3:4])[..., 0]
    return torch.cat([rho, omega], -1)


def invert(pose: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms (..., 4, 4) without a general matrix inverse."""
    rot_t = pose[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(pose)
    out[..., :3, :3] = rot_t
    out[..., :3, 3] = -(rot_t @ pose[..., :3, 3:4])[..., 0]
    out[..., 3, 3] = 1
    return out


def interpolate(start: torch.Tensor, end: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Poses along the geodesic from ``start`` (t=0) to ``end`` (t=1): (4, 4) x (T,) -> (T, 4, 4).

    ``start @ exp(t log(start^-1 end))``: constant velocity in the body frame, the camera
    motion during one exposure in DeblurGS (a first-order curve in the Lie algebra).
    """
    delta = se3_log(invert(start) @ end)  # (6,)
    return start @ se3_exp(t[:, None] * delta)


def rotation_angle(rot_a: torch.Tensor, rot_b: torch.Tensor) -> torch.Tensor:
    """Angle (rad) of the rotation between ``rot_a`` and ``rot_b`` (..., 3, 3)."""
    rel = rot_a.transpose(-1, -2) @ rot_b
    return torch.acos(((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1))


def camera_centre(pose: torch.Tensor) -> torch.Tensor:
    """World position of the camera of world-to-camera ``pose`` (..., 4, 4) -> (..., 3)."""
    return invert(pose)[..., :3, 3]


def quaternion_to_matrix(quat: torch.Tensor) -> torch.Tensor:
    """(..., 4) quaternions (w, x, y, z; normalised here) -> (..., 3, 3) rotations."""
    w, x, y, z = torch.nn.functional.normalize(quat, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        -1).reshape(*quat.shape[:-1], 3, 3)
