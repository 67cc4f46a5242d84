"""Listing a big S3 prefix in parallel, in the same order as one sequential listing.

One ``list_objects_v2`` pager is ~120 ms a page of 1000 keys: a 100 M-key prefix is 100,000
pages, hours in sequence. ``list_fanned`` splits the prefix where its folders split it:

1. one plain page of the prefix; if that is all of it (≤ 1000 keys), done: a small listing
   costs the one LIST it always did;
2. otherwise the folders are discovered with ``Delimiter="/"``, breadth first, one page per
   folder, until there are ``4 x concurrency`` of them or three levels (a folder whose first
   delimited page is full is listed whole instead: no unbounded discovery);
3. the folders are then listed whole, ``concurrency`` at a time, each into a small bounded
   queue, and yielded in key order: the keys of a folder are one contiguous run of the
   sequential listing, so ordering folders and the loose objects beside them by their names
   (UTF-8 bytes, S3's order) reproduces it exactly.

Memory: the discovered names (≤ 1000 per folder expanded) and ``QUEUE_PAGES`` pages per folder
in flight. Local folders are walked as before (``Storage.list``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from deblur.io.storage import ObjectInfo, Storage, as_folder, has_suffix, is_s3, parse_s3

QUEUE_PAGES = 4  # pages a folder listed ahead of its turn may hold
PAGE_KEYS = 1000  # S3's most keys per LIST page
MAX_DEPTH = 3
_DONE = object()


def list_fanned(storage: Storage, prefix: str, suffixes: tuple[str, ...] | None,
                concurrency: int, stats: dict[str, int] | None = None
                ) -> Iterator[ObjectInfo]:
    """Every object under ``prefix``, as ``storage.list`` yields them (same order, same
    fields), with up to ``concurrency`` folder listings at once. ``stats`` (optional) gets
    ``folders``: how many were listed side by side (0: one page was the whole listing)."""
    if not is_s3(prefix) or concurrency <= 1:
        yield from storage.list(prefix, suffixes)
        return
    from deblur.io.s3 import _translated  # the S3 backend's error translation

    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    client = storage.client
    bucket, root = parse_s3(as_folder(prefix))
    stats = stats if stats is not None else {}
    stats.update(folders=0)

    def call(**kwargs: Any) -> dict[str, Any]:
        storage._count("LIST", 1)  # counted like every other LIST of this Storage
        with _translated(f"s3://{bucket}/{kwargs['Prefix']}", "list_objects_v2"):
            return client.list_objects_v2(Bucket=bucket, MaxKeys=PAGE_KEYS, **kwargs)

    def infos(page: dict[str, Any]) -> Iterator[ObjectInfo]:
        for obj in page.get("Contents", ()):
            key = obj["Key"]
            if has_suffix(key, wanted):
                yield ObjectInfo(uri=f"s3://{bucket}/{key}", key=key[len(root):],
                                 size=obj["Size"], mtime=obj["LastModified"].timestamp(),
                                 etag=(obj.get("ETag") or "").strip('"') or None)

    first = call(Prefix=root)
    if not first.get("IsTruncated"):
        yield from infos(first)
        return
    items = _discover(call, root, concurrency)  # (sort key, object page or folder)
    folders = [value for _, value in items if isinstance(value, str)]
    stats["folders"] = len(folders)

    stop = threading.Event()
    queues: dict[str, queue.Queue[Any]] = {}

    def list_folder(folder: str, out: queue.Queue[Any]) -> None:
        token: str | None = None
        try:
            while not stop.is_set():
                page = call(Prefix=folder, **({"ContinuationToken": token} if token else {}))
                _put(out, list(infos(page)), stop)
                token = page.get("NextContinuationToken")
                if not page.get("IsTruncated") or not token:
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            _put(out, exc, stop)
        _put(out, _DONE, stop)

    with ThreadPoolExecutor(concurrency, thread_name_prefix="list") as pool:
        started = 0

        def start_next() -> None:
            nonlocal started
            if started < len(folders):
                folder = folders[started]
                queues[folder] = queue.Queue(QUEUE_PAGES)
                pool.submit(list_folder, folder, queues[folder])
                started += 1

        for _ in range(concurrency):
            start_next()
        try:
            for _, value in items:
                if not isinstance(value, str):
                    if has_suffix(value["Key"], wanted):
                        yield from infos({"Contents": [value]})
                    continue
                out = queues.pop(value)
                while (got := out.get()) is not _DONE:
                    if isinstance(got, BaseException):
                        raise got
                    yield from got
                start_next()
        finally:
            stop.set()  # a consumer that stops early frees the folder threads


def _put(out: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.2)
            return
        except queue.Full:
            continue


def _discover(call: Any, root: str, concurrency: int) -> list[tuple[bytes, Any]]:
    """Loose objects and folders under ``root``, sorted as S3 sorts their keys."""
    items: list[tuple[bytes, Any]] = []
    frontier = [root]
    for depth in range(MAX_DEPTH):
        below: list[str] = []
        for folder in frontier:
            page = call(Prefix=folder, Delimiter="/")
            if page.get("IsTruncated"):  # a big flat folder: list it whole, in sequence
                items.append((folder.encode("utf-8", "surrogatepass"), folder))
                continue
            for obj in page.get("Contents", ()):
                items.append((obj["Key"].encode("utf-8", "surrogatepass"), obj))
            below += [p["Prefix"] for p in page.get("CommonPrefixes", ())]
        if depth == MAX_DEPTH - 1 or len(below) >= 4 * concurrency or not below:
            items += [(p.encode("utf-8", "surrogatepass"), p) for p in below]
            break
        frontier = below
    items.sort(key=lambda item: item[0])
    return items
