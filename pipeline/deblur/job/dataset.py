"""Manifest files read as streams: ranged GETs, row group by row group, never whole.

A manifest may be one object or a *dataset*: a glob over one folder's files, such as
``s3://bucket/inventory/data/*.parquet`` (S3 Inventory's and Spark's layout), read as one
manifest in file-name order. Each file is opened as a read-only, seekable view over
``Storage.get_range`` (``RangedFile``), the same client, endpoint and credentials as every other
request, so:

- Parquet reads its footer, then one row group's column chunks at a time;
- CSV and JSONL are parsed block by block (pyarrow's streaming readers);
- text is decoded and split block by block.

Memory is one block (``BLOCK_BYTES``) or one row group, whatever the file's size. A small
file costs one GET, as a whole-object read did; a big one ~size / BLOCK_BYTES ranged GETs and
one HEAD (Parquet asks for the size to find its footer).
"""

from __future__ import annotations

import codecs
import fnmatch
import io
from collections.abc import Iterator
from typing import Any

from deblur.errors import ManifestError, StorageError
from deblur.io.storage import Storage, as_folder

BLOCK_BYTES = 8 << 20  # one ranged GET; also the read-ahead for sequential formats
MANIFEST_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson", ".txt")


class RangedFile(io.RawIOBase):
    """A read-only, seekable object over ranged GETs, keeping only the last block fetched.

    Reads at least BLOCK_BYTES from where they start (read-ahead for sequential readers) and
    exactly what is asked beyond that (a Parquet column chunk comes in one GET).
    """

    def __init__(self, storage: Storage, uri: str) -> None:
        super().__init__()
        self.storage, self.uri = storage, uri
        self.pos = 0
        self.size: int | None = None  # known once a read comes back short, or after a HEAD
        self._start = 0
        self._block = b""
        self.requests = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        # pyarrow closes the files it wraps when a reader goes; this one is opened once and
        # read by two readers in turn (the listing metadata, then the rows), so it stays
        # usable and only lets its block go.
        self._block = b""

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            base = self.length()
        else:
            base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def length(self) -> int:
        if self.size is None:
            self.size = self.storage.head(self.uri).size
            self.requests += 1
        return self.size

    def first_block(self) -> bytes:
        """The file's first bytes (one GET; the whole file when it is small)."""
        self._fetch(0, BLOCK_BYTES)
        return self._block

    def _fetch(self, start: int, length: int) -> None:
        data = self.storage.get_range(self.uri, length, start=start)
        self.requests += 1
        if len(data) < length:
            self.size = start + len(data)
        self._start, self._block = start, data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = len(view)
        if not want or (self.size is not None and self.pos >= self.size):
            return 0
        offset = self.pos - self._start
        if not (0 <= offset < len(self._block)) or offset + want > len(self._block) and (
                self.size is None or self._start + len(self._block) < self.size):
            self._fetch(self.pos, max(want, BLOCK_BYTES))
            offset = 0
        chunk = self._block[offset:offset + want]
        view[:len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def is_dataset(source: str) -> bool:
    """A glob over one folder's manifest files: ``…/*.parquet``, ``…/part-*.csv``."""
    name = source.rsplit("/", 1)[-1]
    return any(ch in name for ch in "*?[") and name.lower().endswith(MANIFEST_SUFFIXES)


def dataset_files(source: str, storage: Storage) -> list[str]:
    """The files a dataset source names, in name order (the order of their rows' ids).

    Only the folder's own files match (``*`` does not reach into sub-folders)."""
    folder, _, pattern = source.rpartition("/")
    folder = as_folder(folder)
    suffix = "." + pattern.rsplit(".", 1)[-1].lower()
    try:
        infos = [i for i in storage.list(folder, (suffix,))
                 if "/" not in i.key and fnmatch.fnmatchcase(i.key, pattern)]
    except StorageError as exc:
        raise ManifestError(f"cannot list manifest files {source}: {exc}; check the path and "
                            f"permissions") from None
    if not infos:
        raise ManifestError(f"no manifest files match {source}: check the folder and the "
                            f"pattern (it matches file names in that folder only)")
    return [i.uri for i in sorted(infos, key=lambda i: i.key.encode("utf-8",
                                                                     "surrogatepass"))]


def open_file(storage: Storage, uri: str) -> RangedFile:
    """A RangedFile positioned at 0 whose first block is fetched (ManifestError if absent,
    unreadable or empty)."""
    stream = RangedFile(storage, uri)
    try:
        first = stream.first_block()
    except StorageError as exc:
        raise ManifestError(f"cannot read manifest {uri}: {exc}; check the path and "
                            f"permissions") from None
    if not first:
        raise ManifestError(f"manifest {uri} is empty (0 bytes): it must list at least one "
                            f"image key")
    return stream


def text_lines(stream: RangedFile, batch_rows: int) -> Iterator[list[str]]:
    """Lists of keys, one per ``\\n``-terminated line (``\\r\\n`` too), kept exactly as written:
    not ``str.splitlines`` (which also splits at U+2028, U+0085, …), and no stripping; empty
    lines and ``#`` comments skipped. Decoded block by block (a character split across two
    blocks is decoded once both are in)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry = ""
    lines: list[str] = []
    while True:
        block = stream.read(BLOCK_BYTES)
        text = carry + decoder.decode(block or b"", final=not block)
        parts = text.split("\n")
        carry = parts.pop() if block else ""
        for line in parts:
            if line.endswith("\r"):
                line = line[:-1]
            if line and not line.startswith("#"):
                lines.append(line)
                if len(lines) == batch_rows:
                    yield lines
                    lines = []
        if not block:
            break
    if lines:
        yield lines
