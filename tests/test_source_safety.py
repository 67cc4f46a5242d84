"""Data safety of sources: listed keys stay literal, links stay inside, manifest entries stay
under allowed prefixes, .txt keys are kept as written, inputs are never silently replaced
(nor deblurred twice in place), and a destination inside its source is refused up front.

Each test runs on a real local folder and, where the store can express the problem, on moto
S3 (the ``root`` fixture)."""

from __future__ import annotations

import io
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from deblur import config as config_mod
from deblur.config import CodecConfig, JobConfig
from deblur.errors import ConfigError
from deblur.io.storage import Storage, is_s3, join, parse_s3
from deblur.job.ledger import Ledger
from deblur.job.manifest import plan_rows, write_listing
from deblur.run.driver import open_or_plan
from deblur.run.worker import ShardProcessor
from tests.conftest import CountingStorage, identity, image_bytes, job_config, noise, unsharp

ROOT = Path(__file__).resolve().parents[1]


def png(seed: int, size: int = 32) -> bytes:
    return image_bytes(noise(size, size, seed), "PNG")


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _rows(source: str, dest: str, storage: Storage, job: JobConfig | None = None
          ) -> list[dict]:
    batches, _ = plan_rows(source, dest, storage, CodecConfig(), job=job)
    return [r for b in batches for r in b.to_pylist()]


def _reason(row: dict) -> str:
    return (row.get("error") or "ok").split(":")[0] if "status" not in row else (
        row["reason"] or "ok")


def _plan_and_run(storage: Storage, job: JobConfig, model=identity, job_id: str = "t"
                  ) -> tuple[Ledger, dict[str, dict]]:
    ledger = Ledger.create(storage, job, job_id=job_id, model_info={})
    processor = ShardProcessor(ledger.config(), model, "w0", storage)
    processor.process(ledger.job_root, 0, attempt=1)
    result = ledger.read_result(0)
    assert result is not None
    return ledger, {r["key"]: r for r in result.to_pylist()}


# -- 1. a listed key is a literal key under the listed prefix, never a URI --------------------

def test_listed_keys_are_literal_keys_never_uris(root: str, tmp_path: Path) -> None:
    storage = CountingStorage()
    secret = tmp_path / "keys" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(png(99))
    private = None
    if is_s3(root):
        private_bucket = f"private-{uuid.uuid4().hex[:8]}"
        storage.client.create_bucket(Bucket=private_bucket)
        private = f"s3://{private_bucket}/secret.png"
        storage.put(private, png(98))
    names = ["ok.png", f"file://{secret}", f"s3://{private and parse_s3(private)[0] or 'p'}"
             "/secret.png"]
    src = join(root, "src")
    for i, name in enumerate(names):
        storage.put(f"{src}/{name}", png(i))
    if is_s3(root):  # "in2//srv/…": a key whose part after the prefix is an absolute path
        bucket, key = parse_s3(src)
        storage.client.put_object(Bucket=bucket, Key=f"{key}/{secret}", Body=png(7))
    forbidden = {str(secret), f"file://{secret}", private}

    job = job_config(src, join(root, "out"), join(root, "job"))
    _, results = _plan_and_run(storage, job)
    assert len(results) == len(names) + is_s3(root)
    assert all(key.startswith(src + "/") for key in results), list(results)
    read = [u for u in storage.whole if not u.startswith(join(root, "job"))]
    assert not forbidden & set(read), read
    assert all(u.startswith(src + "/") for u in read), read
    for row in results.values():  # what was written is the listed object, not the secret
        if row["status"] == "ok":
            assert not np.array_equal(pixels(storage.get(row["output_key"])),
                                      pixels(secret.read_bytes()))

    # A listing saved by `deblur manifest` keeps its keys literal too.
    listing = join(root, "listing.parquet")
    write_listing(src, listing, storage)
    assert all(r["key"].startswith(src + "/")
               for r in _rows(listing, join(root, "out2"), storage))


# -- 2. local links: inside fine, outside refused (unless --follow-links), broken = failed row --

