"""Scene jobs on the worker side: one shard is one scene, fitted with DeblurGS.

``SceneProcessor.process`` finds the scene folder of the shard's views (the nearest folder
above them with ``transforms.json`` or a COLMAP text model), reads the poses, decodes every
view that has one, fits the Gaussians and each view's camera motion (``scene/optimise.py``),
writes each pending view's sharp render at its output key, the scene's ``scene.ply`` and
``trajectories.json`` under ``<job_root>/scenes/NNNNN/``, and commits one result row per view
through the ledger like any shard. A scene that cannot be fitted (no poses, too few views,
a non-finite loss, out of memory) is failed rows with the reason, never an exception out of
the shard. On a rerun only the views whose rows failed are written, but every view with a
pose still takes part in the fit: an ok image is never rewritten.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from deblur.config import JobConfig, from_dict
from deblur.errors import ImageError, NotFoundError, SceneError, one_line
from deblur.io.codec import content_type, decode, encode
from deblur.io.storage import Storage, as_folder, get_storage
from deblur.job.ledger import Ledger
from deblur.job.results import RESULT_SCHEMA, result_row
from deblur.observe.quality import psnr, ssim
from deblur.scene.gaussians import Gaussians, ply_bytes
from deblur.scene.optimise import SceneFit, fit_scene, render_views
from deblur.scene.raster import renderer_for
from deblur.scene.readers import COLMAP_DIRS, SceneData, read_scene
from deblur.run.worker import worker_name
from deblur.scene.se3 import camera_centre

log = logging.getLogger("deblur.run.scene_worker")

POSE_FILES = ("transforms.json",) + tuple(f"{d}/images.txt" for d in COLMAP_DIRS)
FOLDERS_UP = 3  # how far above a view its scene folder may be (scene/images/x.png: 1)
RANDOM_POINTS = 5_000  # Gaussians a scene without a point cloud starts from


def scene_files_folder(job_root: str, shard_id: int) -> str:
    """Where a scene's .ply and trajectories go: ``<job_root>/scenes/NNNNN/``."""
    return as_folder(job_root) + f"scenes/{shard_id:05d}/"


def find_scene_folder(storage: Storage, keys: list[str]) -> str | None:
    """The nearest folder above the views that holds poses; None if there is none."""
    folder = keys[0].rsplit("/", 1)[0]
    for key in keys[1:]:  # the views' common folder
        while not key.startswith(folder + "/") and "/" in folder:
            folder = folder.rsplit("/", 1)[0]
    for _ in range(FOLDERS_UP + 1):
        if any(storage.exists(f"{folder}/{name}") for name in POSE_FILES):
            return folder + "/"
        if "/" not in folder.strip("/"):
            return None
        folder = folder.rsplit("/", 1)[0]
    return None


def initial_gaussians(scene: SceneData, w2c: torch.Tensor, seed: int) -> Gaussians:
    """The scene's point cloud, or random points around where the cameras look (3DGS starts
    synthetic scenes from a random cloud the same way)."""
    if scene.points is not None and len(scene.points) >= 4:
        colours = scene.colours if scene.colours is not None else torch.full_like(
            scene.points, 0.5)
        return Gaussians.from_points(scene.points, colours)
    gen = torch.Generator().manual_seed(seed)
    centres = camera_centre(w2c)
    forward = w2c[:, 2, :3]  # each camera's viewing direction in the world
    radius = float((centres - centres.mean(0)).norm(dim=1).max().clamp_min(1.0))
    focus = (centres + radius * forward).mean(0)
    points = focus + radius * (torch.rand(RANDOM_POINTS, 3, generator=gen) * 2 - 1)
    return Gaussians.from_points(points, torch.rand(RANDOM_POINTS, 3, generator=gen))


