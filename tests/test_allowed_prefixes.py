"""Allowed prefixes of manifest entries (issue 25, item 2).

By default a manifest may name objects in its own bucket (S3) or under its own folder (local),
SOURCE and DESTINATION: the usual S3 Inventory layout (s3://photos/manifests/m.parquet naming
s3://photos/raw/…) plans and runs. A manifest whose rows all lie outside (all of its first
1,000) is a misconfiguration: `deblur run` and `deblur plan` refuse it before Ray starts, exit
2, in one line naming the prefix the rows share and --allow-prefix. A few stray rows still
run, failed as outside_source.
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from deblur.cli import app
from deblur.config import CodecConfig
from deblur.errors import ManifestError
from deblur.io.storage import Storage
from deblur.job.ledger import Ledger
from deblur.job.manifest import OUTSIDE_CHECK_ROWS, plan_rows
from deblur.run.worker import ShardProcessor
from tests.conftest import identity, job_config, jpeg


def _bucket(storage: Storage, name: str) -> str:
    try:
        storage.client.create_bucket(Bucket=name)
    except storage.client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return f"s3://{name}"


def _parquet(keys: list[str]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"key": pa.array(keys, pa.string())}), sink)
    return sink.getvalue()


def _reasons(source: str, dest: str, storage: Storage) -> list[str]:
    batches, _ = plan_rows(source, dest, storage, CodecConfig(), job=job_config(source, dest))
    return [(r["error"] or "ok").split(":")[0] for b in batches for r in b.to_pylist()]


def _ray_started() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def test_inventory_manifest_in_another_folder_of_the_bucket_runs(storage: Storage) -> None:
    photos = _bucket(storage, "photos")
    keys = [f"{photos}/raw/2026/img{i}.jpg" for i in range(3)]
    for i, key in enumerate(keys):
        storage.put(key, jpeg(24, 16, i))
    manifest = f"{photos}/manifests/m.parquet"
    storage.put(manifest, _parquet(keys))

    assert _reasons(manifest, f"{photos}/out", storage) == ["ok"] * 3
    # Through the pipeline: planned into a ledger, processed, every row ok.
    ledger = Ledger.create(storage, job_config(manifest, f"{photos}/out", f"{photos}/job"),
                           job_id="inv", model_info={})
    ShardProcessor(ledger.config(), identity, "w0", storage).process(ledger.job_root, 0, 1)
    assert ledger.status().ok == 3 and ledger.status().failed == 0
    assert storage.exists(f"{photos}/out/raw/2026/img0.jpg")


def test_all_rows_outside_is_refused_before_ray_in_one_line(storage: Storage) -> None:
    photos, archive = _bucket(storage, "photos"), _bucket(storage, "archive")
    keys = [f"{archive}/raw/{d}/img{i}.jpg" for d in ("a", "b") for i in range(2)]
    manifest = f"{photos}/manifests/elsewhere.parquet"
    storage.put(manifest, _parquet(keys))
    dest = f"{photos}/refused-out"

    runner = CliRunner()
    for command in (["run", manifest, dest, "--random-weights"], ["plan", manifest, dest]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        assert lines[0].startswith("error: all 4 rows of the manifest name objects outside")
        assert f"under {archive}/raw/" in lines[0]
        assert f"--allow-prefix {archive}/raw/" in lines[0]
    assert not _ray_started()
    assert [i.key for i in storage.list(f"{photos}/refused-out")] == []  # nothing planned

    # The flag it names makes the job plan.
    job = job_config(manifest, dest, allow_prefixes=(f"{archive}/raw/",))
    batches, _ = plan_rows(manifest, dest, storage, CodecConfig(), job=job)
    assert [r["error"] for b in batches for r in b.to_pylist()] == [None] * 4


def test_a_few_stray_rows_still_run_as_failed_rows(tmp_path: Path) -> None:
    storage = Storage()
    lists, raw = tmp_path / "lists", tmp_path / "raw"
    (lists / "ok").mkdir(parents=True)
    raw.mkdir()
    (lists / "ok" / "a.jpg").write_bytes(jpeg(24, 16, 0))
    (raw / "b.jpg").write_bytes(jpeg(24, 16, 1))
    manifest = lists / "m.txt"
    manifest.write_text(f"ok/a.jpg\n{lists}/ok/a2.jpg\n{raw}/b.jpg\n")
    assert _reasons(str(manifest), str(tmp_path / "out"), storage) == [
        "ok", "ok", "outside_source"]

    # A local manifest's default is its own folder: raw/ beside it is outside.
    manifest.write_text(f"{raw}/b.jpg\n{raw}/c.jpg\n")
    folder = re.escape(f"{raw}/")
    with pytest.raises(ManifestError, match=rf"under {folder}\. .*--allow-prefix {folder} "):
        _reasons(str(manifest), str(tmp_path / "out"), storage)


def test_only_the_first_rows_decide(tmp_path: Path) -> None:
    storage = Storage()
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "m.txt"
    outside = [f"/elsewhere/{i}.jpg" for i in range(OUTSIDE_CHECK_ROWS)]
    manifest.write_text("\n".join([*outside, "mine.jpg"]) + "\n")
    with pytest.raises(ManifestError, match="the first 1,000 rows of the manifest .* under "
                                            "/elsewhere/"):
        _reasons(str(manifest), str(tmp_path / "out"), storage)

    # One row of the first 1,000 inside: stray rows, planned and failed one by one.
    manifest.write_text("\n".join([*outside[:-1], "mine.jpg", *outside]) + "\n")
    reasons = _reasons(str(manifest), str(tmp_path / "out"), storage)
    assert reasons.count("ok") == 1 and reasons.count("outside_source") == len(reasons) - 1

    # Rows in no common folder: the line says so instead of naming "/".
    manifest.write_text("/a/1.jpg\n/b/2.jpg\n")
    with pytest.raises(ManifestError, match="share no bucket or folder"):
        _reasons(str(manifest), str(tmp_path / "out"), storage)


def test_a_dataset_planned_as_ray_tasks_is_refused_before_ray_starts(tmp_path: Path) -> None:
    storage = Storage()
    folder = tmp_path / "inventory"
    folder.mkdir()
    for part in range(2):  # two files: plan_tasks plans them as Ray tasks
        (folder / f"part-{part}.parquet").write_bytes(
            _parquet([f"/elsewhere/raw/{part}-{i}.jpg" for i in range(3)]))
    job = job_config(f"{folder}/*.parquet", str(tmp_path / "out"), str(tmp_path / "job"),
                     plan_tasks=2)
    with pytest.raises(ManifestError, match=r"all 6 rows of the manifest .* all lie under "
                                            r"/elsewhere/raw/\. .*--allow-prefix /elsewhere/raw/"):
        Ledger.create(storage, job, job_id="tasks", model_info={})
    assert not _ray_started()
    assert not (tmp_path / "job").exists() or not list((tmp_path / "job").iterdir())
