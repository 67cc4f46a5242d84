"""The worker's shard pipeline, without Ray: results, failures, overlap and backpressure."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deblur import config as config_mod
from deblur.job.ledger import Ledger
from deblur.io.storage import Storage
from deblur.run.worker import ShardProcessor


def _jpeg(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _job(tmp_path: Path, files: dict[str, bytes], **overrides: object) -> Ledger:
    src = tmp_path / "src"
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    job = config_mod.load(None, {"source": str(src), "destination": str(tmp_path / "out"),
                                 "job_root": str(tmp_path / "job"), "model.random_weights": True,
                                 "worker.io_threads": 2, **overrides})
    return Ledger.create(Storage(job.storage), job, job_id="test", model_info={})


def identity(images: list[np.ndarray], shape: tuple[int, int] | None) -> list[np.ndarray]:
    return [img.copy() for img in images]


def _results(ledger: Ledger, shard: int) -> list[dict]:
    table = ledger.read_result(shard)
    assert table is not None
    return sorted(table.to_pylist(), key=lambda r: r["row_id"])


def test_every_row_once_with_clear_failures(tmp_path: Path) -> None:
    files = {f"ok/{i}.jpg": _jpeg(40 + i, 30, i) for i in range(5)}
    files |= {"bad/empty.jpg": b"", "bad/text.jpg": b"hello, not an image",
              "bad/truncated.jpg": _jpeg(64, 64, 9)[:200]}
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


def test_io_overlaps_compute_and_shards_share_batches(tmp_path: Path) -> None:
    files = {f"{i:02d}.jpg": _jpeg(32, 32, i) for i in range(16)}
    ledger = _job(tmp_path, files, shard_size=8, **{"batch.max_batch": 4,
                                                    "batch.max_wait_ms": 200})
    fetches: list[float] = []
    calls: list[tuple[float, float, int]] = []
    storage = Storage()
    get = storage.get
    storage.get = lambda uri: (fetches.append(time.monotonic()), get(uri))[1]  # type: ignore

    def slow_model(images: list[np.ndarray], shape: tuple[int, int] | None) -> list[np.ndarray]:
        start = time.monotonic()
        time.sleep(0.1)
        calls.append((start, time.monotonic(), len(images)))
        return identity(images, shape)

    processor = ShardProcessor(ledger.config(), slow_model, "w0", storage)
    outs: list[dict] = []
    threads = [threading.Thread(target=lambda s=s: outs.append(
        processor.process(ledger.job_root, s, 1))) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(o["rows"] for o in outs) == [8, 8]
    assert sum(n for *_, n in calls) == 16
    # Two shards in flight feed one engine: batches are full, at most one partial batch at
    # the boundary (when the second shard's first image is not decoded yet, the engine does
    # not sit on a partial batch).
    assert len(calls) <= 5 and sum(n == 4 for *_, n in calls) >= 3
    # Fetching went on while the model ran (pipelined, not fetch-all-then-infer).
    busy = [(a, b) for a, b, _ in calls]
    assert any(a < f < b for f in fetches for a, b in busy) or max(fetches) > calls[0][0]


def test_backpressure_bounds_decoded_images(tmp_path: Path) -> None:
    files = {f"{i:02d}.jpg": _jpeg(16, 16, i) for i in range(24)}
    ledger = _job(tmp_path, files, **{"worker.prefetch": 2, "batch.max_batch": 1})
    processor = ShardProcessor(ledger.config(), identity, "w0", Storage())
    decoded, peak = [0], [0]
    engine = processor.engine
    put = engine.inbox.put

    def counting_put(item) -> None:
        put(item)
        decoded[0] += 1
        peak[0] = max(peak[0], engine.inbox.qsize())

    def slow(images, shape):
        time.sleep(0.02)
        return identity(images, shape)

    engine.inbox.put = counting_put  # type: ignore[method-assign]
    engine.infer = slow
    processor.process(ledger.job_root, 0, 1)
    assert decoded[0] == 24 and peak[0] <= 2


def test_model_failure_is_per_image(tmp_path: Path) -> None:
    files = {f"{i}.jpg": _jpeg(24 + 4 * i, 24, i) for i in range(3)}
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
    ledger = _job(tmp_path, {"a.jpg": _jpeg(16, 16, 0), "b.jpg": _jpeg(16, 16, 1)})
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
    ledger = _job(tmp_path, {"a.jpg": _jpeg(16, 16, 0), "b.jpg": _jpeg(16, 16, 1)})
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
    files = {f"d{i % 3}/{i}.jpg": _jpeg(8 + i % 5, 8 + i % 7, i) for i in range(60)}
    ledger = _job(tmp_path, files, **{"worker.io_threads": threads, "batch.max_batch": 8})
    ShardProcessor(ledger.config(), identity, "w0", Storage()).process(ledger.job_root, 0, 1)
    rows = _results(ledger, 0)
    assert len(rows) == 60 and all(r["status"] == "ok" for r in rows)
