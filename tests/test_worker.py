"""The worker's shard pipeline, without Ray: results, failures, overlap and backpressure."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deblur.dev.samples import make_scene, motion_blur
from deblur.io.storage import Storage
from deblur.job.ledger import Ledger
from deblur.run.worker import ShardProcessor
from tests.conftest import CountingStorage, identity, image_bytes, jpeg, make_job, unsharp

WAIT_S = 30.0  # how long a test waits for a pipeline event before calling it a failure


def _job(tmp_path: Path, files: dict[str, bytes], **overrides: object) -> Ledger:
    return make_job(str(tmp_path), files, **{"worker.io_threads": 2, **overrides})


def _results(ledger: Ledger, shard: int) -> list[dict]:
    table = ledger.read_result(shard)
    assert table is not None
    return sorted(table.to_pylist(), key=lambda r: r["row_id"])


def test_every_row_once_with_clear_failures(tmp_path: Path) -> None:
    files = {f"ok/{i}.jpg": jpeg(40 + i, 30, i) for i in range(5)}
    files |= {"bad/empty.jpg": b"", "bad/text.jpg": b"hello, not an image",
              "bad/truncated.jpg": jpeg(64, 64, 9)[:200]}
    ledger = _job(tmp_path, files)
    processor = ShardProcessor(ledger.config(), identity, "w0", Storage())
    report = processor.process(ledger.job_root, 0, attempt=1)
    rows = _results(ledger, 0)
    assert report["rows"] == len(files) == len(rows)
    assert sorted(r["row_id"] for r in rows) == list(range(len(files)))
    by_key = {Path(r["key"]).name: r for r in rows}
    assert {k for k, r in by_key.items() if r["status"] == "ok"} == {f"{i}.jpg" for i in range(5)}
    assert by_key["empty.jpg"]["reason"] == "empty"
    assert by_key["text.jpg"]["reason"] in ("unsupported_format", "corrupt")
    assert by_key["truncated.jpg"]["reason"] in ("truncated", "corrupt")
    for row in rows:
        if row["status"] == "failed":
            assert row["key"] in row["error"] and "\n" not in row["error"]
        else:
            out = Image.open(io.BytesIO(Path(row["output_key"]).read_bytes()))
            assert out.size == (row["width"], row["height"])
            assert row["attempt"] == 1 and row["worker"] == "w0" and row["bytes_out"] > 0


def test_fetching_goes_on_while_the_model_runs(tmp_path: Path) -> None:
    files = {f"{i:02d}.jpg": jpeg(32, 32, i) for i in range(12)}
    # while the first batch (at most 4) is held, the queue and the fetch threads hold the rest
    ledger = _job(tmp_path, files, **{"batch.max_batch": 4, "worker.prefetch": 16})
    src = str(tmp_path / "src")
    fetched: list[str] = []
    all_fetched = threading.Event()

    def on_get(uri: str) -> None:
        if uri.startswith(src):
            fetched.append(uri)
            if len(fetched) == len(files):
                all_fetched.set()

    calls: list[int] = []
    fetched_while_first_batch_ran: list[bool] = []

    def model(images: list[np.ndarray], shape: tuple[int, int] | None) -> list[np.ndarray]:
        if not calls:  # hold the first batch until every input has been fetched
            fetched_while_first_batch_ran.append(all_fetched.wait(WAIT_S))
        calls.append(len(images))
        return identity(images, shape)

    processor = ShardProcessor(ledger.config(), model, "w0", CountingStorage(on_get=on_get))
    report = processor.process(ledger.job_root, 0, 1)
    # pipelined: fetching does not wait for the model (not fetch-a-batch, infer, in turns)
    assert fetched_while_first_batch_ran == [True], "fetching stopped while the model ran"
    assert report["ok"] == sum(calls) == 12 and len(calls) > 1


def test_shards_in_flight_share_batches(tmp_path: Path) -> None:
    # Shard 0 is 32x32 images, shard 1 32x31: one bucket (32x32), told apart in the model.
    files = {f"{i:02d}.jpg": jpeg(32 if i < 6 else 31, 32, i) for i in range(12)}
    ledger = _job(tmp_path, files, shard_size=6, **{
        "worker.io_threads": 12, "batch.max_batch": 4, "batch.max_wait_ms": 60_000})
    src = str(tmp_path / "src")
    # Every fetch waits until all 12 have started, so both shards' rows are queued before the
    # first image is decoded (no partial batch because the engine briefly had nothing to do).
    started = threading.Barrier(len(files))

    def on_get(uri: str) -> None:
        if uri.startswith(src):
            try:
                started.wait(WAIT_S)
            except threading.BrokenBarrierError:
                pass  # reported below

    batches: list[list[int]] = []  # image widths per model call

    def model(images: list[np.ndarray], shape: tuple[int, int] | None) -> list[np.ndarray]:
        batches.append([img.shape[1] for img in images])
        return identity(images, shape)

    processor = ShardProcessor(ledger.config(), model, "w0", CountingStorage(on_get=on_get))
    reports: list[dict] = []
    threads = [threading.Thread(target=lambda s=s: reports.append(
        processor.process(ledger.job_root, s, 1))) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not started.broken, "the 12 fetches never ran at once (worker.io_threads=12)"
    assert sorted(r["ok"] for r in reports) == [6, 6]
    # One engine batches both shards: full batches, one of them holding images of each
    # (shards of 6 cannot fill batches of 4 on their own).
    assert [len(b) for b in batches] == [4, 4, 4], batches
    assert any({32, 31} <= set(widths) for widths in batches), batches


def test_backpressure_bounds_what_the_worker_holds(tmp_path: Path) -> None:
    count = 40
    files = {f"{i:02d}.jpg": jpeg(16, 16, i) for i in range(count)}
    ledger = _job(tmp_path, files, **{"worker.prefetch": 2, "worker.io_threads": 2,
                                      "batch.max_batch": 2, "batch.max_wait_ms": 60_000})
    config = ledger.config()
    # With the model stuck, the worker may hold one batch in the model, the decoded queue,
    # and one image in each fetch thread waiting for room in that queue; never the shard.
    bound = config.batch.max_batch + config.worker.prefetch + config.worker.io_threads
    full = 1 + config.worker.prefetch + config.worker.io_threads  # even if the batch is 1
    src = str(tmp_path / "src")
    fetched = [0]
    lock = threading.Lock()
    entered, release = threading.Event(), threading.Event()
    filled, overflow = threading.Event(), threading.Event()

    def on_get(uri: str) -> None:
        if not uri.startswith(src):
            return  # the ledger's own reads
        with lock:
            fetched[0] += 1
            n = fetched[0]
        if n >= full:
            filled.set()
        if n > bound and not release.is_set():
            overflow.set()

    def stuck_model(images: list[np.ndarray], shape: tuple[int, int] | None
                    ) -> list[np.ndarray]:
        entered.set()
        release.wait(WAIT_S)
        return identity(images, shape)

    processor = ShardProcessor(config, stuck_model, "w0", CountingStorage(on_get=on_get))
    report: dict = {}
    worker = threading.Thread(
        target=lambda: report.update(processor.process(ledger.job_root, 0, 1)))
    worker.start()
    try:
        assert entered.wait(WAIT_S), "no batch reached the model"
        assert filled.wait(WAIT_S), f"only {fetched[0]} images fetched; the queue never filled"
        # Proving a negative needs a grace period: if nothing held the fetchers back, the
        # remaining images would be fetched within milliseconds.
        assert not overflow.wait(0.5), (
            f"{fetched[0]} of {count} images fetched while the model was stuck; bound {bound}")
    finally:
        release.set()
        worker.join(WAIT_S)
    assert report["rows"] == report["ok"] == count and fetched[0] == count
    assert all(r["status"] == "ok" for r in _results(ledger, 0))


def test_model_failure_is_per_image(tmp_path: Path) -> None:
    files = {f"{i}.jpg": jpeg(24 + 4 * i, 24, i) for i in range(3)}
    ledger = _job(tmp_path, files, **{"batch.bucket_multiple": 64})

    def picky(images, shape):
        if any(img.shape[1] == 28 for img in images):
            raise RuntimeError("CUDA out of memory (simulated)")
        return identity(images, shape)

    ShardProcessor(ledger.config(), picky, "w0", Storage()).process(ledger.job_root, 0, 1)
    rows = {Path(r["key"]).name: r for r in _results(ledger, 0)}
    assert rows["1.jpg"]["reason"] == "inference_failed"
    assert "out of memory" in rows["1.jpg"]["error"]
    assert rows["0.jpg"]["status"] == rows["2.jpg"]["status"] == "ok"


def test_upload_failure_is_a_failed_row(tmp_path: Path) -> None:
    ledger = _job(tmp_path, {"a.jpg": jpeg(16, 16, 0), "b.jpg": jpeg(16, 16, 1)})
    storage = Storage()
    put = storage.put

    def flaky_put(uri: str, data: bytes, content_type: str | None = None) -> None:
        if uri.endswith("b.jpg"):
            from deblur.errors import AccessDeniedError

            raise AccessDeniedError(f"access denied writing {uri}", uri)
        put(uri, data, content_type)

    storage.put = flaky_put  # type: ignore[method-assign]
    ShardProcessor(ledger.config(), identity, "w0", storage).process(ledger.job_root, 0, 1)
    rows = {Path(r["key"]).name: r for r in _results(ledger, 0)}
    assert rows["b.jpg"]["reason"] == "upload_failed" and rows["a.jpg"]["status"] == "ok"


def test_missing_input_then_rerun_keeps_ok_rows(tmp_path: Path) -> None:
    ledger = _job(tmp_path, {"a.jpg": jpeg(16, 16, 0), "b.jpg": jpeg(16, 16, 1)})
    missing = tmp_path / "src" / "b.jpg"
    saved = missing.read_bytes()
    missing.unlink()
    processor = ShardProcessor(ledger.config(), identity, "w0", Storage())
    processor.process(ledger.job_root, 0, 1)
    rows = {Path(r["key"]).name: r for r in _results(ledger, 0)}
    assert rows["b.jpg"]["reason"] == "not_found"
    ok_output = Path(rows["a.jpg"]["output_key"])
    mtime = ok_output.stat().st_mtime_ns
    missing.write_bytes(saved)
    processor.process(ledger.job_root, 0, 1)
    rows = {Path(r["key"]).name: r for r in _results(ledger, 0)}
    assert rows["b.jpg"]["status"] == "ok" and rows["b.jpg"]["attempt"] == 2
    assert ok_output.stat().st_mtime_ns == mtime  # the ok image was not rewritten
    table = pq.read_table(str(Path(ledger.job_root) / "results" / "00000.parquet"))
    assert table.num_rows == 2


@pytest.mark.parametrize("threads", [1, 4])
def test_many_small_images(tmp_path: Path, threads: int) -> None:
    files = {f"d{i % 3}/{i}.jpg": jpeg(8 + i % 5, 8 + i % 7, i) for i in range(60)}
    ledger = _job(tmp_path, files, **{"worker.io_threads": threads, "batch.max_batch": 8})
    ShardProcessor(ledger.config(), identity, "w0", Storage()).process(ledger.job_root, 0, 1)
    rows = _results(ledger, 0)
    assert len(rows) == 60 and all(r["status"] == "ok" for r in rows)


def _motion_blur(images: list[np.ndarray], shape: tuple[int, int] | None) -> list[np.ndarray]:
    return [motion_blur(img, 9, 30.0) for img in images]


@pytest.mark.parametrize(("model", "sharper"), [(_motion_blur, False), (unsharp, True)])
def test_rows_record_sharpness_of_output_over_input(tmp_path: Path, model: Callable,
                                                     sharper: bool) -> None:
    files = {f"{i}.png": image_bytes(make_scene(np.random.default_rng(i), 64, 80), "PNG")
             for i in range(3)}
    ledger = _job(tmp_path, files)
    ShardProcessor(ledger.config(), model, "w0", Storage()).process(ledger.job_root, 0, 1)
    for row in _results(ledger, 0):
        assert row["status"] == "ok"
        ratio, lap_in, lap_out = row["sharpness_ratio"], row["sharpness_in"], row["sharpness_out"]
        assert ratio == pytest.approx(lap_out / lap_in, rel=1e-5)
        if sharper:
            assert ratio > 1.5 and row["tenengrad_out"] > row["tenengrad_in"]
        else:
            assert ratio < 0.5 and row["tenengrad_out"] < row["tenengrad_in"]
