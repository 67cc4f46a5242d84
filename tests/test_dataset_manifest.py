"""Manifests read as streams (ranged GETs, row group by row group) and folders of manifest
files read as one manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deblur.config import CodecConfig, JobConfig
from deblur.errors import ConfigError, ManifestError
from deblur.job import dataset, manifest
from deblur.job.manifest import BASE_METADATA, plan_rows
from deblur.io.storage import Storage, join
from tests.conftest import CountingStorage


def _plan(source: str, dest: str, storage: Storage) -> tuple[list[dict], dict]:
    config = JobConfig(source=source, destination=dest)
    batches, planner = plan_rows(source, dest, storage, CodecConfig(), job=config)
    return [r for b in batches for r in b.to_pylist()], planner.counts.to_dict()


def _parquet(keys: list[str], row_group: int = 1000, metadata: dict | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    table = pa.table({"key": keys}).replace_schema_metadata(metadata)
    pq.write_table(table, sink, row_group_size=row_group, compression="none")
    return sink.getvalue().to_pybytes()


def test_a_big_parquet_manifest_streams_by_ranged_gets(storage: Storage, s3_bucket: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataset, "BLOCK_BYTES", 64 * 1024)
    keys = [f"photos/{i:07d}/a-rather-long-name-to-make-the-file-bigger.jpg"
            for i in range(60_000)]
    manifest = join(s3_bucket, "m/big.parquet")
    data = _parquet(keys, row_group=5_000)
    storage.put(manifest, data)
    counting = CountingStorage(storage.config)
    rows, counts = _plan(manifest, join(s3_bucket, "out"), counting)

    assert counts["valid"] == 60_000 and [r["row_id"] for r in rows] == list(range(60_000))
    assert rows[-1]["key"] == join(s3_bucket, "m/" + keys[-1])
    assert counting.whole == []  # never the whole object
    sizes = [size for uri, _, size in counting.ranges if uri == manifest]
    assert len(sizes) >= 12  # a footer, then each row group's column chunk
    assert max(sizes) < len(data) / 8  # never more than about a row group at once
    assert counting.ops["HEAD"] == 1  # the size, to find the footer


@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl"])
def test_line_formats_stream_across_block_boundaries(tmp_path: Path, fmt: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 7 bytes split lines and multi-byte characters; the keys come out whole."""
    keys = ["ünï/çødé/a.jpg", "b\u2028c.jpg", " spaced .jpg", "日本/写真.png"] * 50
    path = tmp_path / f"m.{fmt}"
    if fmt == "txt":
        path.write_bytes(("# header\r\n" + "\r\n".join(keys) + "\n\n").encode())
    elif fmt == "csv":
        path.write_text("key\n" + "".join(f'"{k}"\n' for k in keys))
    else:
        path.write_text("".join(json.dumps({"key": k}) + "\n" for k in keys))
    whole, _ = _plan(str(path), str(tmp_path / "out"), Storage())
    monkeypatch.setattr(dataset, "BLOCK_BYTES", 7)
    monkeypatch.setattr(manifest, "PARSE_BLOCK_BYTES", 256)  # CSV/JSONL: pyarrow's blocks
    counting = CountingStorage()
    rows, counts = _plan(str(path), str(tmp_path / "out"), counting)
    assert rows == whole
    assert [r["key"] for r in rows][:4] == [f"{tmp_path}/{k}" for k in keys[:4]]
    assert counts["invalid"] == {"duplicate_key": 196}
    assert counting.whole == [] and len(counting.ranges) > 10


