"""Storage against moto's server over HTTP and against local folders."""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from deblur.config import StorageConfig
from deblur.errors import AccessDeniedError, AlreadyExistsError, NotFoundError, StorageError
from deblur.io.local import TMP_MARK
from deblur.io.storage import ObjectInfo, Storage, get_storage, join, parse_s3

SECRET = "testing-secret-never-shown"


@pytest.fixture(params=["s3", "local"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket") + "/data"
    return str(tmp_path / "data")


def test_round_trip_and_head(storage: Storage, root: str) -> None:
    uri = join(root, "a dir/ünïcode photo.jpg")
    storage.put(uri, b"hello", "image/jpeg")
    assert storage.get(uri) == b"hello"
    info = storage.head(uri)
    assert info.size == 5 and info.mtime > 0
    assert storage.exists(uri) and not storage.exists(join(root, "nope.jpg"))
    storage.put(uri, b"replaced")
    assert storage.get(uri) == b"replaced"
    storage.delete(uri)
    storage.delete(uri)  # idempotent
    assert not storage.exists(uri)


def test_missing_object_is_not_found_naming_the_uri(storage: Storage, root: str) -> None:
    uri = join(root, "missing.jpg")
    with pytest.raises(NotFoundError, match="missing.jpg"):
        storage.get(uri)
    with pytest.raises(NotFoundError):
        storage.head(uri)


def test_get_range_reads_only_the_bytes_asked_for(storage: Storage, root: str) -> None:
    uri = join(root, "big.bin")
    data = bytes(range(256)) * 4096  # 1 MiB
    storage.put(uri, data)
    before = storage.ops["GET"]
    assert storage.get_range(uri, 100) == data[:100]
    assert storage.get_range(uri, 10, start=1000) == data[1000:1010]
    assert storage.get_range(uri, 100, start=len(data) - 30) == data[-30:]  # short at the end
    assert storage.get_range(uri, 100, start=len(data)) == b""  # past the end: nothing
    assert storage.ops["GET"] - before == 4  # one request each, counted as GETs
    storage.put(join(root, "zero.bin"), b"")
    assert storage.get_range(join(root, "zero.bin"), 100) == b""
    with pytest.raises(NotFoundError, match="missing.bin"):
        storage.get_range(join(root, "missing.bin"), 100)


def test_a_missing_object_is_not_found_whatever_its_name(storage: Storage, root: str) -> None:
    # S3's "range not satisfiable" must be told apart by its code, not by "416" in a message
    # that quotes the URI.
    uri = join(root, "IMG_4160.JPG")
    with pytest.raises(NotFoundError, match="IMG_4160"):
        storage.get_range(uri, 100)


def test_missing_bucket_is_not_found(storage: Storage) -> None:
    with pytest.raises(NotFoundError, match="s3://no-such-bucket-x/k"):
        storage.get("s3://no-such-bucket-x/k")


def test_listing_paginates_past_1000(storage: Storage, s3_bucket: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    prefix = s3_bucket + "/many"
    names = [f"d{i % 7}/img{i:05d}.jpg" for i in range(1234)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: storage.put(join(prefix, n), b"x"), names))
    storage.put(join(prefix, "notes.txt"), b"x")
    storage.put(s3_bucket + "/many-other/x.jpg", b"x")  # shares the string prefix only
    listed = list(storage.list(prefix, (".jpg",)))
    assert sorted(i.key for i in listed) == sorted(names)
    assert all(i.uri == join(prefix, i.key) for i in listed)
    assert len(list(storage.list(prefix))) == 1235


def test_local_listing_is_sorted_recursive_and_skips_temp_files(tmp_path: Path) -> None:
    store = Storage()
    for name in ["b/2.png", "a/1.JPG", "c.txt", f"a/{TMP_MARK}123"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [i.key for i in store.list(str(tmp_path), (".jpg", ".png"))] == ["a/1.JPG", "b/2.png"]
    with pytest.raises(NotFoundError):
        list(store.list(str(tmp_path / "absent")))


def test_put_if_absent_two_racing_writers_one_wins(storage: Storage, root: str) -> None:
    uri = join(root, "marker")
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def write(i: int) -> None:
        barrier.wait()
        try:
            storage.put_if_absent(uri, f"writer {i}".encode())
            outcomes.append(f"won {i}")
        except AlreadyExistsError:
            outcomes.append("lost")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and outcomes.count("lost") == 7
    assert storage.get(uri) == f"writer {winners[0].split()[1]}".encode()


def test_local_put_is_atomic_for_readers(tmp_path: Path) -> None:
    store = Storage()
    path = tmp_path / "big.bin"
    old, new = b"a" * 4_000_000, b"b" * 4_000_000
    store.put(str(path), old)
    seen: set[bytes] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            data = path.read_bytes()
            seen.add(data[:1] + data[-1:] + bytes([len(data) == len(old)]))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(20):
        store.put(str(path), new if i % 2 == 0 else old)
    stop.set()
    reader.join()
    assert seen <= {b"aa\x01", b"bb\x01"}  # never a mix, never short
    assert not [p for p in os.listdir(tmp_path) if TMP_MARK in p]


def test_file_uri(tmp_path: Path) -> None:
    store = Storage()
    store.put(f"file://{tmp_path}/x%20y.bin", b"1")
    assert (tmp_path / "x y.bin").read_bytes() == b"1"


def test_bad_credentials_are_access_denied_and_never_printed(
        moto_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from botocore.exceptions import NoCredentialsError

    store = Storage(StorageConfig(endpoint_url=moto_server, max_attempts=1))

    def no_credentials(**_: object) -> None:
        raise NoCredentialsError()

    monkeypatch.setattr(store.client, "get_object", no_credentials)
    with caplog.at_level(logging.DEBUG), pytest.raises(AccessDeniedError) as info:
        store.get(s3_bucket + "/k")
    assert "AWS_ACCESS_KEY_ID" in str(info.value) and s3_bucket in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in caplog.text


def test_unreachable_endpoint_is_a_storage_error_naming_the_uri() -> None:
    store = Storage(StorageConfig(endpoint_url="http://127.0.0.1:9", max_attempts=1))
    with pytest.raises(StorageError, match="s3://b/k") as info:
        store.get("s3://b/k")
    assert SECRET not in str(info.value)


def test_uri_parsing() -> None:
    assert parse_s3("s3://bucket/a/b.jpg") == ("bucket", "a/b.jpg")
    with pytest.raises(StorageError, match="names no bucket"):
        parse_s3("s3:///key")
    assert join("s3://b/p/", "/x") == "s3://b/p/x"


def test_one_client_per_process_and_config(moto_server: str) -> None:
    cfg = StorageConfig(endpoint_url=moto_server, max_pool_connections=4)
    assert get_storage(cfg) is get_storage(cfg)
    assert get_storage(cfg).client is get_storage(cfg).client
    assert get_storage(cfg) is not get_storage(StorageConfig(endpoint_url=moto_server))


def _same_sequence(storage: Storage, root: str) -> list[object]:
    """Every operation, in an order that reaches each outcome; returns what a caller
    sees, without what legitimately differs between stores (the URI root, tags, times)."""
    seen: list[object] = []

    def outcome(call: Callable[..., object], *args: object) -> None:
        try:
            result = call(*args)
        except Exception as exc:  # noqa: BLE001 - the error's type is part of the outcome
            seen.append(type(exc).__name__)
            return
        if isinstance(result, ObjectInfo):
            result = (result.size, result.uri == args[0], result.etag is not None)
        elif call in (storage.put, storage.put_if_absent):
            result = isinstance(result, str) and result != ""  # a version tag, each its own
        seen.append(result)

    outcome(storage.put, join(root, "in/b/2.PNG"), b"two")
    outcome(storage.put, join(root, "in/a.jpg"), b"one", "image/jpeg")
    outcome(storage.put, join(root, "in/notes.txt"), b"n")
    outcome(storage.put_if_absent, join(root, "marker"), b"first")
    outcome(storage.put_if_absent, join(root, "marker"), b"second")
    outcome(storage.get, join(root, "marker"))
    outcome(storage.get_range, join(root, "in/a.jpg"), 2, 1)
    outcome(storage.get_range, join(root, "in/a.jpg"), 10, 3)
    outcome(storage.head, join(root, "in/b/2.PNG"))
    seen.append([(i.key, i.size) for i in storage.list(join(root, "in"), (".png", ".JPG"))])
    seen.append(sorted(i.key for i in storage.list(join(root, "in"))))
    outcome(storage.exists, join(root, "in/a.jpg"))
    outcome(storage.delete, join(root, "in/a.jpg"))
    outcome(storage.delete, join(root, "in/a.jpg"))
    outcome(storage.exists, join(root, "in/a.jpg"))
    outcome(storage.get, join(root, "in/a.jpg"))
    outcome(storage.head, join(root, "in"))
    return seen


def test_each_scheme_reaches_its_own_store_and_behaves_the_same(
        storage: Storage, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    monkeypatch.chdir(tmp_path)  # a URI handed to the wrong backend would land in here
    on_s3, on_disk, as_file = s3_bucket + "/same", str(tmp_path / "disk"), f"file://{tmp_path}/f"
    results: list[list[object]] = []
    ops: list[collections.Counter[str]] = []
    for root in (on_s3, on_disk, as_file):
        before = collections.Counter(storage.ops)
        results.append(_same_sequence(storage, root))
        ops.append(storage.ops - before)
    assert results[0] == results[1] == results[2]
    assert results[0][4] == "AlreadyExistsError" and results[0][-1] == "NotFoundError"
    assert ops[0] == ops[1] == ops[2] == {"PUT": 5, "GET": 4, "HEAD": 4, "LIST": 2, "DELETE": 2}

    # Each write went where its scheme says, and the version tag is that store's own.
    bucket, key = parse_s3(join(on_s3, "marker"))
    assert storage.client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"first"
    assert storage.put(join(on_s3, "tag"), b"t") == hashlib.md5(b"t").hexdigest()
    assert (tmp_path / "disk" / "marker").read_bytes() == b"first"
    assert (tmp_path / "f" / "marker").read_bytes() == b"first"
    st = os.stat(tmp_path / "disk" / "marker")
    assert storage.head(join(on_disk, "marker")).etag == f"{st.st_mtime_ns:x}-{st.st_size:x}"
    assert sorted(os.listdir(tmp_path)) == ["disk", "f"]  # nothing under a literal "s3:" folder
