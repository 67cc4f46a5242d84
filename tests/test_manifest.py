"""Manifests (every format, every validation error), output keys and shard planning."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deblur.config import CodecConfig, JobConfig
from deblur.errors import ConfigError, ManifestError
from deblur.job.manifest import iter_shards, plan_rows, write_listing
from deblur.io.storage import Storage

KEYS = ["a.jpg", "sub dir/b.png", "ünï/çødé/c.jpg", "d/e/f/g/h/deep.webp"]


def _plan(source: str, dest: str, storage: Storage | None = None,
          codec: CodecConfig | None = None, **job: object) -> tuple[list[dict], dict]:
    config = JobConfig(source=source, destination=dest, **job) if job else None
    batches, planner = plan_rows(source, dest, storage or Storage(), codec or CodecConfig(),
                                 job=config)
    rows = [r for b in batches for r in b.to_pylist()]
    return rows, planner.counts.to_dict()


def _write(path: Path, fmt: str, keys: list[str], column: str = "key") -> str:
    if fmt == "parquet":
        pq.write_table(pa.table({column: keys}), path)
    elif fmt == "csv":
        path.write_text(f"{column},note\n" + "".join(f'"{k}",x\n' for k in keys))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({column: k, "extra": 1}) + "\n" for k in keys))
    else:
        path.write_text("# a comment\n" + "\n".join(keys) + "\n\n")
    return str(path)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl", "txt"])
def test_every_format_maps_keys_under_the_destination(tmp_path: Path, fmt: str) -> None:
    manifest = _write(tmp_path / f"m.{fmt}", fmt, KEYS)
    rows, counts = _plan(manifest, "s3://out/prefix")
    assert [r["row_id"] for r in rows] == [0, 1, 2, 3]
    assert [r["key"] for r in rows] == [f"{tmp_path}/{k}" for k in KEYS]
    assert [r["output_key"] for r in rows] == [f"s3://out/prefix/{k}" for k in KEYS]
    assert all(r["error"] is None for r in rows) and counts["valid"] == 4


def test_uri_column_and_full_uris(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "m.parquet", "parquet",
                      ["s3://photos/2024/x.jpg", f"{tmp_path}/y.jpg"], column="uri")
    rows, _ = _plan(manifest, "/out", allow_prefixes=("s3://photos/2024", str(tmp_path)))
    assert [r["key"] for r in rows] == ["s3://photos/2024/x.jpg", f"{tmp_path}/y.jpg"]
    assert [r["output_key"] for r in rows] == ["/out/2024/x.jpg", "/out/y.jpg"]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_missing_key_column_fails_fast_naming_the_file(tmp_path: Path, fmt: str) -> None:
    manifest = _write(tmp_path / f"m.{fmt}", fmt, KEYS, column="path")
    with pytest.raises(ManifestError, match=r"m\.%s.*'key'" % fmt):
        _plan(manifest, "/out")


def test_manifest_level_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(ManifestError, match="empty.csv.*empty"):
        _plan(str(tmp_path / "empty.csv"), "/out")
    with pytest.raises(ManifestError, match="absent.parquet"):
        _plan(str(tmp_path / "absent.parquet"), "/out")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(ManifestError, match="bad.parquet"):
        _plan(str(tmp_path / "bad.parquet"), "/out")
    (tmp_path / "bad.jsonl").write_text('{"key": "a.jpg"}\n{not json\n')
    with pytest.raises(ManifestError, match="bad.jsonl"):
        _plan(str(tmp_path / "bad.jsonl"), "/out")
    with pytest.raises(ManifestError, match="cannot list source"):
        _plan(str(tmp_path / "no-such-folder"), "/out")


def test_row_errors_become_failed_rows_never_dropped(tmp_path: Path) -> None:
    keys = ["ok.jpg", "ok.jpg", "../escape.jpg", "x/../../up.jpg", "a\x00b.jpg",
            "k" * 1100 + ".jpg", "a//b.jpg", "a/b.jpg", "./c.jpg", "c.jpg", "dir/", "tab\t.jpg"]
    rows, counts = _plan(_write(tmp_path / "m.parquet", "parquet", keys), "/out")
    assert len(rows) == len(keys)
    reasons = [(r["error"] or "ok").split(":")[0] for r in rows]
    assert reasons == ["ok", "duplicate_key", "invalid_key", "invalid_key", "invalid_key",
                       "invalid_key", "ok", "output_collision", "ok", "output_collision",
                       "invalid_key", "invalid_key"]
    assert counts["invalid"] == {"duplicate_key": 1, "invalid_key": 6, "output_collision": 2}
    assert counts["rows"] == 12 and counts["valid"] == 3
    assert all(r["output_key"] == "" for r in rows if r["error"])
    assert "'ok.jpg'" in rows[1]["error"] and "NUL" in rows[4]["error"]


def test_output_key_over_1024_bytes_is_a_failed_row(tmp_path: Path) -> None:
    key = "p/" + "x" * 990 + ".jpg"
    rows, _ = _plan(_write(tmp_path / "m.txt", "txt", [key]), "s3://b/" + "d" * 40)
    assert rows[0]["error"].startswith("invalid_key") and "1024" in rows[0]["error"]


def test_forced_format_changes_extensions_and_finds_collisions(tmp_path: Path) -> None:
    rows, _ = _plan(_write(tmp_path / "m.txt", "txt", ["a.png", "a.jpg", "b.tif"]), "/o",
                    codec=CodecConfig(output_format="jpeg"))
    assert rows[0]["output_key"] == "/o/a.jpg"
    assert rows[1]["error"].startswith("output_collision")
    assert rows[2]["output_key"] == "/o/b.jpg"


def test_listing_a_prefix_on_s3_skips_non_images(storage: Storage, s3_bucket: str) -> None:
    for name in ["x/1.jpg", "x/2.PNG", "x/notes.txt", "x/deep/ü 3.jpeg"]:
        storage.put(f"{s3_bucket}/{name}", b"x")
    rows, _ = _plan(f"{s3_bucket}/x", f"{s3_bucket}/out", storage)
    assert sorted(r["key"] for r in rows) == [f"{s3_bucket}/x/{n}" for n in
                                              ["1.jpg", "2.PNG", "deep/ü 3.jpeg"]]
    assert {r["output_key"] for r in rows} == {f"{s3_bucket}/out/{n}" for n in
                                               ["1.jpg", "2.PNG", "deep/ü 3.jpeg"]}
    with pytest.raises(ConfigError, match="destination .*/x/out is inside source .*/x"):
        _plan(f"{s3_bucket}/x", f"{s3_bucket}/x/out", storage)


def test_write_listing_round_trips_from_anywhere(storage: Storage, s3_bucket: str,
                                                 tmp_path: Path) -> None:
    for name in ["a/1.jpg", "b/2.jpg"]:
        storage.put(f"{s3_bucket}/photos/{name}", b"x")
    out = str(tmp_path / "listing.parquet")
    assert write_listing(f"{s3_bucket}/photos", out, storage) == 2
    assert pq.read_table(out)["key"].to_pylist() == ["a/1.jpg", "b/2.jpg"]
    rows, _ = _plan(out, "/dest", storage)
    assert [r["key"] for r in rows] == [f"{s3_bucket}/photos/a/1.jpg",
                                        f"{s3_bucket}/photos/b/2.jpg"]
    assert [r["output_key"] for r in rows] == ["/dest/a/1.jpg", "/dest/b/2.jpg"]
    with pytest.raises(ManifestError, match="no images"):
        write_listing(f"{s3_bucket}/nothing", out, storage)


def test_iter_shards_regroups_exactly(tmp_path: Path) -> None:
    keys = [f"{i}.jpg" for i in range(2500)]
    batches, _ = plan_rows(_write(tmp_path / "m.txt", "txt", keys), "/o", Storage(),
                           CodecConfig())
    shards = list(iter_shards(batches, 1000))
    assert [s.num_rows for s in shards] == [1000, 1000, 500]
    assert pa.concat_tables(shards)["row_id"].to_pylist() == list(range(2500))


def test_manifest_on_s3(storage: Storage, s3_bucket: str) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": ["p/1.jpg"], "output_key": ["renamed/one.jpg"]}), buf)
    storage.put(f"{s3_bucket}/m/list.parquet", buf.getvalue())
    rows, _ = _plan(f"{s3_bucket}/m/list.parquet", f"{s3_bucket}/out", storage)
    assert rows[0]["key"] == f"{s3_bucket}/m/p/1.jpg"
    assert rows[0]["output_key"] == f"{s3_bucket}/out/renamed/one.jpg"
