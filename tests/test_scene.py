"""DeblurGS building blocks: SE(3), our rasteriser (against a dense reference, values and
gradients), the scene readers, the .ply, the scene config and the synthetic scenes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deblur import config as config_mod
from deblur.config import SceneConfig
from deblur.errors import ConfigError, SceneError
from deblur.scene.gaussians import (PLY_FIELDS, SH_C0, Gaussians, gaussians_from_ply,
                                    ply_bytes, read_ply_vertices)
from deblur.scene.optimise import grad_threshold
from deblur.scene.raster import MAX_ALPHA, MIN_ALPHA, Camera, project, render
from deblur.scene.readers import read_colmap, read_scene, read_transforms
from deblur.scene.se3 import (interpolate, invert, rotation_angle, se3_exp, se3_log,
                              so3_exp)


def _random_gaussians(count: int, seed: int = 0, dtype: torch.dtype = torch.float64
                      ) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, dtype=dtype)

    return Gaussians(means=(rand(count, 3) - 0.5) * torch.tensor([2.0, 1.5, 1.0], dtype=dtype)
                     + torch.tensor([0, 0, 4.0], dtype=dtype),
                     log_scales=torch.log(0.05 + 0.15 * rand(count, 3)),
                     quats=rand(count, 4) - 0.5,
                     opacity_logits=(rand(count) - 0.3) * 4,
                     f_dc=(rand(count, 3) - 0.5) / SH_C0)


def _dense_reference(g: Gaussians, w2c: torch.Tensor, camera: Camera) -> torch.Tensor:
    """Every pixel against every Gaussian, sorted by depth: the textbook formula."""
    means2d, conics, depth, _ = project(g, w2c, camera)
    ys, xs = torch.meshgrid(torch.arange(camera.height, dtype=means2d.dtype),
                            torch.arange(camera.width, dtype=means2d.dtype), indexing="ij")
    pix = torch.stack([xs + 0.5, ys + 0.5], -1).reshape(-1, 2)  # (P, 2)
    images = []
    for s in range(len(w2c)):
        order = torch.argsort(depth[s])
        m, c = means2d[s][order], conics[s][order]
        d = pix[:, None] - m[None]  # (P, G, 2)
        power = -0.5 * (c[:, 0] * d[..., 0] ** 2 + c[:, 2] * d[..., 1] ** 2) \
            - c[:, 1] * d[..., 0] * d[..., 1]
        alpha = (g.opacities()[order] * torch.exp(power.clamp_max(0))).clamp_max(MAX_ALPHA)
        # the reference keeps only pixels inside the 3-sigma box, as gsplat and 3DGS do
        det = c[:, 0] * c[:, 2] - c[:, 1] ** 2
        inside = (d[..., 0].abs() <= 3 * torch.sqrt(c[:, 2] / det)) & \
            (d[..., 1].abs() <= 3 * torch.sqrt(c[:, 0] / det)) & (depth[s][order] > 0.01)
        alpha = torch.where(inside & (alpha >= MIN_ALPHA), alpha, torch.zeros_like(alpha))
        trans = torch.cumprod(1 - alpha, 1)
        before = torch.cat([torch.ones_like(trans[:, :1]), trans[:, :-1]], 1)
        images.append(((alpha * before) @ g.colours()[order]).reshape(
            camera.height, camera.width, 3))
    return torch.stack(images)


CAMERA = Camera(20.0, 21.0, 12.5, 9.0, 24, 18)


def test_rasteriser_matches_dense_reference_values_and_gradients() -> None:
    g = _random_gaussians(60)
    for t in g.tensors().values():
        t.requires_grad_(True)
    w2c = se3_exp(torch.tensor([[0.0, 0, 0, 0, 0, 0], [0.05, -0.02, 0.1, 0.02, -0.03, 0.01]],
                               dtype=torch.float64))
    ours = render(g, w2c, CAMERA).images
    ref = _dense_reference(g, w2c, CAMERA)
    assert ours.shape == (2, 18, 24, 3)
    assert ours.abs().sum() > 1  # something was drawn
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=1e-7)
    weight = torch.rand(ours.shape, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)
    ours_grads = torch.autograd.grad((ours * weight).sum(), list(g.tensors().values()))
    ref_grads = torch.autograd.grad((ref * weight).sum(), list(g.tensors().values()))
    for name, a, b in zip(Gaussians.NAMES, ours_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-6, msg=f"gradient of {name}")


def test_rasteriser_gradient_matches_finite_differences() -> None:
    g = _random_gaussians(25, seed=3)
    w2c = torch.eye(4, dtype=torch.float64)[None]
    weight = torch.rand(1, 18, 24, 3, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64)
    g.means.requires_grad_(True)
    grad = torch.autograd.grad((render(g, w2c, CAMERA).images * weight).sum(), g.means)[0]
    eps = 1e-6
    for index in [(0, 0), (3, 1), (7, 2), (11, 0)]:
        with torch.no_grad():
            g.means[index] += eps
            up = (render(g, w2c, CAMERA).images * weight).sum()
            g.means[index] -= 2 * eps
            down = (render(g, w2c, CAMERA).images * weight).sum()
            g.means[index] += eps
        assert float((up - down) / (2 * eps)) == pytest.approx(float(grad[index]), rel=1e-3,
                                                               abs=1e-6)


def test_rasteriser_occlusion_front_gaussian_wins() -> None:
    """An opaque red Gaussian in front of a green one hides it at the centre pixel."""
    g = Gaussians(means=torch.tensor([[0.0, 0, 5], [0.0, 0, 3]]),
                  log_scales=torch.log(torch.full((2, 3), 0.5)),
                  quats=torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]),
                  opacity_logits=torch.tensor([10.0, 10.0]),
                  f_dc=(torch.tensor([[0.0, 1, 0], [1.0, 0, 0]]) - 0.5) / SH_C0)
    image = render(g, torch.eye(4)[None], CAMERA).images[0]
    centre = image[9, 12]
    assert centre[0] > 0.95 and centre[1] < 0.05


def test_se3_exp_log_round_trip_and_interpolation() -> None:
    xi = torch.tensor([[0.3, -0.2, 0.5, 0.4, -0.1, 0.2], [0.0, 0, 0, 0, 0, 0],
                       [1e-6, 0, 0, 0, 2e-6, 0]], dtype=torch.float64)
    pose = se3_exp(xi)
    torch.testing.assert_close(se3_log(pose), xi, atol=1e-9, rtol=1e-7)
    rot = pose[:, :3, :3]
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64)
                               .expand(3, 3, 3), atol=1e-12, rtol=0)
    torch.testing.assert_close(invert(pose[0]) @ pose[0], torch.eye(4, dtype=torch.float64))
    start, end = se3_exp(xi[1]), se3_exp(xi[0])
    path = interpolate(start, end, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(path[0], start)
    torch.testing.assert_close(path[2], end)
    torch.testing.assert_close(path[1], se3_exp(xi[0] / 2))  # from the identity: half twist
    assert float(rotation_angle(so3_exp(torch.tensor([0.0, 0, 0.3])),
                                torch.eye(3))) == pytest.approx(0.3, rel=1e-5)


def test_se3_exp_gradient_is_finite_at_zero_motion() -> None:
    xi = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: se3_exp(v), (xi,))
    xi2 = torch.tensor([0.1, 0.2, -0.1, 0.3, 0.2, -0.4], dtype=torch.float64,
                       requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: se3_exp(v), (xi2,))


def test_ply_round_trip_in_the_3dgs_layout() -> None:
    g = _random_gaussians(17, dtype=torch.float32)
    data = ply_bytes(g)
    header = data[:data.index(b"end_header")].decode()
    assert "format binary_little_endian 1.0" in header and "element vertex 17" in header
    assert [line.split()[-1] for line in header.splitlines() if line.startswith("property")] \
        == list(PLY_FIELDS)
    back = gaussians_from_ply(data)
    for name in ("means", "log_scales", "opacity_logits", "f_dc"):
        torch.testing.assert_close(getattr(back, name), getattr(g, name))
    torch.testing.assert_close(back.quats, torch.nn.functional.normalize(g.quats, dim=-1))
    with pytest.raises(SceneError, match="truncated"):
        gaussians_from_ply(data[:-10])
    with pytest.raises(SceneError, match="not a .ply"):
        read_ply_vertices(b"solid cube", "x.stl")


def _c2w_gl(w2c: torch.Tensor) -> list[list[float]]:
    return (invert(w2c.double()) @ torch.diag(torch.tensor([1.0, -1, -1, 1],
                                                           dtype=torch.float64))).tolist()


def test_transforms_and_colmap_readers_agree_on_poses() -> None:
    w2c = se3_exp(torch.tensor([[0.1, -0.2, 0.3, 0.05, 0.1, -0.02],
                                [-0.3, 0.1, 0.2, -0.04, 0.02, 0.1]], dtype=torch.float64))
    doc = {"fl_x": 50.0, "fl_y": 52.0, "cx": 32.0, "cy": 24.0, "w": 64, "h": 48,
           "frames": [{"file_path": f"images/v{i}.png", "transform_matrix": _c2w_gl(p)}
                      for i, p in enumerate(w2c)]}
    scene = read_transforms(json.dumps(doc).encode(), lambda p: b"", "s")
    assert [v.path for v in scene.views] == ["images/v0.png", "images/v1.png"]
    torch.testing.assert_close(torch.stack([v.w2c for v in scene.views]), w2c.float(),
                               atol=1e-5, rtol=0)
    # intrinsics follow a downscaled image
    assert scene.views[0].intrinsics.camera(32, 24) == Camera(25.0, 26.0, 16.0, 12.0, 32, 24)

    def quat(rot: torch.Tensor) -> list[float]:  # rotation -> (w, x, y, z)
        w = math.sqrt(max(0.0, 1 + float(rot.trace()))) / 2
        return [w, float(rot[2, 1] - rot[1, 2]) / (4 * w),
                float(rot[0, 2] - rot[2, 0]) / (4 * w), float(rot[1, 0] - rot[0, 1]) / (4 * w)]

    images = "# comment\n" + "".join(
        f"{i + 1} {' '.join(map(str, quat(p[:3, :3])))} {' '.join(map(str, p[:3, 3].tolist()))}"
        f" 1 v{i}.png\n{'1.0 2.0 5' if i else ''}\n" for i, p in enumerate(w2c))
    cameras = b"# Camera list\n1 PINHOLE 64 48 50 52 32 24\n"
    points = b"1 0.5 0.25 4 255 0 128 0.1 1 2\n2 -0.5 0 5 0 255 0 0.2\n"
    colmap = read_colmap(cameras, images.encode(), points, "s")
    assert [v.path for v in colmap.views] == ["images/v0.png", "images/v1.png"]
    torch.testing.assert_close(torch.stack([v.w2c for v in colmap.views]), w2c.float(),
                               atol=1e-5, rtol=0)
    assert colmap.views[0].intrinsics.camera(64, 48) == Camera(50, 52, 32, 24, 64, 48)
    torch.testing.assert_close(colmap.points[0], torch.tensor([0.5, 0.25, 4]))
    torch.testing.assert_close(colmap.colours[0], torch.tensor([1.0, 0, 128 / 255]))


def test_nerf_synthetic_transforms_and_missing_poses() -> None:
    doc = {"camera_angle_x": 0.69, "frames": [
        {"file_path": "./train/r_0", "transform_matrix": torch.eye(4).tolist()}]}
    scene = read_transforms(json.dumps(doc).encode(), lambda p: b"", "lego")
    assert scene.views[0].path == "train/r_0.png"
    cam = scene.views[0].intrinsics.camera(800, 800)
    assert cam.fx == pytest.approx(400 / math.tan(0.345))
    with pytest.raises(SceneError, match="no poses") as err:
        read_scene({"images/a.png"}, lambda p: b"", "scenes/a")
    assert err.value.reason == "no_poses"
    with pytest.raises(SceneError, match="transform_matrix"):
        read_transforms(json.dumps({"fl_x": 1, "frames": [{"file_path": "a.png"}]}).encode(),
                        lambda p: b"", "s")


def test_scene_config_defaults_and_refusals(tmp_path) -> None:
    job = config_mod.load(None, {"model.name": "deblurgs", "scene.steps": 500,
                                 "scene.subframes": 5})
    assert job.scene.steps == 500 and job.scene.subframes == 5
    assert SceneConfig().ssim_lambda == 0.2 and SceneConfig().densify_grad_end == 0.0002
    bad = {"scene.subframes": 0, "scene.resolution_scale": 1.5, "scene.rasteriser": "vulkan",
           "scene.densify_grad_start": 0.00001, "scene.lr_pose": 0.0, "scene.min_views": 1}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=key):
            config_mod.load(None, {"model.name": "deblurgs", key: value})
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  name: deblurgs\nscene:\n  steps: 10\n  bogus: 1\n")
    with pytest.raises(ConfigError, match="scene.bogus"):
        config_mod.load(path)
    with pytest.raises(ConfigError, match="plan_tasks: 0"):
        config_mod.load(None, {"model.name": "deblurgs", "plan_tasks": 4})
    with pytest.raises(ConfigError, match="drop --weights"):
        config_mod.load(None, {"model.name": "deblurgs", "model.weights": "w.safetensors"})


def test_densification_annealing_threshold_decays_from_start_to_end() -> None:
    config = SceneConfig(densify_from=100, densify_anneal_until=1100,
                         densify_grad_start=0.002, densify_grad_end=0.0002)
    values = [grad_threshold(step, config) for step in (0, 100, 600, 1100, 5000)]
    assert values[0] == values[1] == pytest.approx(0.002)
    assert values[2] == pytest.approx(math.sqrt(0.002 * 0.0002))  # log-linear midpoint
    assert values[3] == values[4] == pytest.approx(0.0002)


def test_synthetic_scenes_written_and_read_back(tmp_path) -> None:
    from deblur.dev.scenes import write_scenes

    (base,) = write_scenes(tmp_path / "scenes", count=1, views=3, width=32, height=24)
    paths = {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()}
    assert paths == {"transforms.json", "points3D.ply", "images/view_000.png",
                     "images/view_001.png", "images/view_002.png"}
    scene = read_scene(paths, lambda p: (base / p).read_bytes(), str(base))
    ref_base = tmp_path / "scenes-reference" / "scene_000"
    truth = read_scene({"transforms.json"}, lambda p: (ref_base / p).read_bytes(), "ref")
    assert len(scene.views) == 3 and scene.points is not None and len(scene.points) > 100
    assert scene.colours is not None and float(scene.colours.max()) <= 1
    noisy = torch.stack([v.w2c for v in scene.views])
    true = torch.stack([v.w2c for v in truth.views])
    assert float((noisy - true).abs().max()) > 1e-3  # poses carry noise ...
    assert float((noisy - true).abs().max()) < 0.2  # ... of a realistic size
    assert (ref_base / "images" / "view_000.png").exists()


def test_samples_scenes_command(tmp_path) -> None:
    from typer.testing import CliRunner

    from deblur.cli import app

    done = CliRunner().invoke(app, ["samples", "--scenes", "1", "--views", "2", "--size",
                                    "24x16", str(tmp_path / "s")])
    assert done.exit_code == 0, done.output
    doc = json.loads((tmp_path / "s/scene_000/transforms.json").read_text())
    assert len(doc["frames"]) == 2 and (doc["w"], doc["h"]) == (24, 16)
    bad = CliRunner().invoke(app, ["samples", "--scenes", "1", "--size", "big",
                                   str(tmp_path / "t")])
    assert bad.exit_code == 2 and "WIDTHxHEIGHT" in bad.output


def test_shipped_scene_configs() -> None:
    """configs/scene-cpu.yaml loads as a scene job; default.yaml's scene: section says the
    defaults (a YAML that drifted from the code would silently change jobs that copy it)."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1] / "configs"
    job = config_mod.load(root / "scene-cpu.yaml")
    assert job.model.name == "deblurgs" and job.scene.steps == 300
    documented = yaml.safe_load((root / "default.yaml").read_text())["scene"]
    assert documented == {f: getattr(SceneConfig(), f) for f in documented}
    assert set(documented) == set(SceneConfig.__dataclass_fields__)


def test_a_non_finite_loss_fails_the_scene_with_its_reason() -> None:
    from deblur.scene.optimise import fit_scene

    g = _random_gaussians(30, dtype=torch.float32)
    image = torch.full((18, 24, 3), float("nan"))
    with pytest.raises(SceneError, match="lower scene.lr_means") as err:
        fit_scene(g, [image, image], [CAMERA, CAMERA], torch.eye(4)[None].repeat(2, 1, 1),
                  SceneConfig(steps=3, subframes=2))
    assert err.value.reason == "non_finite_loss"
