"""Duplicates and output collisions in bounded memory: exact, spilled, and the vectorised
planner against the row-by-row one."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deblur.config import CodecConfig, JobConfig
from deblur.job import dedup, manifest
from deblur.job.manifest import RowPlanner, _planned, plan_rows
from deblur.io.storage import Storage


def _rows(source: str, dest: str, **job: object) -> tuple[list[dict], dict, RowPlanner]:
    config = JobConfig(source=source, destination=dest, **job)
    batches, planner = plan_rows(source, dest, Storage(), config.codec, job=config)
    rows = [r for b in batches for r in b.to_pylist()]
    return rows, planner.counts.to_dict(), planner


def _manifest(path: Path, keys: list[str | None], **columns: list) -> str:
    pq.write_table(pa.table({"key": pa.array(keys, pa.string()), **columns}), path,
                   row_group_size=5)
    return str(path)


MIXED = ["a.jpg", "b.jpg", "a.jpg", "c/d.jpg", "c//d.jpg", "e.jpg", "b.jpg", "f.png",
         "a.jpg", "g.jpg"]


def test_digest_is_per_string_whatever_the_array_layout() -> None:
    values = ["", "a", "a\x00", "a\x00\x00", "x" * 8, "x" * 9, "é" * 600, "a"]
    digests = dedup.digest64(pa.array(values))
    assert len(set(digests[:-1].tolist())) == len(values) - 1  # zero padding is not content
    assert digests[1] == digests[-1]
    sliced = dedup.digest64(pa.array(values).slice(2, 3))
    large = dedup.digest64(pa.array(values, pa.large_string()))
    chunked = dedup.digest64(pa.chunked_array([values[:3], values[3:]]))
    assert sliced.tolist() == digests[2:5].tolist()
    assert large.tolist() == chunked.tolist() == digests.tolist()
    assert dedup.digest64(pa.array(["", None])).tolist() == [digests[0]] * 2


def test_duplicates_and_collisions_first_row_wins(tmp_path: Path) -> None:
    source = _manifest(tmp_path / "m.parquet", MIXED)
    rows, counts, _ = _rows(source, "s3://out/x")
    errors = {r["row_id"]: r["error"].split(":")[0] for r in rows if r["error"]}
    assert errors == {2: "duplicate_key", 4: "output_collision", 6: "duplicate_key",
                      8: "duplicate_key"}
    assert counts["invalid"] == {"duplicate_key": 3, "output_collision": 1}
    assert rows[2]["error"] == "duplicate_key: 'a.jpg' appears earlier in the manifest"
    assert rows[4]["error"] == ("output_collision: 'c//d.jpg' maps to output 'c/d.jpg', which "
                                "an earlier row already writes")
    assert all(rows[i]["output_key"] == "" for i in errors)


def test_a_uri_without_a_bucket_is_a_failed_row(tmp_path: Path) -> None:
    source = _manifest(tmp_path / "m.parquet", ["s3://", "s3:///x.jpg", "ok.jpg"])
    rows, counts, _ = _rows(source, "s3://out/x")  # used to raise StorageError out of planning
    assert [r["error"] for r in rows] == ["invalid_key: 's3://' names no bucket",
                                          "invalid_key: 's3:///x.jpg' names no bucket", None]


def test_a_shared_digest_never_drops_a_distinct_key(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Digests of 2 bits: nearly every pair of rows shares one. Only rows whose keys are
    really equal may fail."""
    keys = [f"k{i}.jpg" for i in range(40)] + ["k3.jpg", "k7.jpg"]
    source = _manifest(tmp_path / "m.parquet", keys)
    exact, exact_counts, _ = _rows(source, str(tmp_path / "out"))
    real = dedup.digest64
    monkeypatch.setattr(manifest, "digest64", lambda values: real(values) & np.uint64(3))
    rows, counts, _ = _rows(source, str(tmp_path / "out"))
    assert rows == exact
    assert counts == exact_counts and counts["invalid"] == {"duplicate_key": 2}
    assert [r["row_id"] for r in rows if r["error"]] == [40, 41]