def test_a_folder_of_files_is_one_manifest_in_name_order(tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "part-1.parquet").write_bytes(_parquet(["c.jpg", "a.jpg"]))  # a: a duplicate
    (folder / "part-0.parquet").write_bytes(_parquet(["a.jpg", "b.jpg"]))
    (folder / "part-2.parquet").write_bytes(_parquet(["d.jpg"]))
    (folder / "notes.csv").write_text("key\nnot-me.jpg\n")  # another pattern
    (folder / "sub").mkdir()
    (folder / "sub" / "part-9.parquet").write_bytes(_parquet(["nor-me.jpg"]))
    one = tmp_path / "one.parquet"
    one.write_bytes(_parquet(["a.jpg", "b.jpg", "c.jpg", "a.jpg", "d.jpg"]))

    rows, counts = _plan(f"{folder}/part-*.parquet", str(tmp_path / "out"), Storage())
    expected, expected_counts = _plan(str(one), str(tmp_path / "out"), Storage())
    assert [r["key"] for r in rows] == [f"{folder}/{k}" for k in
                                        ("a.jpg", "b.jpg", "c.jpg", "a.jpg", "d.jpg")]
    assert [r["row_id"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["error"] and r["error"].split(":")[0] for r in rows] == [
        None, None, None, "duplicate_key", None]
    assert counts == expected_counts
    assert [r["output_key"] for r in rows] == [r["output_key"] for r in expected]


def test_dataset_sources_that_cannot_be_one_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest files match"):
        _plan(f"{tmp_path}/*.parquet", str(tmp_path / "out"), Storage())
    (tmp_path / "a.parquet").write_bytes(_parquet(["x.jpg"], metadata={
        BASE_METADATA: b"s3://src/in/"}))
    (tmp_path / "b.parquet").write_bytes(_parquet(["y.jpg"]))
    with pytest.raises(ManifestError, match="disagree"):
        _plan(f"{tmp_path}/*.parquet", str(tmp_path / "out"), Storage())


def test_empty_and_missing_manifests_fail_with_their_name(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(ManifestError, match="empty.csv is empty"):
        _plan(str(tmp_path / "empty.csv"), str(tmp_path / "out"), Storage())
    with pytest.raises(ManifestError, match="cannot read manifest .*gone.parquet"):
        _plan(str(tmp_path / "gone.parquet"), str(tmp_path / "out"), Storage())


def test_deblur_plan_says_which_planning_path_a_job_takes(tmp_path: Path) -> None:
    from deblur.job import estimate

    folder = tmp_path / "m"
    folder.mkdir()
    for i in range(3):
        (folder / f"part-{i}.parquet").write_bytes(_parquet([f"{i}-{j}.jpg" for j in range(4)]))
    config = JobConfig(source=f"{folder}/*.parquet", destination=str(tmp_path / "out"))
    report = estimate.estimate(config, Storage(), sample_size=2)
    plan = report.planning
    assert plan["source_files"] == 3 and plan["parallel_tasks"] == 0
    assert plan["duplicates"] == "digests in memory" and plan["local_disk_bytes"] > 0
    assert plan["expected_seconds"] == round(12 / estimate.PLANNING_ROWS_PER_S, 1)
    assert plan["expected_peak_rss_mib"] == round(estimate.PLANNING_PEAK_MIB)
    assert "planning:     3 manifest files streamed by ranged GETs" in estimate.render(report)
    assert "no parallel tasks" in estimate.render(report)

    in_tasks = JobConfig(source=f"{folder}/*.parquet", destination=str(tmp_path / "out"),
                         plan_tasks=8)
    report = estimate.estimate(in_tasks, Storage(), sample_size=2)
    assert report.planning["parallel_tasks"] == 3  # one per file, at most plan_tasks
    assert "3 Ray tasks at once" in report.planning["path"]
    assert "3 parallel tasks" in estimate.render(report)

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"not really")
    listing = JobConfig(source=str(tmp_path / "in"), destination=str(tmp_path / "out"))
    plan = estimate.estimate(listing, Storage(), sample_size=2).planning
    assert plan["source_files"] == 0 and "listing" in plan["source"]
    big = estimate.PlanReport(source="s", destination="d", rows=110_000_000)
    estimate._planning(big, type("P", (), {"source_files": 1, "spilled": 7,
                                           "spool_bytes": 0})())
    assert big.planning["duplicates"] == "digests spilled to local disk"
    assert big.planning["expected_peak_rss_mib"] == round(
        estimate.PLANNING_PEAK_MIB + 100 * estimate.PLANNING_MIB_PER_M)


def test_a_listing_written_as_a_dataset_plans_as_the_prefix_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    for i in range(8):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"{i}.jpg").write_bytes(b"x")
    monkeypatch.setattr(manifest, "LISTING_PART_ROWS", 3)
    out = f"{tmp_path}/listing/part-*.parquet"
    assert manifest.write_listing(str(src), out, Storage()) == 8
    parts = sorted(p.name for p in (tmp_path / "listing").iterdir())
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(tmp_path / "listing" / p).num_rows for p in parts] == [3, 3, 2]
    from_listing, _ = _plan(out, str(tmp_path / "out"), Storage())
    from_prefix, _ = _plan(str(src), str(tmp_path / "out"), Storage())
    assert from_listing == from_prefix
    with pytest.raises(ManifestError, match="3 files already match"):
        manifest.write_listing(str(src), out, Storage())
    with pytest.raises(ManifestError, match="one '\\*'"):
        manifest.write_listing(str(src), f"{tmp_path}/l2/*-*.parquet", Storage())


def test_plan_tasks_below_zero_is_refused_before_anything_starts() -> None:
    from deblur import config as config_mod

    with pytest.raises(ConfigError, match="plan_tasks=-1: must be >= 0"):
        config_mod.load(None, {"plan_tasks": -1, "model.random_weights": True})
