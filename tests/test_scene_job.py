"""Scene jobs through the ledger (``--model deblurgs``): one scene is one shard; views become
result rows; the .ply and trajectories land under the job root; a scene without poses and a
view that does not decode are failed rows with their reasons; a rerun redoes only what failed
and never rewrites an ok view. Runs on a local folder and on moto's S3 (``root``)."""

from __future__ import annotations

import json
from pathlib import Path

from deblur.dev.scenes import write_scenes
from deblur.io.storage import Storage, join
from deblur.job.ledger import Ledger
from deblur.run.scene_worker import SceneProcessor, scene_files_folder
from deblur.scene.gaussians import gaussians_from_ply
from tests.conftest import job_config

# a few steps: these tests check the job's bookkeeping; tests/test_scene_fit.py the quality
QUICK = {"model.random_weights": False, "model.name": "deblurgs", "scene.steps": 12,
         "scene.subframes": 2, "scene.densify_from": 4, "scene.densify_every": 4,
         "scene.densify_until": 8}


def _upload(storage: Storage, local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.put(join(prefix, str(path.relative_to(local))), path.read_bytes())


def _plan(root: str, tmp_path: Path, storage: Storage) -> Ledger:
    write_scenes(tmp_path / "scenes", count=2, views=3, width=32, height=24)
    _upload(storage, tmp_path / "scenes", join(root, "src"))
    # a third scene without poses, and a fourth view in scene 1 that does not decode
    storage.put(join(root, "src/scene_002/images/view_000.png"),
                (tmp_path / "scenes/scene_000/images/view_000.png").read_bytes())
    broken = json.loads((tmp_path / "scenes/scene_001/transforms.json").read_text())
    broken["frames"].append(dict(broken["frames"][0], file_path="images/view_003.png"))
    storage.put(join(root, "src/scene_001/transforms.json"), json.dumps(broken).encode())
    whole = (tmp_path / "scenes/scene_001/images/view_000.png").read_bytes()
    storage.put(join(root, "src/scene_001/images/view_003.png"), whole[:len(whole) // 2])
    # a fourth scene with two views: fewer than scene.min_views
    two = json.loads((tmp_path / "scenes/scene_000/transforms.json").read_text())
    two["frames"] = two["frames"][:2]
    del two["ply_file_path"]
    storage.put(join(root, "src/scene_003/transforms.json"), json.dumps(two).encode())
    for name in ("view_000.png", "view_001.png"):
        storage.put(join(root, f"src/scene_003/images/{name}"),
                    (tmp_path / f"scenes/scene_000/images/{name}").read_bytes())
    job = job_config(join(root, "src"), join(root, "out"), join(root, "job"), **QUICK)
    return Ledger.create(storage, job, job_id="scenes", model_info={})


def test_scene_job_rows_outputs_and_rerun(root: str, tmp_path: Path) -> None:
    storage = Storage()
    ledger = _plan(root, tmp_path, storage)
    assert len(ledger.shard_ids()) == 4  # one shard per scene, not shard_size rows
    processor = SceneProcessor(ledger.config(), "test-worker")
    reports = [processor.process(ledger.job_root, shard, 1) for shard in ledger.shard_ids()]
    assert [(r["ok"], r["failed"]) for r in reports] == [(3, 0), (3, 1), (0, 1), (0, 2)]
    assert reports[0]["metrics"]["scene"]["steps"] == 12
    rows = {r["key"].split("/src/")[1]: r for t in ledger.iter_results() for r in t.to_pylist()}
    assert len(rows) == 10  # every view exactly once
    assert rows["scene_001/images/view_003.png"]["reason"] in ("truncated", "corrupt")
    assert rows["scene_002/images/view_000.png"]["reason"] == "no_poses"
    assert "transforms.json" in rows["scene_002/images/view_000.png"]["error"]
    assert rows["scene_003/images/view_001.png"]["reason"] == "too_few_views"
    assert "scene.min_views=3" in rows["scene_003/images/view_001.png"]["error"]
    ok = rows["scene_000/images/view_001.png"]
    assert ok["status"] == "ok" and ok["fit_psnr"] > 10 and ok["scene_steps"] == 12
    assert ok["scene_gaussians"] > 100 and ok["scene_seconds"] > 0
    assert storage.exists(join(root, "out/scene_000/images/view_001.png"))
    files = scene_files_folder(ledger.job_root, 0)
    scene = gaussians_from_ply(storage.get(files + "scene.ply"))
    assert len(scene) == ok["scene_gaussians"]
    trajectories = json.loads(storage.get(files + "trajectories.json"))
    assert len(trajectories["views"]) == 3
    assert set(trajectories["views"][0]) >= {"key", "start", "mid", "end", "fit_psnr"}

    # rerun: repair the broken view; scene 1 is fitted again with all four views, but only
    # the repaired one is written (an ok view's output removed here must stay absent)
    storage.put(join(root, "src/scene_001/images/view_003.png"),
                (tmp_path / "scenes/scene_001/images/view_000.png").read_bytes())
    storage.delete(join(root, "out/scene_001/images/view_000.png"))
    assert ledger.rerun_selection() == [1, 2, 3]
    again = processor.process(ledger.job_root, 1, 2)
    assert (again["ok"], again["failed"]) == (1, 0) and again["metrics"]["scene"]["views"] == 4
    assert storage.exists(join(root, "out/scene_001/images/view_003.png"))
    assert not storage.exists(join(root, "out/scene_001/images/view_000.png"))
    status = ledger.status(ledger.index())
    assert (status.ok, status.failed, status.pending) == (7, 3, 0)
    # what the pool asks of a shard that kept killing its workers: these rows, uncommitted
    isolated = processor.process_rows(ledger.job_root, 0, 3, [0, 2])
    assert [(r["row_id"], r["status"], r["attempt"]) for r in isolated] == [
        (0, "ok", 3), (2, "ok", 3)]


def test_scene_report_sets_the_scene_series() -> None:
    """A scene shard's report (steps, seconds, Gaussians) becomes the scene gauges; an image
    shard's report leaves them absent."""
    from prometheus_client import generate_latest

    from deblur.observe.metrics import JobMetrics

    metrics = JobMetrics("job-1", "deblurgs")
    metrics.observe_shard({"worker": "w1", "ok": 3, "failed": 0, "metrics": {"wall_s": 9.0}})
    assert "deblur_scene_gaussians{" not in generate_latest(metrics.registry).decode()
    metrics.observe_shard({"worker": "w1", "ok": 3, "failed": 0, "metrics": {
        "wall_s": 9.0, "scene": {"steps": 300, "seconds": 60.0, "gaussians": 4200}}})
    text = generate_latest(metrics.registry).decode()
    assert 'deblur_scene_steps_per_second{job_id="job-1",worker="w1"} 5.0' in text
    assert 'deblur_scene_gaussians{job_id="job-1",worker="w1"} 4200.0' in text


def test_the_progress_line_counts_scenes_for_a_scene_job() -> None:
    import io

    from deblur.console import ProgressView
    from deblur.run.pool import Progress

    progress = Progress(shards_total=4, shards_done=1, rows_total=32, rows_done=8)
    scenes = ProgressView(io.StringIO(), tty=False, scenes=True)
    scenes.update(progress)
    assert scenes.line().startswith("1/4 scenes  8/32 images")
    images = ProgressView(io.StringIO(), tty=False)
    images.update(progress)
    assert images.line().startswith("8/32 images")


def test_a_manifest_groups_views_by_scene_folder_and_its_references_give_quality(
        tmp_path: Path) -> None:
    """A manifest beside the scene folders: rows grouped by their first folder, and the
    `reference` column turns into PSNR/SSIM of the output and of the input; a reference that
    does not decode fails its view only."""
    scenes = tmp_path / "scenes"
    write_scenes(scenes, count=2, views=3, width=32, height=24)
    refs = tmp_path / "scenes-reference"
    lines = ["key,reference"] + [
        f"scene_{s:03d}/images/view_{v:03d}.png,{refs}/scene_{s:03d}/images/view_{v:03d}.png"
        for v in range(3) for s in range(2)]  # scenes interleaved in the manifest
    (refs / "scene_001/images/view_002.png").write_bytes(b"not an image")
    (scenes / "views.csv").write_text("\n".join(lines) + "\n")
    job = job_config(str(scenes / "views.csv"), str(tmp_path / "out"), str(tmp_path / "job"),
                     allow_prefixes=(str(tmp_path),), **QUICK)
    ledger = Ledger.create(Storage(), job, job_id="manifest", model_info={})
    shards = [ledger.read_shard(s)["key"].to_pylist() for s in ledger.shard_ids()]
    assert sorted(len(keys) for keys in shards) == [3, 3]
    assert all(len({k.split("/scenes/")[1][:9] for k in keys}) == 1 for keys in shards)
    processor = SceneProcessor(ledger.config(), "test-worker")
    reports = [processor.process(ledger.job_root, shard, 1) for shard in ledger.shard_ids()]
    assert sorted((r["ok"], r["failed"]) for r in reports) == [(2, 1), (3, 0)]
    rows = [r for t in ledger.iter_results() for r in t.to_pylist()]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 5 and all(r["psnr"] is not None and r["psnr_in"] is not None
                                and r["ssim"] is not None for r in ok)
    (bad,) = [r for r in rows if r["status"] == "failed"]  # its reference, not its scene
    assert bad["key"].endswith("scene_001/images/view_002.png") and bad["reason"]


def test_a_manifest_scene_column_groups_the_views(tmp_path: Path) -> None:
    """A manifest above the scene folders: its `scene` column, not the first folder (here the
    same `scenes/` for every view), decides which views form a scene."""
    write_scenes(tmp_path / "scenes", count=2, views=3, width=32, height=24)
    lines = ["key,scene"] + [f"scenes/scene_{s:03d}/images/view_{v:03d}.png,s{s}"
                             for v in range(3) for s in range(2)]
    (tmp_path / "views.csv").write_text("\n".join(lines) + "\n")
    job = job_config(str(tmp_path / "views.csv"), str(tmp_path / "out"),
                     str(tmp_path / "job"), **QUICK)
    ledger = Ledger.create(Storage(), job, job_id="column", model_info={})
    shards = [ledger.read_shard(s)["key"].to_pylist() for s in ledger.shard_ids()]
    assert [[k.split("/scenes/")[1][:9] for k in keys] for keys in shards] == [
        ["scene_000"] * 3, ["scene_001"] * 3]
    processor = SceneProcessor(ledger.config(), "test-worker")
    assert [processor.process(ledger.job_root, s, 1)["ok"] for s in ledger.shard_ids()] \
        == [3, 3]