def test_spilled_to_disk_gives_the_same_verdicts(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    keys = [f"d{rng.randrange(30)}/{rng.choice(['a', 'b', 'c'])}.jpg" for _ in range(300)]
    keys += [f"d1//{k}" for k in ("a.jpg", "b.jpg")] + [None, "../up.jpg", "x/_deblur"]
    source = _manifest(tmp_path / "m.parquet", keys)
    in_memory, counts, planner = _rows(source, "s3://out/x")
    assert planner.spilled == 0 and counts["invalid"]["duplicate_key"] > 100
    monkeypatch.setattr(dedup, "BUFFER_ROWS", 7)  # spill every 7 digests
    monkeypatch.setattr(dedup, "CONFIRM_ROWS", 3)  # confirm a few groups at a time
    spilled, spilled_counts, planner = _rows(source, "s3://out/x")
    assert planner.spilled > 500
    assert spilled == in_memory and spilled_counts == counts
    assert not list(Path(dedup.__file__).parent.glob("*.bin"))


HOSTILE = ["a", "b", "é", " ", "/", "//", ".", "..", "%20", "\\", "\x01", "_deblur", "jobs",
           "x.jpg", "y.PNG", "z.webp", "s3://", "file://", "\u2028", "#", "\x00"]


def _random_keys(rng: random.Random, n: int) -> list[str | None]:
    keys: list[str | None] = []
    for _ in range(n):
        if rng.random() < 0.02:
            keys.append(None)
            continue
        parts = [rng.choice(HOSTILE) for _ in range(rng.randrange(1, 5))]
        keys.append(rng.choice(["", "/"]).join(parts) + rng.choice(["", ".jpg", "/", ".png"]))
    return keys


@pytest.mark.parametrize("literal", [False, True])
@pytest.mark.parametrize("case", ["plain", "in_place", "job_root_inside", "png", "long_dest",
                                  "file_uri"])
def test_vectorised_planner_matches_row_by_row(tmp_path: Path, literal: bool,
                                               case: str) -> None:
    """The column-at-a-time path is an optimisation only: on hostile keys, every setting,
    the shard rows and counts equal those of the row-by-row reference."""
    rng = random.Random(hash((literal, case)) & 0xFFFF)
    keys = _random_keys(rng, 600) + ["x.jpg", "x.jpg", "jobs/r/a.jpg", "_deblur/q.jpg"]
    outs = [rng.choice([None, None, None, "o.jpg", "../o", "p//q.jpg"]) for _ in keys]
    refs = [rng.choice([None, "ref.png"]) for _ in keys]
    base = str(tmp_path / "in") + "/"
    dest, job_root, codec_config, overwrite = "s3://out/d", None, CodecConfig(), False
    if case == "in_place":
        dest = base
    elif case == "job_root_inside":
        job_root = "s3://out/d/jobs/r/"
    elif case == "png":
        codec_config = CodecConfig(output_format="png")
    elif case == "long_dest":
        dest, overwrite = "s3://out/" + "p" * 1000, None
    elif case == "file_uri":
        base, dest = "file://" + base, "file://" + str(tmp_path / "in")
    batch = pa.RecordBatch.from_pydict({
        "key": pa.array(keys, pa.string()), "output_key": pa.array(outs, pa.string()),
        "reference": pa.array(refs, pa.string())})
    results = []
    for vectorised in (True, False):
        planner = RowPlanner(base, dest, codec_config, literal=literal,
                             allowed=(base, dest), overwrite_inputs=overwrite,
                             job_root=job_root, vectorised=vectorised)
        halves = [batch.slice(0, 300), batch.slice(300)]
        rows = [r for b in _planned(iter(halves), planner) for r in b.to_pylist()]
        results.append((rows, planner.counts.to_dict()))
    assert results[0] == results[1]
    assert len(results[0][0]) == len(keys)
    assert sum(results[0][1]["invalid"].values()) < len(keys)  # some rows plan as valid


def test_one_key_repeated_more_often_than_the_confirm_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = ["same.jpg"] * 30 + ["other.jpg"] + ["same.jpg"] * 5 + ["x.jpg", "other.jpg"]
    source = _manifest(tmp_path / "m.parquet", keys)
    whole, counts, _ = _rows(source, "s3://out/x")
    monkeypatch.setattr(dedup, "CONFIRM_ROWS", 4)  # the group of 35 is confirmed 4 at a time
    real = dedup.digest64
    monkeypatch.setattr(manifest, "digest64", lambda values: real(values) & np.uint64(1))
    rows, chunked, _ = _rows(source, "s3://out/x")
    assert rows == whole and chunked == counts
    assert [r["row_id"] for r in rows if not r["error"]] == [0, 30, 36]