class SceneProcessor:
    """Fits the scenes of a job, one shard at a time (plain Python, tested without Ray).

    Args:
        config: the job's configuration (its ``scene:`` section, codec, storage, worker).
        worker_id: this worker's name in result rows.
    """

    def __init__(self, config: JobConfig, worker_id: str) -> None:
        self.config = config
        self.worker_id = worker_id
        self.storage = get_storage(config.storage)
        wanted = config.model.device
        self.device = torch.device("cuda" if wanted == "cuda" or (
            wanted == "auto" and torch.cuda.is_available()) else "cpu")
        self.renderer, line = renderer_for(self.device, config.scene.rasteriser)
        log.info(line)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(config.worker.cpus_per_worker)))
        self.unhealthy: str | None = None
        self.current: dict[str, Any] = {}  # the scene being fitted: shard, step, Gaussians

    def process(self, job_root: str, shard_id: int, attempt: int) -> dict[str, Any]:
        started = time.perf_counter()
        ledger = Ledger(self.storage, job_root)
        pending, previous = ledger.pending(shard_id)
        planned_ids = pending["row_id"] if previous is None else None
        tries = {} if previous is None else dict(zip(previous["row_id"].to_pylist(),
                                                     previous["attempt"].to_pylist()))
        rows = ledger.read_shard(shard_id).to_pylist()
        wanted = set(pending["row_id"].to_pylist())
        results, scene_info = self._scene(job_root, shard_id, rows, wanted)
        for result in results:
            result["attempt"] = attempt + (tries.get(result["row_id"]) or 0)
        summary = ledger.commit(shard_id, pa.Table.from_pylist(results, schema=RESULT_SCHEMA),
                                planned_ids)
        ok = sum(r["status"] == "ok" for r in results)
        reasons: dict[str, int] = {}
        for r in results:
            if r["status"] != "ok":
                reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        wall = time.perf_counter() - started
        return {"shard": shard_id, "rows": len(results), "ok": ok, "failed": len(results) - ok,
                "seconds": wall, "worker": self.worker_id, "attempt": attempt,
                "summary": summary,
                "metrics": {"wall_s": wall, "reasons": reasons,
                            "bytes_in": sum(r["bytes_in"] or 0 for r in results),
                            "bytes_out": sum(r["bytes_out"] or 0 for r in results),
                            "scene": scene_info}}

    def process_rows(self, job_root: str, shard_id: int, attempt: int,
                     row_ids: list[int]) -> list[dict[str, Any]]:
        """Result rows of these views, uncommitted: what the pool asks of a shard that kept
        killing its workers (a scene cannot be cut into images: the whole scene is fitted
        once more and only these rows are answered)."""
        rows = Ledger(self.storage, job_root).read_shard(shard_id).to_pylist()
        results, _ = self._scene(job_root, shard_id, rows, set(row_ids))
        for result in results:
            result["attempt"] = attempt
        return results

    # -- one scene ---------------------------------------------------------------------------

    def _scene(self, job_root: str, shard_id: int, rows: list[dict[str, Any]],
               wanted: set[int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Result rows for the ``wanted`` rows of one scene, and the scene's figures."""
        answers: dict[int, dict[str, Any]] = {}

        def fail(row: dict[str, Any], exc: ImageError) -> None:
            answers[row["row_id"]] = result_row(
                row, attempt=0, worker=self.worker_id, status="failed", reason=exc.reason,
                error=f"{row['key']}: {exc.args[0]}", finished_at=time.time())

        usable = []
        for row in rows:
            if row.get("error"):  # refused at planning (invalid key, duplicate, …)
                reason, _, message = row["error"].partition(": ")
                fail(row, ImageError(reason, message))
            else:
                usable.append(row)
        info: dict[str, Any] = {}
        if usable:
            try:
                info = self._fit_and_write(job_root, shard_id, usable, wanted, answers, fail)
            except SceneError as exc:
                for row in usable:
                    if row["row_id"] not in answers:
                        fail(row, exc)
        return [answers[row["row_id"]] for row in rows if row["row_id"] in wanted], info

    def _fit_and_write(self, job_root: str, shard_id: int, rows: list[dict[str, Any]],
                       wanted: set[int], answers: dict[int, dict[str, Any]], fail: Any
                       ) -> dict[str, Any]:
        config = self.config.scene
        folder = find_scene_folder(self.storage, [r["key"] for r in rows])
        if folder is None:
            raise SceneError("no_poses", "no poses for this view's scene: put transforms.json "
                             "or sparse/0/{cameras,images,points3D}.txt in its scene folder")
        paths = {info.key for info in self.storage.list(folder)}
        scene = read_scene(paths, lambda rel: self._scene_file(folder, rel), folder)
        by_path = {view.path: view for view in scene.views}
        views, images, cameras, inputs = [], [], [], []
        for row in rows:
            view = by_path.get(row["key"][len(folder):])
            if view is None:
                fail(row, SceneError("no_poses", f"no pose for this view in {folder}: add it "
                                     "to the scene's poses or move it out of the folder"))
                continue
            data = self.storage.get(row["key"])
            try:
                image = decode(data, row["key"], self.config.codec)
            except ImageError as exc:
                fail(row, exc)
                continue
            pixels = np.asarray(image.pixels)[..., :3]
            full = view.intrinsics.camera(image.width, image.height)
            small = full.scaled(config.resolution_scale)
            tensor = torch.from_numpy(pixels.astype(np.float32) / np.iinfo(pixels.dtype).max)
            if (small.width, small.height) != (image.width, image.height):
                tensor = torch.nn.functional.interpolate(
                    tensor.permute(2, 0, 1)[None], size=(small.height, small.width),
                    mode="area")[0].permute(1, 2, 0)
            views.append((row, view, image, full, len(data)))
            images.append(tensor.to(self.device))
            cameras.append(small)
            inputs.append(pixels)
        if len(views) < config.min_views:
            raise SceneError("too_few_views", f"{len(views)} view(s) with poses that decode in "
                             f"{folder}; a scene needs at least scene.min_views="
                             f"{config.min_views}")
        w2c = torch.stack([v.w2c for _, v, _, _, _ in views]).to(self.device)
        gaussians = initial_gaussians(scene, w2c.cpu(), config.seed)
        gaussians = type(gaussians)(**{n: t.to(self.device)
                                       for n, t in gaussians.tensors().items()})
        self.current = {"shard": shard_id, "step": 0, "steps": config.steps,
                        "gaussians": len(gaussians)}

        def on_step(step: int, count: int) -> None:
            self.current.update(step=step, gaussians=count)

        try:
            fit = fit_scene(gaussians, images, cameras, w2c, config, self.renderer, on_step)
            outputs = render_views(fit, [full for _, _, _, full, _ in views], self.renderer)
        except torch.OutOfMemoryError as exc:
            raise SceneError("out_of_memory", f"{folder} does not fit in memory ({one_line(exc)})"
                             ": lower scene.resolution_scale or scene.max_gaussians") from None
        finally:
            self.current = {}
        self._write_scene_files(job_root, shard_id, folder, fit, views)
        for index, (row, view, image, full, size) in enumerate(views):
            if row["row_id"] not in wanted:
                continue  # ok on an earlier run: took part in the fit, not rewritten
            try:
                answers[row["row_id"]] = self._write_view(
                    row, image, inputs[index], outputs[index], fit, index, size)
            except ImageError as exc:  # this view's output or reference, not the scene
                fail(row, exc)
        return {"steps": fit.steps, "seconds": fit.seconds, "gaussians": len(fit.gaussians),
                "views": len(views)}

    def _scene_file(self, folder: str, rel: str) -> bytes:
        try:
            return self.storage.get(folder + rel)
        except NotFoundError:
            raise SceneError("bad_scene", f"{folder}{rel}, named by the scene's poses, does "
                             "not exist: add it or remove its mention") from None

    def _write_view(self, row: dict[str, Any], image: Any, pixels: np.ndarray,
                    output: torch.Tensor, fit: SceneFit, index: int, size: int
                    ) -> dict[str, Any]:
        scale = np.iinfo(pixels.dtype).max
        out = (output.cpu().numpy() * scale).round().clip(0, scale).astype(pixels.dtype)
        data = encode(image, out, self.config.codec)
        self.storage.put(row["output_key"], data,
                         content_type(image.source_format, self.config.codec))
        figures: dict[str, Any] = {}
        if row.get("reference"):
            reference = decode(self.storage.get(row["reference"]), row["reference"],
                               self.config.codec)
            ref = np.asarray(reference.pixels)[..., :3]
            figures = {"psnr": psnr(out, ref), "ssim": ssim(out, ref),
                       "psnr_in": psnr(pixels, ref), "ssim_in": ssim(pixels, ref)}
        return result_row(row, attempt=0, worker=self.worker_id, status="ok",
                          width=image.width, height=image.height, bytes_in=size,
                          bytes_out=len(data), infer_ms=1000 * fit.seconds / len(fit.fit_psnr),
                          fit_psnr=fit.fit_psnr[index], scene_steps=fit.steps,
                          scene_seconds=fit.seconds, scene_gaussians=len(fit.gaussians),
                          finished_at=time.time(), **figures)

    def _write_scene_files(self, job_root: str, shard_id: int, folder: str, fit: SceneFit,
                           views: list[Any]) -> None:
        target = scene_files_folder(job_root, shard_id)
        self.storage.put(target + "scene.ply", ply_bytes(fit.gaussians),
                         "application/octet-stream")
        trajectories = {
            "scene": folder, "convention": "world-to-camera 4x4, OpenCV axes (x right, y "
            "down, z forward); exposure from start to end, outputs rendered at mid",
            "steps": fit.steps, "seconds": fit.seconds, "gaussians": len(fit.gaussians),
            "views": [{"key": row["key"], "start": fit.starts[i].tolist(),
                       "mid": fit.mids[i].tolist(), "end": fit.ends[i].tolist(),
                       "fit_psnr": fit.fit_psnr[i]}
                      for i, (row, *_rest) in enumerate(views)]}
        self.storage.put(target + "trajectories.json",
                         json.dumps(trajectories, indent=1).encode(), "application/json")


class SceneWorkerActor:
    """Ray actor body for scene jobs: the same interface the pool calls on ``WorkerActor``."""

    start_error = None

    def __init__(self, config: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO)
        self.processor = SceneProcessor(from_dict(config), worker_name())

    def ready(self) -> str:
        return self.processor.worker_id

    def health(self) -> str | None:
        return self.processor.unhealthy

    def process(self, job_root: str, shard_id: int, attempt: int) -> dict[str, Any]:
        return self.processor.process(job_root, shard_id, attempt)

    def fit_progress(self) -> dict[str, Any]:
        """The scene being fitted now (shard, step, steps, Gaussians), or {} between scenes;
        answered on another of the actor's threads while the fit runs."""
        return dict(self.processor.current)

    def process_rows(self, job_root: str, shard_id: int, attempt: int,
                     row_ids: list[int]) -> list[dict[str, Any]]:
        return self.processor.process_rows(job_root, shard_id, attempt, row_ids)
