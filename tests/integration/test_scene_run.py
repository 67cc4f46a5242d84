"""`deblur run SRC DEST --model deblurgs` end to end, as a user runs it (a CLI process, real
in-process Ray, a local folder or moto's S3): a scene folder without poses fails its views
with the reason and the job goes on; after the poses are added, `deblur rerun` fits only that
scene; `status`, `report` and `list` work on the job as on an image job."""

from __future__ import annotations

import json
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
