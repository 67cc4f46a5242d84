"""The local-filesystem backend behind ``deblur.io.storage.Storage``: plain paths and ``file://``.

Writes go to a temporary file in the same folder and are renamed into place, so a reader
never sees a partial file; put-if-absent links that temporary file (``os.link`` fails when the
name exists), which is both atomic and exclusive. put-if-match (compare-and-swap) compares the
version and renames under an exclusive ``flock`` of the folder's lock file. Listings walk folders recursively in sorted
order and skip those temporary files; a symbolic link named like an image is listed even when
it dangles or loops (with no ``etag``), so the planner records it as a failed row rather than
crashing or dropping it (``link_problem`` says why). A file's version tag (``etag``) is its
nanosecond mtime and size, since a local file has no ETag.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
import uuid
from collections.abc import Iterator

from deblur.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    ConflictError,
    NotFoundError,
    StorageError,
)
from deblur.io.backend import Count, ObjectInfo, has_suffix, to_local_path

TMP_MARK = ".deblur-tmp-"
"""Temporary local files carry this in their name; listings skip them."""

LIST_PAGE = 1000
"""Listed names per counted LIST request: S3's page size, so local runs price like S3 ones."""


class LocalBackend:
    """The ``Backend`` for local paths and ``file://`` URIs.

    Args:
        count: reports each further ``LIST_PAGE`` names a listing yields as one more LIST.
    """

    def __init__(self, count: Count) -> None:
        self._count = count

    def get(self, uri: str) -> bytes:
        return _read(uri)

    def get_range(self, uri: str, length: int, start: int) -> bytes:
        return _read(uri, start, length)

    def put(self, uri: str, data: bytes, content_type: str | None) -> str | None:
        del content_type  # a local file has no place to keep one
        path = to_local_path(uri)
        tmp = _write_temp(uri, path, data)
        try:
            os.replace(tmp, path)
            return _tag(os.stat(path))
        except OSError as exc:
            _unlink(tmp)
            raise StorageError(f"cannot write {uri}: {exc.strerror}", uri) from None

    def put_if_absent(self, uri: str, data: bytes) -> str | None:
        path = to_local_path(uri)
        tmp = _write_temp(uri, path, data)
        try:
            os.link(tmp, path)
            return _tag(os.stat(tmp))  # the same inode as path, whatever replaced it since
        except FileExistsError:
            raise AlreadyExistsError(f"{uri} already exists", uri) from None
        except OSError as exc:
            raise StorageError(f"cannot create {uri}: {exc.strerror}", uri) from None
        finally:
            _unlink(tmp)

    def put_if_match(self, uri: str, data: bytes, tag: str) -> str | None:
        path = to_local_path(uri)
        tmp = _write_temp(uri, path, data)  # outside the lock: the lock covers a stat + rename
        try:
            with _folder_lock(uri, path):
                try:
                    current = os.stat(path)
                except FileNotFoundError:
                    raise ConflictError(f"{uri} vanished since it was read", uri) from None
                if _tag(current) != tag:
                    raise ConflictError(f"{uri} changed since it was read (version {tag})",
                                        uri)
                # The tag is mtime + size: two versions of equal size written within the
                # clock's granularity would share it, and a stale writer would then win. Each
                # compare-and-swap therefore moves the mtime strictly forward.
                stamp = max(time.time_ns(), current.st_mtime_ns + 1)
                os.utime(tmp, ns=(stamp, stamp))
                written = _tag(os.stat(tmp))
                os.replace(tmp, path)
                return written
        except OSError as exc:
            raise StorageError(f"cannot write {uri}: {exc.strerror}", uri) from None
        finally:
            _unlink(tmp)

    def get_tagged(self, uri: str) -> tuple[bytes, str | None]:
        with _reading(uri), open(to_local_path(uri), "rb") as handle:
            # fstat of the open file: the tag of the very version read, even if a writer
            # renames a new one into place meanwhile.
            return handle.read(), _tag(os.fstat(handle.fileno()))

    def list(self, prefix: str, suffixes: tuple[str, ...] | None) -> Iterator[ObjectInfo]:
        root = to_local_path(prefix)
        if not os.path.isdir(root):
            raise NotFoundError(f"{prefix} is not a folder", prefix)
        for count, info in enumerate(_walk(root, root, suffixes), 1):
            if count > 1 and count % LIST_PAGE == 1:
                self._count("LIST", 1)  # the facade counted the first page
            yield info

    def head(self, uri: str) -> ObjectInfo:
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
                          mtime=st.st_mtime, etag=_tag(st))

    def delete(self, uri: str) -> None:
        try:
            os.unlink(to_local_path(uri))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot delete {uri}: {exc.strerror}", uri) from None


