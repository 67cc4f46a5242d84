"""What a store is, and how URIs are spelt: the ``Backend`` protocol that ``io/local.py`` and
``io/s3.py`` implement, the ``ObjectInfo`` they list, and the URI helpers.

Its own module, below ``io/storage.py``: the ``Storage`` facade builds the backends, and the
backends need these types, so keeping them in the facade made each import the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote

from deblur.errors import StorageError


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


def has_suffix(name: str, suffixes: tuple[str, ...] | None) -> bool:
    """Whether a listed name ends in one of ``suffixes`` (given lower-case); None keeps all.

    Backends filter while listing rather than the facade afterwards: the local walk then
    stats only the files it keeps.
    """
    return suffixes is None or name.lower().endswith(suffixes)


Count = Callable[[str, int], None]
"""``count(op, n)``: how a backend reports requests the facade cannot see from outside, which
are the further pages of a listing (the facade counts one request per call itself)."""


class Backend(Protocol):
    """One kind of store. Every method takes the caller's full URI and raises the typed
    ``StorageError`` subclasses naming it; ``Storage`` documents what each one does."""

    def get(self, uri: str) -> bytes: ...

    def get_range(self, uri: str, length: int, start: int) -> bytes: ...

    def put(self, uri: str, data: bytes, content_type: str | None) -> str | None: ...

    def put_if_absent(self, uri: str, data: bytes) -> str | None: ...

    def put_if_match(self, uri: str, data: bytes, tag: str) -> str | None: ...

    def get_tagged(self, uri: str) -> tuple[bytes, str | None]: ...

    def list(self, prefix: str, suffixes: tuple[str, ...] | None) -> Iterator[ObjectInfo]:
        """``suffixes`` are lower-case (see ``has_suffix``); each page after the first is
        reported through the backend's ``Count`` as one more LIST."""
        ...

    def head(self, uri: str) -> ObjectInfo: ...

    def delete(self, uri: str) -> None: ...
