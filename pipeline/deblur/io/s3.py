"""The S3 backend behind ``deblur.io.storage.Storage``, for ``s3://bucket/key`` URIs (boto3).

Retries are botocore's (standard or adaptive mode, ``max_attempts`` from the config); each
retried attempt is logged and reported to the facade's ``retries``. What is left after them
surfaces as a typed ``StorageError`` that names the URI. The client is built on first use,
once per backend (``get_storage`` keeps one Storage per process, so one client per process and
per fork), and shared by threads: boto3 clients are thread-safe, sessions are not, so the
client is built under a lock. Credentials come from the standard AWS chain and never appear in
a message or a log line: errors quote the URI and the store's error code only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from deblur.config import StorageConfig
from deblur.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    ConflictError,
    NotFoundError,
    StorageError,
    StoreUnavailableError,
    ThrottledError,
)
from deblur.io.backend import Count, ObjectInfo, as_folder, has_suffix, parse_s3

# The facade's logger, not this module's: retry warnings have always been
# "deblur.io.storage" records, and log filters and tests select them by that name.
log = logging.getLogger("deblur.io.storage")

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "ExpiredToken", "InvalidToken", "AllAccessDisabled"}
_THROTTLED = {"SlowDown", "503", "Throttling", "ThrottlingException", "RequestLimitExceeded",
              "ServiceUnavailable", "TooManyRequests", "RequestThrottled"}
_EXISTS = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class _RangeNotSatisfiable(StorageError):
    """S3's 416 (InvalidRange): a range at or past the end, or any range of a 0-byte object.

    Its own class so ``get_range`` can tell it apart by the store's code, not by searching the
    message (which quotes the URI, where "416" is a common part of a file name)."""


class S3Backend:
    """The ``Backend`` for ``s3://`` URIs.

    Args:
        config: client settings (endpoint, region, retry mode and attempts, pool size).
        count: reports each listing page after the first as one more LIST.
        on_retry: called once for every attempt botocore retries.
    """

    def __init__(self, config: StorageConfig, count: Count, on_retry: Callable[[], None]
                 ) -> None:
        self.config = config
        self._count = count
        self._on_retry = on_retry
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
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
            self._on_retry()
            what = (type(caught_exception).__name__ if caught_exception is not None
                    else f"HTTP {response[0].status_code}")
            name = getattr(operation, "name", "request")
            log.warning("S3 %s attempt %d failed (%s); retrying", name, attempts, what)

    def _call(self, uri: str, method: str, **kwargs: Any) -> Any:
        with _translated(uri, method):
            return getattr(self.client, method)(**kwargs)

    # -- Backend ---------------------------------------------------------------------------

    def get(self, uri: str) -> bytes:
        bucket, key = parse_s3(uri)
        return _read_body(uri, self._call(uri, "get_object", Bucket=bucket, Key=key))

    def get_range(self, uri: str, length: int, start: int) -> bytes:
        bucket, key = parse_s3(uri)
        try:
            response = self._call(uri, "get_object", Bucket=bucket, Key=key,
                                  Range=f"bytes={start}-{start + max(length, 1) - 1}")
        except _RangeNotSatisfiable:
            return b""  # what a local read past the end returns
        return _read_body(uri, response)

    def put(self, uri: str, data: bytes, content_type: str | None) -> str | None:
        bucket, key = parse_s3(uri)
        extra = {"ContentType": content_type} if content_type else {}
        reply = self._call(uri, "put_object", Bucket=bucket, Key=key, Body=data, **extra)
        return _etag(reply)

    def put_if_absent(self, uri: str, data: bytes) -> str | None:
        # S3 refuses the conditional write with 412 (or 409 when two race); _client_error
        # turns both into AlreadyExistsError.
        bucket, key = parse_s3(uri)
        return _etag(self._call(uri, "put_object", Bucket=bucket, Key=key, Body=data,
                                IfNoneMatch="*"))

    def put_if_match(self, uri: str, data: bytes, tag: str) -> str | None:
        # S3 answers 412 when the ETag differs (409 when two conditional writes race) and
        # 404 when the object is gone: all three mean "re-read and merge again".
        bucket, key = parse_s3(uri)
        try:
            reply = self._call(uri, "put_object", Bucket=bucket, Key=key, Body=data,
                               IfMatch=f'"{tag}"')
        except (AlreadyExistsError, NotFoundError):
            raise ConflictError(f"{uri} changed since it was read (version {tag})",
                                uri) from None
        return _etag(reply)

    def get_tagged(self, uri: str) -> tuple[bytes, str | None]:
        bucket, key = parse_s3(uri)
        response = self._call(uri, "get_object", Bucket=bucket, Key=key)
        return _read_body(uri, response), _etag(response)

    def list(self, prefix: str, suffixes: tuple[str, ...] | None) -> Iterator[ObjectInfo]:
        # A folder, so that s3://b/in does not also list s3://b/in-other/.
        bucket, key_prefix = parse_s3(as_folder(prefix))
        with _translated(prefix, "list_objects_v2"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=key_prefix)
            for page_no, page in enumerate(pages):
                if page_no:
                    self._count("LIST", 1)  # the facade counted the first page
                for obj in page.get("Contents", ()):
                    key = obj["Key"]
                    if has_suffix(key, suffixes):
                        yield ObjectInfo(uri=f"s3://{bucket}/{key}", key=key[len(key_prefix):],
                                         size=obj["Size"],
                                         mtime=obj["LastModified"].timestamp(),
                                         etag=_etag(obj))

    def head(self, uri: str) -> ObjectInfo:
        bucket, key = parse_s3(uri)
        meta = self._call(uri, "head_object", Bucket=bucket, Key=key)
        return ObjectInfo(uri=uri, key=key, size=meta["ContentLength"],
                          mtime=meta["LastModified"].timestamp(), etag=_etag(meta))

    def delete(self, uri: str) -> None:
        # S3 answers 204 for an absent key too, which makes delete idempotent.
        bucket, key = parse_s3(uri)
        self._call(uri, "delete_object", Bucket=bucket, Key=key)


@contextlib.contextmanager
def _translated(uri: str, method: str) -> Iterator[None]:
    """Turn what boto3 raises inside the block into the typed StorageError naming ``uri``."""
    try:
        yield
    except ClientError as exc:
        raise _client_error(uri, method, exc) from None
    except (NoCredentialsError, PartialCredentialsError):
        raise AccessDeniedError(
            f"no usable AWS credentials for {uri}: set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance/pod role", uri) from None
    except BotoCoreError as exc:  # connection refused/reset after retries, timeouts
        raise StoreUnavailableError(f"{method} {uri} failed: {type(exc).__name__}: "
                           f"{_redact(str(exc))}", uri) from None


def _read_body(uri: str, response: dict[str, Any]) -> bytes:
    try:
        return response["Body"].read()
    except Exception as exc:  # noqa: BLE001 - a reset mid-body, after botocore's retries
        raise StoreUnavailableError(f"reading {uri} failed mid-transfer: "
                           f"{type(exc).__name__}", uri) from None


def _etag(reply: dict[str, Any]) -> str | None:
    """The version tag of a put, a listed object or a head: the ETag without its quotes."""
    return (reply.get("ETag") or "").strip('"') or None


def _redact(text: str) -> str:
    """Drop anything that looks like a signed URL's query (it carries a credential scope)."""
    return text.split("?", 1)[0]


def _client_error(uri: str, method: str, exc: ClientError) -> StorageError:
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
    message = f"{method} {uri} failed ({code}): {_redact(str(error.get('Message', '')))}"
    if code == "InvalidRange" or status == "416":
        return _RangeNotSatisfiable(message, uri)
    if status.startswith("5"):  # 500/502/504 after every retry: the store, not the object
        return StoreUnavailableError(message, uri)
    return StorageError(message, uri)
