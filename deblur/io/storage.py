"""One small interface over ``s3://bucket/key`` (boto3) and local paths / ``file://``.

Retries are botocore's (standard or adaptive mode, ``max_attempts`` from the config); what is
left after them surfaces as a typed ``StorageError`` that names the URI. The client is created
once per process (and per fork) and shared by threads: boto3 clients are thread-safe, sessions
are not, so the client is built under a lock. Credentials come from the standard AWS chain and
never appear in a message or a log line: errors quote the URI and the store's error code only.

Local writes go to a temporary file in the same folder and are renamed into place, so a reader
never sees a partial file; put-if-absent links that temporary file (``os.link`` fails when the
name exists), which is both atomic and exclusive.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from deblur.config import StorageConfig
from deblur.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    NotFoundError,
    StorageError,
    ThrottledError,
)

log = logging.getLogger("deblur.io.storage")

TMP_MARK = ".deblur-tmp-"
"""Temporary local files carry this in their name; listings skip them."""

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "ExpiredToken", "InvalidToken", "AllAccessDisabled"}
_THROTTLED = {"SlowDown", "503", "Throttling", "ThrottlingException", "RequestLimitExceeded",
              "ServiceUnavailable", "TooManyRequests", "RequestThrottled"}
_EXISTS = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its full URI, the key relative to the listed prefix, size, mtime."""

    uri: str
    key: str
    size: int
    mtime: float
    etag: str | None = None


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def parse_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b"); refuses a URI without a bucket."""
    if not is_s3(uri):
        raise StorageError(f"{uri!r} is not an s3:// URI", uri)
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket: write s3://BUCKET/PREFIX", uri)
    return bucket, key


def to_local_path(uri: str) -> str:
    """``file:///a/b`` or ``/a/b`` -> ``/a/b`` (percent-escapes decoded for file://)."""
    if uri.startswith("file://"):
        return unquote(uri[7:])
    return uri


def join(prefix: str, relative: str) -> str:
    """Join a relative key under a prefix with exactly one slash between them."""
    if not prefix:
        return relative
    return prefix.rstrip("/") + "/" + relative.lstrip("/")


def as_folder(prefix: str) -> str:
    """A prefix meant as a folder, with one trailing slash (``s3://b`` stays ``s3://b/``)."""
    return prefix if prefix.endswith("/") else prefix + "/"


