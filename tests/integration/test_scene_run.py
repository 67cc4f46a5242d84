"""`deblur run SRC DEST --model deblurgs` end to end, as a user runs it (a CLI process, real
in-process Ray, a local folder or moto's S3): a scene folder without poses fails its views
with the reason and the job goes on; after the poses are added, `deblur rerun` fits only that
scene; `status`, `report` and `list` work on the job as on an image job."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from deblur.dev.scenes import write_scenes
from deblur.io.storage import Storage, join

from .helpers import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUICK = "model:\n  name: deblurgs\nscene:\n  steps: 12\n  subframes: 2\n  densify_from: 4\n" \
        "  densify_every: 4\n  densify_until: 8\n"


def test_scene_job_run_rerun_status_report(root: str, tmp_path: Path) -> None:
    storage = Storage()
    local = tmp_path / "scenes"
    write_scenes(local, count=2, views=3, width=32, height=24)
    for path in sorted(local.rglob("*")):
        name = str(path.relative_to(local))
        if path.is_file() and name != "scene_001/transforms.json":  # scene 1: no poses yet
            storage.put(join(root, f"src/{name}"), path.read_bytes())
    config = tmp_path / "scene.yaml"
    config.write_text(QUICK)
    src, out = join(root, "src"), join(root, "out")
    done = run_cli("run", src, out, "--config", str(config), "--metrics-port", "0", "--json")
    assert done.returncode == 1, done.stdout + done.stderr  # failed images: exit 1
    summary = json.loads(done.stdout)
    job = summary["job_root"]  # the default, DEST/_deblur/<job_id>/
    assert (summary["ok"], summary["failed"]) == (3, 3)
    status = json.loads(run_cli("status", job, "--json").stdout)
    assert status["failures_by_reason"] == {"no_poses": 3}
    assert "model: deblurgs, fitted per scene (no weights)" in run_cli("status", job).stdout
    assert storage.exists(join(root, "out/scene_000/images/view_002.png"))
    assert storage.exists(join(job, "scenes/00000/scene.ply"))
    assert storage.exists(join(job, "scenes/00000/trajectories.json"))

    storage.put(join(src, "scene_001/transforms.json"),
                (local / "scene_001/transforms.json").read_bytes())
    again = run_cli("rerun", job, "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout)["ok"] == 6
    assert storage.exists(join(root, "out/scene_001/images/view_000.png"))
    assert run_cli("report", job).returncode == 0
    listed = run_cli("list", out, "--json")
    assert listed.returncode == 0 and '"ok": 6' in listed.stdout


def test_the_live_line_shows_the_steps_of_the_scene_being_fitted(shared_ray,
                                                                  tmp_path: Path) -> None:
    """A scene fit runs minutes inside one shard: the pool asks its worker for the step while
    it runs, so the line moves between commits (and says nothing once the scene is done)."""
    from deblur.console import ProgressView
    from deblur.job.ledger import Ledger
    from deblur.run.pool import ActorPool
    from tests.conftest import job_config

    write_scenes(tmp_path / "src", count=1, views=3, width=32, height=24)
    job = job_config(str(tmp_path / "src"), str(tmp_path / "out"), str(tmp_path / "job"), **{
        "model.random_weights": False, "model.name": "deblurgs", "scene.steps": 400,
        "scene.subframes": 2, "scene.densify_from": 100, "scene.densify_every": 100,
        "scene.densify_until": 200, "metrics.enabled": False, "scheduler.max_workers": 1})
    ledger = Ledger.create(Storage(), job, job_id="live", model_info={})
    lines: list[str] = []
    view = ProgressView(io.StringIO(), tty=False, scenes=True)

    def on_progress(progress) -> None:
        view.update(progress)
        lines.append(view.line())

    progress = ActorPool(ledger.config(), ledger, on_progress).run(ledger.shard_ids(), 3)
    assert (progress.ok, progress.failed) == (3, 0)
    steps = [int(m.group(1)) for line in lines
             for m in [re.search(r"fitting scene 0: step (\d+)/400", line)] if m]
    assert [s for s in steps if 0 < s < 400], lines[-3:]  # seen mid-fit, not only at the end
    assert steps == sorted(steps)  # the step only moves forward
    assert "fitting" not in lines[-1]  # the committed scene is no longer shown as fitting
