"""One small interface over ``s3://bucket/key`` and local paths / ``file://`` URIs.

``Storage`` is what callers use: get / get_tagged / get_range / put / put_if_absent /
put_if_match / list / head / exists / delete on full URIs. It counts every request by S3 class (``ops``) and hands the call to the
backend the URI's scheme picks: ``deblur.io.s3`` (boto3, botocore retries, typed errors, no
credential in any message) or ``deblur.io.local`` (atomic writes by rename, exclusive
put-if-absent by hard link). Both implement ``Backend`` (``io/backend.py``) and raise the
typed errors of ``deblur.errors``, each naming the URI.

The URI helpers of ``io/backend.py`` are re-exported here, so callers and both backends spell
URIs one way.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from deblur.config import StorageConfig
from deblur.errors import NotFoundError
# The URI helpers and listing type are part of this module's interface (callers import them
# from here); they live in io/backend.py so that both backends can use them too.
from deblur.io.backend import (Backend, Count, ObjectInfo, as_folder, has_suffix, is_s3, join,
                               parse_s3, to_local_path)
from deblur.io.local import LocalBackend

if TYPE_CHECKING:
    from deblur.io.s3 import S3Backend

__all__ = ["Backend", "Count", "ObjectInfo", "Storage", "as_folder", "get_storage", "has_suffix",
           "is_s3", "join", "parse_s3", "retries_counted_by", "to_local_path"]


# Who else hears of a retried request made in this context: botocore retries in the caller's
# own thread, so a worker running several shards at once attributes each retry to the shard
# whose request it was (``retries_counted_by``), not to every shard in flight at the time.
_RETRY_SINK: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "deblur_storage_retry_sink", default=None)


@contextlib.contextmanager
def retries_counted_by(sink: Callable[[], None]) -> Iterator[None]:
    """Call ``sink()`` once for every request retried inside this block (this thread), as
    well as counting it in ``Storage.retries``."""
    token = _RETRY_SINK.set(sink)
    try:
        yield
    finally:
        _RETRY_SINK.reset(token)


class Storage:
    """get / put / put_if_absent / list / head / exists / delete over S3 and local files.

    Args:
        config: client settings; default ``StorageConfig()`` (endpoint from AWS_ENDPOINT_URL).
    """

    def __init__(self, config: StorageConfig | None = None) -> None:
        self.config = config or StorageConfig()
        self._lock = threading.Lock()
        self.retries = 0
        """Requests botocore had to retry (throttles, resets); exported as a metric."""
        self.ops: collections.Counter[str] = collections.Counter()
        """Requests by S3 class (GET, PUT, LIST, HEAD, DELETE), counted the same way for local
        folders (a LIST per 1000 names), so benchmarks can price a job on either."""
        self._local: Backend = LocalBackend(self._count)
        self._s3: S3Backend | None = None  # built on first S3 use: local jobs never load boto3

    def _count(self, op: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self.ops[op] += n

    def _retried(self) -> None:
        with self._lock:
            self.retries += 1
        sink = _RETRY_SINK.get()
        if sink is not None:
            sink()

    def _s3_backend(self) -> S3Backend:
        if self._s3 is None:
            with self._lock:
                if self._s3 is None:
                    from deblur.io.s3 import S3Backend

                    self._s3 = S3Backend(self.config, self._count, self._retried)
        return self._s3

    def _backend(self, uri: str) -> Backend:
        return self._s3_backend() if is_s3(uri) else self._local

    @property
    def client(self) -> Any:
        """The boto3 S3 client this Storage uses (built on first use), for work the interface
        does not cover, such as creating a bucket."""
        return self._s3_backend().client

    # -- operations: count the request, then hand it to the URI's backend --------------------

    def get(self, uri: str) -> bytes:
        """The object's bytes. Raises NotFoundError, AccessDeniedError, ThrottledError, …"""
        self._count("GET")
        return self._backend(uri).get(uri)

    def get_range(self, uri: str, length: int, start: int = 0) -> bytes:
        """Up to ``length`` bytes from offset ``start`` (fewer at the end, none past it).

        One ranged GET: ``deblur plan`` reads image headers with it, never whole images.
        """
        self._count("GET")
        return self._backend(uri).get_range(uri, length, start)

    def put(self, uri: str, data: bytes, content_type: str | None = None) -> str | None:
        """Write the whole object; readers see the old one or the new one, never a part.

        Returns the written version's tag, the same string ``list`` and ``head`` report as
        ``etag`` (S3: the ETag; local: mtime and size), so a reader can tell whether an object
        changed since someone summarised it.
        """
        self._count("PUT")
        return self._backend(uri).put(uri, data, content_type)

    def put_if_absent(self, uri: str, data: bytes) -> str | None:
        """Create the object only if nothing is there; raise AlreadyExistsError otherwise.

        Of two racing writers exactly one succeeds (S3 conditional write ``If-None-Match: *``;
        locally a hard link, which fails when the name exists). Returns the version tag.
        """
        self._count("PUT")
        return self._backend(uri).put_if_absent(uri, data)

    def put_if_match(self, uri: str, data: bytes, tag: str) -> str | None:
        """Replace the object only if it is still the version ``tag`` (from ``get_tagged``,
        ``head``, ``list`` or a put); raise ConflictError if it changed or vanished since.

        Compare-and-swap: of two writers that read the same version, exactly one wins, so a
        writer holding a stale copy can never overwrite a newer one (S3 ``If-Match``; locally
        the compare and the rename happen under an exclusive lock on the folder). Returns the
        new version's tag.
        """
        self._count("PUT")
        return self._backend(uri).put_if_match(uri, data, tag)

    def get_tagged(self, uri: str) -> tuple[bytes, str | None]:
        """The object's bytes and the tag of exactly that version (for ``put_if_match``)."""
        self._count("GET")
        return self._backend(uri).get_tagged(uri)

    def list(self, prefix: str, suffixes: tuple[str, ...] | None = None
             ) -> Iterator[ObjectInfo]:
        """Stream every object under ``prefix`` (a folder: a trailing slash is implied).

        S3 pages of 1000 keys are fetched as the caller iterates, so a listing of millions
        never sits in memory. Local folders are walked in sorted order. ``suffixes`` keeps
        only names ending in one of them (case-insensitive).
        """
        wanted = tuple(s.lower() for s in suffixes) if suffixes else None
        self._count("LIST")  # the first page; the backend counts each further one
        yield from self._backend(prefix).list(prefix, wanted)

    def head(self, uri: str) -> ObjectInfo:
        """Size and modification time of one object; NotFoundError if absent."""
        self._count("HEAD")
        return self._backend(uri).head(uri)

    def exists(self, uri: str) -> bool:
        try:
            self.head(uri)
        except NotFoundError:
            return False
        return True

    def delete(self, uri: str) -> None:
        """Remove the object; absent objects are fine (delete is idempotent)."""
        self._count("DELETE")
        self._backend(uri).delete(uri)


_CACHE: dict[tuple[int, StorageConfig, str | None], Storage] = {}
_CACHE_LOCK = threading.Lock()


def get_storage(config: StorageConfig | None = None) -> Storage:
    """The process's shared Storage for ``config`` (one boto3 client per process and config)."""
    config = config or StorageConfig()
    key = (os.getpid(), config, os.environ.get("AWS_ENDPOINT_URL"))
    with _CACHE_LOCK:
        storage = _CACHE.get(key)
        if storage is None:
            storage = _CACHE[key] = Storage(config)
        return storage