class Storage:
    """get / put / put_if_absent / list / head / exists / delete over S3 and local files.

    Args:
        config: client settings; default ``StorageConfig()`` (endpoint from AWS_ENDPOINT_URL).
    """

    def __init__(self, config: StorageConfig | None = None) -> None:
        self.config = config or StorageConfig()
        self._client: Any = None
        self._lock = threading.Lock()
        self.retries = 0
        """Requests botocore had to retry (throttles, resets); exported as a metric."""
        self.requests = 0
        self.ops: collections.Counter[str] = collections.Counter()
        """Requests by S3 class (GET, PUT, LIST, HEAD, DELETE), counted the same way for local
        folders (a LIST per 1000 names), so benchmarks can price a job on either."""

    def _count(self, op: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self.ops[op] += n

    # -- the S3 client ---------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        cfg = self.config
        session = boto3.session.Session()
        endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL")
        client = session.client(
            "s3", endpoint_url=endpoint, region_name=cfg.region,
            config=Config(retries={"mode": cfg.retry_mode, "max_attempts": cfg.max_attempts},
                          max_pool_connections=cfg.max_pool_connections,
                          connect_timeout=10, read_timeout=60,
                          s3={"addressing_style": "path" if endpoint else "auto"}))
        client.meta.events.register("needs-retry.s3", self._on_needs_retry)
        return client

    def _on_needs_retry(self, attempts: int = 0, response: Any = None,
                        caught_exception: Any = None, operation: Any = None, **_: Any) -> None:
        # Called after every attempt; only log the ones botocore is about to retry. We
        # cannot know that here for sure, so count failed attempts below the limit.
        failed = caught_exception is not None or (
            response is not None and response[0].status_code >= 500) or (
            response is not None and response[0].status_code == 429)
        if failed and attempts < self.config.max_attempts:
            with self._lock:
                self.retries += 1
            what = (type(caught_exception).__name__ if caught_exception is not None
                    else f"HTTP {response[0].status_code}")
            name = getattr(operation, "name", "request")
            log.warning("S3 %s attempt %d failed (%s); retrying", name, attempts, what)

    def _call(self, uri: str, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        self.requests += 1
        try:
            return getattr(self.client, method)(**kwargs)
        except ClientError as exc:
            raise _client_error(uri, method, exc) from None
        except (NoCredentialsError, PartialCredentialsError):
            raise AccessDeniedError(
                f"no usable AWS credentials for {uri}: set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance/pod role", uri) from None
        except BotoCoreError as exc:  # connection refused/reset after retries, timeouts
            raise StorageError(f"{method} {uri} failed: {type(exc).__name__}: "
                               f"{_redact(str(exc))}", uri) from None

    # -- operations ------------------------------------------------------------------------

    def get(self, uri: str) -> bytes:
        """The object's bytes. Raises NotFoundError, AccessDeniedError, ThrottledError, …"""
        self._count("GET")
        if is_s3(uri):
            bucket, key = parse_s3(uri)
            response = self._call(uri, "get_object", Bucket=bucket, Key=key)
            try:
                return response["Body"].read()
            except Exception as exc:  # noqa: BLE001 - a reset mid-body
                raise StorageError(f"reading {uri} failed mid-transfer: "
                                   f"{type(exc).__name__}", uri) from None
        path = to_local_path(uri)
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise NotFoundError(f"{uri} does not exist", uri) from None
        except IsADirectoryError:
            raise NotFoundError(f"{uri} is a folder, not a file", uri) from None
        except PermissionError:
            raise AccessDeniedError(f"no permission to read {uri}", uri) from None
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror}", uri) from None

    def get_range(self, uri: str, length: int, start: int = 0) -> bytes:
        """Up to ``length`` bytes from offset ``start`` (fewer at the end, none past it).

        One ranged GET: ``deblur plan`` reads image headers with it, never whole images.
        """
        self._count("GET")
        if is_s3(uri):
            bucket, key = parse_s3(uri)
            try:
                response = self._call(uri, "get_object", Bucket=bucket, Key=key,
                                      Range=f"bytes={start}-{start + max(length, 1) - 1}")
            except StorageError as exc:
                if "InvalidRange" in str(exc) or "416" in str(exc):
                    return b""  # S3 answers 416 to a range at or past the end (or a 0-byte object)
                raise
            try:
                return response["Body"].read()
            except Exception as exc:  # noqa: BLE001 - a reset mid-body
                raise StorageError(f"reading {uri} failed mid-transfer: "
                                   f"{type(exc).__name__}", uri) from None
        path = to_local_path(uri)
        try:
            with open(path, "rb") as handle:
                handle.seek(start)
                return handle.read(length)
        except FileNotFoundError:
            raise NotFoundError(f"{uri} does not exist", uri) from None
        except IsADirectoryError:
            raise NotFoundError(f"{uri} is a folder, not a file", uri) from None
        except PermissionError:
            raise AccessDeniedError(f"no permission to read {uri}", uri) from None
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror}", uri) from None

    def put(self, uri: str, data: bytes, content_type: str | None = None) -> str | None:
        """Write the whole object; readers see the old one or the new one, never a part.

        Returns the written version's tag, the same string ``list`` and ``head`` report as
        ``etag`` (S3: the ETag; local: mtime and size), so a reader can tell whether an object
        changed since someone summarised it.
        """
        self._count("PUT")
        if is_s3(uri):
            bucket, key = parse_s3(uri)
            extra = {"ContentType": content_type} if content_type else {}
            reply = self._call(uri, "put_object", Bucket=bucket, Key=key, Body=data, **extra)
            return (reply.get("ETag") or "").strip('"') or None
        path = to_local_path(uri)
        tmp = self._write_temp(uri, path, data)
        try:
            os.replace(tmp, path)
            return _local_tag(os.stat(path))
        except OSError as exc:
            _unlink(tmp)
            raise StorageError(f"cannot write {uri}: {exc.strerror}", uri) from None

    def put_if_absent(self, uri: str, data: bytes) -> None:
        """Create the object only if nothing is there; raise AlreadyExistsError otherwise.

        Of two racing writers exactly one succeeds (S3 conditional write ``If-None-Match: *``;
        locally a hard link, which fails when the name exists).
        """
        self._count("PUT")
        if is_s3(uri):
            bucket, key = parse_s3(uri)
            try:
                self._call(uri, "put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except AlreadyExistsError:
                raise AlreadyExistsError(f"{uri} already exists", uri) from None
            return
        path = to_local_path(uri)
        tmp = self._write_temp(uri, path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise AlreadyExistsError(f"{uri} already exists", uri) from None
        except OSError as exc:
            raise StorageError(f"cannot create {uri}: {exc.strerror}", uri) from None
        finally:
            _unlink(tmp)

    def _write_temp(self, uri: str, path: str, data: bytes) -> str:
        folder = os.path.dirname(path) or "."
        tmp = os.path.join(folder, f"{TMP_MARK}{uuid.uuid4().hex}")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write(data)
        except PermissionError:
            _unlink(tmp)
            raise AccessDeniedError(f"no permission to write {uri}", uri) from None
        except OSError as exc:
            _unlink(tmp)
            raise StorageError(f"cannot write {uri}: {exc.strerror}", uri) from None
        return tmp

    def list(self, prefix: str, suffixes: tuple[str, ...] | None = None
             ) -> Iterator[ObjectInfo]:
        """Stream every object under ``prefix`` (a folder: a trailing slash is implied).

        S3 pages of 1000 keys are fetched as the caller iterates, so a listing of millions
        never sits in memory. Local folders are walked in sorted order. ``suffixes`` keeps
        only names ending in one of them (case-insensitive).
        """
        wanted = tuple(s.lower() for s in suffixes) if suffixes else None
        self._count("LIST")  # the first page; each further 1000 names below
        if is_s3(prefix):
            folder = as_folder(prefix) if parse_s3(prefix)[1] else prefix.rstrip("/") + "/"
            bucket, key_prefix = parse_s3(folder)
            paginator = self.client.get_paginator("list_objects_v2")
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                for page_no, page in enumerate(paginator.paginate(Bucket=bucket,
                                                                   Prefix=key_prefix)):
                    self._count("LIST", page_no > 0)
                    for obj in page.get("Contents", ()):
                        key = obj["Key"]
                        if wanted and not key.lower().endswith(wanted):
                            continue
                        yield ObjectInfo(uri=f"s3://{bucket}/{key}", key=key[len(key_prefix):],
                                         size=obj["Size"],
                                         mtime=obj["LastModified"].timestamp(),
                                         etag=obj.get("ETag", "").strip('"') or None)
            except ClientError as exc:
                raise _client_error(prefix, "list_objects_v2", exc) from None
            except BotoCoreError as exc:
                raise StorageError(f"listing {prefix} failed: {type(exc).__name__}",
                                   prefix) from None
            return
        root = to_local_path(prefix)
        if not os.path.isdir(root):
            raise NotFoundError(f"{prefix} is not a folder", prefix)
        for count, info in enumerate(_walk(root, root, wanted), 1):
            self._count("LIST", count % 1000 == 1 and count > 1)
            yield info

    def head(self, uri: str) -> ObjectInfo:
        """Size and modification time of one object; NotFoundError if absent."""
        self._count("HEAD")
        if is_s3(uri):
            bucket, key = parse_s3(uri)
            meta = self._call(uri, "head_object", Bucket=bucket, Key=key)
            return ObjectInfo(uri=uri, key=key, size=meta["ContentLength"],
                              mtime=meta["LastModified"].timestamp(),
                              etag=meta.get("ETag", "").strip('"') or None)
        path = to_local_path(uri)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise NotFoundError(f"{uri} does not exist", uri) from None
        except OSError as exc:
            raise StorageError(f"cannot stat {uri}: {exc.strerror}", uri) from None
        if not os.path.isfile(path):
            raise NotFoundError(f"{uri} is not a file", uri)
        return ObjectInfo(uri=uri, key=os.path.basename(path), size=st.st_size,
                          mtime=st.st_mtime, etag=_local_tag(st))

    def exists(self, uri: str) -> bool:
        try:
            self.head(uri)
        except NotFoundError:
            return False
        return True

    def delete(self, uri: str) -> None:
        """Remove the object; absent objects are fine (delete is idempotent)."""
        self._count("DELETE")
        if is_s3(uri):
            bucket, key = parse_s3(uri)
            self._call(uri, "delete_object", Bucket=bucket, Key=key)
            return
        try:
            os.unlink(to_local_path(uri))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot delete {uri}: {exc.strerror}", uri) from None


def _walk(root: str, folder: str, wanted: tuple[str, ...] | None) -> Iterator[ObjectInfo]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise StorageError(f"cannot list {folder}: {exc.strerror}", folder) from None
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(root, entry.path, wanted)
        elif entry.is_file() and TMP_MARK not in entry.name:
            if wanted and not entry.name.lower().endswith(wanted):
                continue
            st = entry.stat()
            yield ObjectInfo(uri=entry.path, key=os.path.relpath(entry.path, root),
                             size=st.st_size, mtime=st.st_mtime, etag=_local_tag(st))


def _local_tag(st: os.stat_result) -> str:
    """A local file's version: a rewrite changes its nanosecond mtime (or its size)."""
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _redact(text: str) -> str:
    """Drop anything that looks like a signed URL's query (it carries a credential scope)."""
    return text.split("?", 1)[0]


def _client_error(uri: str, method: str, exc: Any) -> StorageError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get(
        "HTTPStatusCode", "unknown"))
    status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    if code in _NOT_FOUND or (status == "404" and code not in _EXISTS):
        return NotFoundError(f"{uri} does not exist ({code})", uri)
    if code in _DENIED or status == "403":
        return AccessDeniedError(
            f"access denied to {uri} ({code}): check the credentials' permissions for "
            f"{method} on this bucket", uri)
    if code in _THROTTLED or status in ("503", "429"):
        return ThrottledError(
            f"{uri}: the store kept throttling ({code}) after every retry; lower the "
            f"worker count or raise storage.max_attempts", uri)
    if code in _EXISTS or status == "412":
        return AlreadyExistsError(f"{uri} already exists", uri)
    return StorageError(f"{method} {uri} failed ({code}): {_redact(str(error.get('Message', '')))}",
                        uri)


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


def local_path(uri: str) -> Path:
    """A local URI as a Path (for callers that need the filesystem itself)."""
    return Path(to_local_path(uri))
