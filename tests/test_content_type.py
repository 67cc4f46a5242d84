"""Uploaded outputs carry their Content-Type on S3 (moto over HTTP), so browsers and CDNs
serve them as images; a local store has no place for one and ignores it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deblur.io.storage import Storage, parse_s3
from deblur.run.worker import ShardProcessor
from tests.conftest import identity, image_bytes, jpeg, make_job, noise


def _inputs() -> dict[str, bytes]:
    pixels = noise(24, 20, 3)
    return {"a.jpg": jpeg(24, 20, 1), "b.png": image_bytes(pixels, "PNG"),
            "c.webp": image_bytes(pixels, "WEBP", quality=90),
            "d.tif": image_bytes(pixels, "TIFF")}


def _run(root: str, storage: Storage, **overrides: object) -> list[dict]:
    ledger = make_job(root, _inputs(), storage, **{"worker.io_threads": 2, **overrides})
    ShardProcessor(ledger.config(), identity, "w0", storage).process(ledger.job_root, 0, 1)
    table = ledger.read_result(0)
    assert table is not None
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * len(rows), rows
    return rows


def _content_type(storage: Storage, uri: str) -> str:
    bucket, key = parse_s3(uri)
    return storage.client.head_object(Bucket=bucket, Key=key)["ContentType"]


@pytest.mark.integration
def test_s3_outputs_carry_the_type_of_their_format(storage: Storage, s3_bucket: str) -> None:
    rows = _run(s3_bucket + "/data", storage)
    types = {Path(r["output_key"]).suffix: _content_type(storage, r["output_key"])
             for r in rows}
    assert types == {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
                     ".tif": "image/tiff"}


@pytest.mark.integration
def test_a_forced_output_format_sets_its_type(storage: Storage, s3_bucket: str) -> None:
    rows = _run(s3_bucket + "/data", storage, **{"codec.output_format": "png"})
    assert {_content_type(storage, r["output_key"]) for r in rows} == {"image/png"}


def test_local_outputs_are_written_without_one(tmp_path: Path) -> None:
    rows = _run(str(tmp_path), Storage())
    for row in rows:
        assert Path(row["output_key"]).stat().st_size == row["bytes_out"]
    assert np.all([Path(r["output_key"]).exists() for r in rows])