def _linked_source(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.png").write_bytes(png(1))
    secret = tmp_path / "secret" / "s.png"
    secret.parent.mkdir()
    secret.write_bytes(png(99))
    os.symlink("../a.png", src / "sub" / "inside.png")
    os.symlink(secret, src / "outside.png")
    os.symlink(src / "loop.png", src / "loop.png")
    os.symlink(src / "nothing.png", src / "dangling.png")
    return src, secret


EXPECTED_LINKS = {"a.png": "ok", "sub/inside.png": "ok", "outside.png": "outside_source",
                  "loop.png": "broken_link", "dangling.png": "broken_link"}


def test_links_planned_as_failed_rows_never_a_crash_or_a_skip(tmp_path: Path) -> None:
    src, _ = _linked_source(tmp_path)
    job = JobConfig(source=str(src), destination=str(tmp_path / "out"))
    rows = _rows(str(src), str(tmp_path / "out"), Storage(), job)
    got = {os.path.relpath(r["key"], src): _reason(r) for r in rows}
    assert got == EXPECTED_LINKS
    outside = next(r for r in rows if r["key"].endswith("outside.png"))
    assert "--follow-links" in outside["error"] and "outside.png" in outside["error"]

    followed = _rows(str(src), str(tmp_path / "out"), Storage(),
                     JobConfig(source=str(src), destination=str(tmp_path / "out"),
                               follow_links=True))
    assert {os.path.relpath(r["key"], src): _reason(r) for r in followed} == {
        **EXPECTED_LINKS, "outside.png": "ok"}


@pytest.mark.parametrize("follow", [False, True])
def test_worker_never_reads_through_a_link_out_of_the_source(tmp_path: Path,
                                                             follow: bool) -> None:
    src, secret = _linked_source(tmp_path)
    storage = CountingStorage()
    job = job_config(str(src), str(tmp_path / "out"), str(tmp_path / "job"),
                     follow_links=follow or None)
    _, results = _plan_and_run(storage, job)
    got = {os.path.relpath(k, src): r["reason"] or "ok" for k, r in results.items()}
    assert got == {**EXPECTED_LINKS, **({"outside.png": "ok"} if follow else {})}
    assert any(u.endswith("outside.png") for u in storage.whole) == follow
    for key, row in results.items():
        if row["status"] == "failed":
            assert key in row["error"]


def test_link_swapped_in_after_planning_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(png(1))
    secret = tmp_path / "s.png"
    secret.write_bytes(png(99))
    storage = CountingStorage()
    ledger = Ledger.create(storage, job_config(str(src), str(tmp_path / "out"),
                                               str(tmp_path / "job")), job_id="t", model_info={})
    (src / "a.png").unlink()
    os.symlink(secret, src / "a.png")
    ShardProcessor(ledger.config(), identity, "w0", storage).process(ledger.job_root, 0, 1)
    (row,) = ledger.read_result(0).to_pylist()
    assert row["reason"] == "outside_source"
    assert str(src / "a.png") not in storage.whole


# -- 3. manifest entries that are absolute paths or URIs: allowed prefixes ---------------------

def _new_bucket() -> str:
    name = f"other-{uuid.uuid4().hex[:12]}"
    Storage().client.create_bucket(Bucket=name)
    return f"s3://{name}"


def test_manifest_uris_must_lie_under_an_allowed_prefix(root: str) -> None:
    storage = CountingStorage()
    # By default a manifest on S3 may name its whole bucket: "outside" is another bucket.
    folder, other = join(root, "m"), (f"{_new_bucket()}/other" if is_s3(root)
                                      else join(root, "other"))
    for name in ["rel.png", "abs.png"]:
        storage.put(f"{folder}/{name}", png(1))
    for name in ["secret.png", "s2.png"]:
        storage.put(f"{other}/{name}", png(99))
    entries = ["rel.png", f"{folder}/abs.png", f"{other}/secret.png"]
    expected = ["ok", "ok", "outside_source"]
    if not is_s3(root):  # a local manifest's default is its folder: '..' climbs out of it
        entries += [f"{folder}/../other/s2.png", f"{folder}//..//other/s2.png",
                    f"file://{folder}/abs.png", f"file://{folder}/../other/secret.png"]
        expected += ["outside_source", "outside_source", "duplicate_key", "outside_source"]
    manifest = f"{folder}/list.txt"
    storage.put(manifest, "\n".join(entries).encode())
    dest = join(root, "out")

    rows = _rows(manifest, dest, storage)  # default: the manifest's bucket/folder, SOURCE, DEST
    assert [_reason(r) for r in rows] == expected
    assert folder in rows[2]["error"] and "--allow-prefix" in rows[2]["error"]

    job = JobConfig(source=manifest, destination=dest, allow_prefixes=(other,))
    explicit = _rows(manifest, dest, storage, job)
    assert [_reason(r) for r in explicit][:3] == ["ok", "outside_source", "ok"]
    job = JobConfig(source=manifest, destination=dest, allow_prefixes=(folder,))
    if not is_s3(root):
        assert [_reason(r) for r in _rows(manifest, dest, storage, job)][3:5] == [
            "outside_source", "outside_source"]  # m/../other is not under m/

    # The real pipeline: planned, run, and the secret objects are never read.
    ledger, _ = _plan_and_run(storage, job_config(manifest, dest, join(root, "job")))
    results = sorted(ledger.read_result(0).to_pylist(), key=lambda r: r["row_id"])
    assert [r["reason"] or "ok" for r in results] == expected
    assert not [u for u in storage.whole if "other" in u]


# -- 4. .txt manifests: lines end at \n only; keys kept as written -----------------------------

def test_text_manifest_splits_on_newline_only_and_keeps_spaces(root: str) -> None:
    storage = Storage()
    text = ("# a comment\r\n a.png \r\nb\u2028c.png\nd\u0085e.png\r\nf\u2029g.png\n\n"
            "   \nh.png\r\n\r\n# x.png\n")
    manifest = join(root, "list.txt")
    storage.put(manifest, text.encode())
    storage.put(join(root, " a.png "), png(1))
    rows = _rows(manifest, join(root, "out"), storage)
    keys = [" a.png ", "b\u2028c.png", "d\u0085e.png", "f\u2029g.png", "   ", "h.png"]
    assert [r["key"] for r in rows[:4] + rows[5:]] == [
        join(root, k) for k in keys[:4] + keys[5:]]
    assert [_reason(r) for r in rows] == ["ok"] * 4 + ["invalid_key", "ok"]
    assert rows[0]["output_key"] == join(root, "out/ a.png ")
    _, results = _plan_and_run(storage, job_config(manifest, join(root, "out"),
                                                   join(root, "job")))
    assert results[join(root, " a.png ")]["status"] == "ok"


# -- 5. in place: refused unless --overwrite-inputs, and then never deblurred twice ------------

def test_in_place_is_refused_without_overwrite_inputs(root: str) -> None:
    storage = Storage()
    src = join(root, "src")
    originals = {"a.png": png(1), "b/c.png": png(2)}
    for name, data in originals.items():
        storage.put(join(src, name), data)
    job = job_config(src, src, join(root, "job"))
    rows = _rows(src, src, storage, job)
    assert [_reason(r) for r in rows] == ["would_overwrite_input"] * 2
    assert "--overwrite-inputs" in rows[0]["error"]
    _, results = _plan_and_run(storage, job, model=unsharp)
    assert {r["reason"] for r in results.values()} == {"would_overwrite_input"}
    for name, data in originals.items():
        assert storage.get(join(src, name)) == data

    # An output_key naming the input itself is the same thing.
    manifest = join(root, "m.csv")
    storage.put(manifest, b"key,output_key\nsrc/a.png,../src/a.png\nsrc/b/c.png,x.png\n")
    rows = _rows(manifest, root, storage, JobConfig(source=manifest, destination=root))
    assert [_reason(r) for r in rows] == ["invalid_key", "ok"]  # '..' never gets that far
    storage.put(manifest, b"key,output_key\nsrc/a.png,src/a.png\n")
    rows = _rows(manifest, root, storage, JobConfig(source=manifest, destination=root))
    assert [_reason(r) for r in rows] == ["would_overwrite_input"]


def test_in_place_rerun_after_a_kill_deblurs_each_original_once(
        root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = Storage()
    src = join(root, "src")
    originals = {"a.png": png(1), "b/c.png": png(2)}
    for name, data in originals.items():
        storage.put(join(src, name), data)
    job = job_config(src, src, join(root, "job"), overwrite_inputs=True)
    ledger = Ledger.create(storage, job, job_id="t", model_info={})

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed before the shard's result was committed")

    monkeypatch.setattr(Ledger, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        ShardProcessor(ledger.config(), unsharp, "w0", storage).process(ledger.job_root, 0, 1)
    monkeypatch.undo()
    for name, data in originals.items():  # the first attempt did replace the inputs
        assert storage.get(join(src, name)) != data
    ShardProcessor(ledger.config(), unsharp, "w1", storage).process(ledger.job_root, 0, 2)
    results = ledger.read_result(0).to_pylist()
    assert [r["status"] for r in results] == ["ok", "ok"]
    for name, data in originals.items():
        once = unsharp([pixels(data)], None)[0]
        assert np.array_equal(pixels(storage.get(join(src, name))), once), name
        assert not np.array_equal(once, unsharp([once], None)[0])  # twice would show


def test_in_place_listing_skips_the_default_job_area(root: str) -> None:
    storage = Storage()
    src = join(root, "src")
    storage.put(join(src, "a.png"), png(1))
    storage.put(join(src, "_deblur/old-job/x.png"), png(2))
    rows = _rows(src, src, storage,
                 JobConfig(source=src, destination=src, overwrite_inputs=True))
    assert [(r["key"], _reason(r)) for r in rows] == [(join(src, "a.png"), "ok")]


# -- 6. a destination inside the source folder ------------------------------------------------

def test_destination_inside_source_is_a_config_error_before_any_write(root: str) -> None:
    storage = Storage()
    src = join(root, "src")
    storage.put(join(src, "a.png"), png(1))
    for dest in [join(src, "out"), join(src, "x/../out"), src + "//out"]:
        # The planner's rule (config stays below job/): before the model, Ray or any write.
        with pytest.raises(ConfigError, match=r"destination .* is inside source .*src"):
            open_or_plan(job_config(src, dest), storage, resume=False)
        with pytest.raises(ConfigError, match="is inside source"):
            _rows(src, dest, storage)
        with pytest.raises(ConfigError, match="is inside source"):
            Ledger.create(storage, JobConfig(source=src, destination=dest,
                                             job_root=join(root, "job")),
                          job_id="t", model_info={})
    if not is_s3(root):  # the command: one line, exit 2, Ray never started
        from deblur.cli import app

        result = CliRunner().invoke(app, ["run", src, join(src, "out"), "--random-weights"])
        assert result.exit_code == 2 and "is inside source" in result.output, result.output
        assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert [i.key for i in storage.list(root)] == ["src/a.png"]
    job_config(src, src)  # in place is checked per row, not here
    job_config(join(root, "m.txt"), join(root, "out"))  # a manifest's folder is no source


# -- options: CLI, config file -----------------------------------------------------------------

def test_options_in_help_and_default_config(tmp_path: Path) -> None:
    from deblur.cli import app

    out = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output
    for option in ["--follow-links", "--allow-prefix", "--overwrite-inputs"]:
        assert option in out
    text = (ROOT / "configs" / "default.yaml").read_text()
    for key in ["follow_links:", "allow_prefixes:", "overwrite_inputs:"]:
        assert key in text
    path = tmp_path / "job.yaml"
    path.write_text("allow_prefixes: [s3://a/b/, /data]\nfollow_links: true\n"
                    "overwrite_inputs: true\n")
    job = config_mod.load(path, {"model.random_weights": True})
    assert job.allow_prefixes == ("s3://a/b/", "/data")
    assert job.follow_links and job.overwrite_inputs
    assert config_mod.from_dict(job.to_dict()) == job


def test_no_output_key_may_fall_inside_a_job_root(root: str) -> None:
    # A CSV row whose output_key names another job's job.json was written over it.
    storage = Storage()
    dest, other_root = join(root, "out"), join(root, "out/_deblur/other")
    storage.put(join(root, "src/a.png"), png(1))
    storage.put(join(root, "src/b.png"), png(2))
    storage.put(join(other_root, "job.json"), b'{"job_id": "other"}')
    manifest = join(root, "src/manifest.csv")
    storage.put(manifest, b"key,output_key\na.png,_deblur/other/job.json\n"
                          b"b.png,ledger//x.png\n")
    own_root = join(root, "out/ledger")
    rows = _rows(manifest, dest, storage, job_config(manifest, dest, own_root))
    assert [_reason(r) for r in rows] == ["reserved_output", "reserved_output"], rows
    assert "_deblur" in rows[0]["error"] and own_root.rstrip("/") in rows[1]["error"]
    # Planned and run: neither job root is touched, the other job still reads.
    _plan_and_run(storage, job_config(manifest, dest, own_root))
    assert storage.get(join(other_root, "job.json")) == b'{"job_id": "other"}'