def _read(uri: str, start: int = 0, length: int = -1) -> bytes:
    """``length`` bytes from ``start`` (-1: to the end), for both get and get_range."""
    with _reading(uri), open(to_local_path(uri), "rb") as handle:
        handle.seek(start)
        return handle.read(length)


@contextlib.contextmanager
def _reading(uri: str) -> Iterator[None]:
    """Turn the OS errors of reading ``uri`` into the store's errors, naming it."""
    try:
        yield
    except FileNotFoundError:
        raise NotFoundError(f"{uri} does not exist", uri) from None
    except IsADirectoryError:
        raise NotFoundError(f"{uri} is a folder, not a file", uri) from None
    except PermissionError:
        raise AccessDeniedError(f"no permission to read {uri}", uri) from None
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {exc.strerror}", uri) from None


def _write_temp(uri: str, path: str, data: bytes) -> str:
    """Write ``data`` to a new temporary file beside ``path`` (same filesystem, so it can be
    renamed or linked into place) and return the temporary file's path."""
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


@contextlib.contextmanager
def _folder_lock(uri: str, path: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the folder's lock file (named with ``TMP_MARK``, so
    listings skip it). The kernel releases it when its holder dies, so a writer killed
    mid-commit never leaves the folder locked. The file is never deleted: deleting it would
    let two writers lock two different files of the same name."""
    lock_path = os.path.join(os.path.dirname(path) or ".", TMP_MARK + "lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StorageError(f"cannot lock {uri}: {exc.strerror}", uri) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _walk(root: str, folder: str, suffixes: tuple[str, ...] | None) -> Iterator[ObjectInfo]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise StorageError(f"cannot list {folder}: {exc.strerror}", folder) from None
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(root, entry.path, suffixes)
            continue
        if TMP_MARK in entry.name or not has_suffix(entry.name, suffixes):
            continue
        key = os.path.relpath(entry.path, root)
        try:
            st = entry.stat()  # follows a link: a dangling one or a loop raises here
        except OSError:
            if entry.is_symlink():  # listed, so the planner records it as a failed row
                yield ObjectInfo(uri=entry.path, key=key, size=0, mtime=0.0, etag=None)
                continue
            raise StorageError(f"cannot stat {entry.path}", entry.path) from None
        if stat.S_ISREG(st.st_mode):
            yield ObjectInfo(uri=entry.path, key=key, size=st.st_size, mtime=st.st_mtime,
                             etag=_tag(st))


def link_problem(path: str, root: str, follow_links: bool) -> str | None:
    """Why the listed file ``path`` under the folder ``root`` must not be read, or None.

    ``broken_link: …`` for a dangling link or a link loop; ``outside_source: …`` for a link
    that resolves outside ``root`` unless ``follow_links``. Links within ``root`` are fine.
    One ``lstat`` for a plain file; links are resolved with ``realpath``. Checked again by the
    worker just before it reads, so a link changed after planning is caught too.
    """
    try:
        if not stat.S_ISLNK(os.lstat(path).st_mode):
            return None  # listings never descend into linked folders: a plain file is inside
    except OSError:
        return None  # gone (or unreadable): not a link; the read itself reports it
    try:
        target = os.path.realpath(path, strict=True)
    except OSError as exc:
        return (f"broken_link: {path} is a symbolic link that cannot be resolved "
                f"({exc.strerror}); fix or remove the link")
    if not os.path.isfile(target):
        return f"broken_link: {path} is a symbolic link to {target}, which is not a file"
    real_root = os.path.realpath(root)
    if follow_links or target.startswith(real_root.rstrip("/") + "/"):
        return None
    return (f"outside_source: {path} is a symbolic link to {target}, outside the source "
            f"folder {root}; not read. Pass --follow-links to read such links")


def _tag(st: os.stat_result) -> str:
    """A local file's version: a rewrite changes its nanosecond mtime (or its size)."""
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
