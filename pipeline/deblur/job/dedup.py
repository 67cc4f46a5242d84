"""Exact duplicate detection over any number of rows in bounded memory.

Planning must fail every row whose input another earlier row already names (``duplicate_key``)
and every row whose output an earlier row already writes (``output_collision``). Keeping every
key, or even a Python set of digests (~90 bytes a row), grows with the job: 100 M rows would
need ~18 GB on the driver. Here memory is fixed instead:

- ``digest64`` hashes a whole Arrow string column at once (numpy, no Python loop per row);
- ``DigestIndex`` keeps (digest, row id) pairs in two fixed numpy buffers; when they fill, the
  pairs are appended to one of ``PARTITIONS`` files on local disk by the digest's top byte;
- ``find_duplicates`` then reads one partition at a time, sorts it, and keeps only the pairs
  whose digest occurs more than once: the *candidates*;
- candidates are confirmed on the keys themselves, read back from the planning ``Spool``
  (exact: two different keys that share a 64-bit digest are both kept), ``CONFIRM_ROWS``
  candidates at a time, so a manifest full of duplicates also stays within memory (one key
  repeated N times is one digest: its N pairs share a partition, 16 bytes each, and its keys
  are confirmed CONFIRM_ROWS at a time).

The first row (lowest row id) of each key wins; the others are returned as duplicates. Memory:
the two buffers (``BUFFER_ROWS`` x 16 bytes each), one partition at a time, and 8 bytes per
*duplicate* row found. Disk: 16 bytes per row per index, plus the spool.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BUFFER_ROWS = 1 << 21  # pairs held in memory per index before spilling (32 MiB)
PARTITIONS = 256  # spill files per index, by the digest's top byte
CONFIRM_ROWS = 1 << 20  # candidate keys held at once while confirming
_GATHER_BYTES = 1 << 21
_PAIR = np.dtype([("digest", "<u8"), ("row", "<i8")])

_SEED = np.uint64(0x243F6A8885A308D3)
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def _fmix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit affects every output bit."""
    h = h ^ (h >> np.uint64(30))
    h = h * _M2
    h = h ^ (h >> np.uint64(27))
    h = h * _M3
    return h ^ (h >> np.uint64(31))


def digest64(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit digest per string (uint64), the same in every process and on every machine.

    A few vectorised passes over the column's 8-byte words, no Python per row. Not
    cryptographic, and it
    need not be: a shared digest only makes two rows candidates, which are then compared on
    their keys. Nulls hash as the empty string.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    n = len(values)
    if n == 0:
        return np.empty(0, np.uint64)
    if values.null_count:
        values = pc.fill_null(values, "")
    large = pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type)
    buffers = values.buffers()
    offsets = np.frombuffer(buffers[1], np.int64 if large else np.int32, n + 1,
                            values.offset * (8 if large else 4)).astype(np.int64)
    lengths = np.diff(offsets)
    out = np.empty(n, np.uint64)
    # Slices of rows, so the per-byte temporaries stay a few MiB whatever the batch.
    first = 0
    while first < n:
        last = min(n, int(np.searchsorted(offsets, offsets[first] + _GATHER_BYTES,
                                          side="right")))
        last = max(last, first + 1)
        lo, hi = int(offsets[first]), int(offsets[last])
        data = (np.frombuffer(buffers[2], np.uint8, hi - lo, lo) if hi > lo
                else np.empty(0, np.uint8))
        out[first:last] = _digest_slice(data, offsets[first:last + 1] - lo,
                                        lengths[first:last])
        first = last
    return out


def _digest_slice(data: np.ndarray, offsets: np.ndarray, lengths: np.ndarray
                  ) -> np.ndarray:
    """Each string as little-endian 8-byte words (the last one masked to the string's
    bytes), each word mixed with its index in the string, summed per string, finalised with
    the length. Words are read unaligned straight from the column's bytes."""
    total = np.zeros(len(lengths), np.uint64)
    if len(data):
        padded = np.zeros(len(data) + 8, np.uint8)
        padded[:len(data)] = data
        view = np.ndarray((len(data),), "<u8", padded, 0, (1,))  # a word at every byte
        nwords = (lengths + 7) // 8
        firsts = np.cumsum(nwords) - nwords
        index = np.arange(int(nwords.sum()), dtype=np.int64)
        index -= np.repeat(firsts, nwords)  # each word's number in its string
        words = view[np.repeat(offsets[:-1], nwords) + 8 * index]
        tail = np.repeat(lengths, nwords) - 8 * index  # bytes of the string from this word on
        short = tail < 8
        words[short] &= (np.uint64(1) << (8 * tail[short]).astype(np.uint64)) - np.uint64(1)
        words ^= index.astype(np.uint64) * _M1 + _SEED  # the word's place in its string
        words *= _M2
        words ^= words >> np.uint64(32)  # cheap per word: the finaliser below mixes the sum
        present = nwords > 0
        total[present] = np.add.reduceat(words, firsts[present])
    return _fmix(_fmix(total ^ _SEED) ^ (lengths.astype(np.uint64) * _M1))


class DigestIndex:
    """(digest, row id) pairs of one kind (inputs or outputs), in memory up to a fixed count,
    then spilled to partition files under ``folder``."""

    def __init__(self, folder: str, name: str, capacity: int | None = None) -> None:
        self.folder, self.name = folder, name
        self.capacity = capacity or BUFFER_ROWS
        self._pairs = np.empty(self.capacity, _PAIR)
        self._n = 0
        self.count = 0
        self.spilled = 0
        """Pairs written to disk so far."""

    def add(self, digests: np.ndarray, rows: np.ndarray) -> None:
        done = 0
        while done < len(digests):
            take = min(len(digests) - done, self.capacity - self._n)
            self._pairs["digest"][self._n:self._n + take] = digests[done:done + take]
            self._pairs["row"][self._n:self._n + take] = rows[done:done + take]
            self._n += take
            done += take
            if self._n == self.capacity:
                self._spill()
        self.count += len(digests)

    def _path(self, part: int) -> str:
        return os.path.join(self.folder, f"{self.name}-{part:03d}.bin")

    def _spill(self) -> None:
        pairs = self._pairs[:self._n]
        part = (pairs["digest"] >> np.uint64(56)).astype(np.int64)
        order = np.argsort(part, kind="stable")
        pairs, part = pairs[order], part[order]
        bounds = np.searchsorted(part, np.arange(PARTITIONS + 1))
        for p in range(PARTITIONS):
            lo, hi = bounds[p], bounds[p + 1]
            if hi > lo:
                with open(self._path(p), "ab") as f:
                    pairs[lo:hi].tofile(f)
        self.spilled += self._n
        self._n = 0

    def partitions(self) -> Iterator[np.ndarray]:
        """Every pair, one group of whole digests at a time (a group never spans two)."""
        if not self.spilled:
            yield self._pairs[:self._n]
            return
        if self._n:
            self._spill()
        self._pairs = np.empty(0, _PAIR)  # the buffer's memory goes back before the merge
        for p in range(PARTITIONS):
            path = self._path(p)
            if os.path.exists(path):
                yield np.fromfile(path, _PAIR)
                os.unlink(path)


def candidates(pairs: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """Pairs whose digest occurs more than once, sorted by (digest, row); rows in the sorted
    array ``exclude`` are left out first (they no longer compete)."""
    if exclude is not None and len(exclude) and len(pairs):
        pos = np.searchsorted(exclude, pairs["row"])
        pos[pos == len(exclude)] = 0
        pairs = pairs[exclude[pos] != pairs["row"]]
    if len(pairs) < 2:
        return pairs[:0]
    # Pairs arrive in row order (within a spill, and spills in turn), so a stable sort on
    # the digest alone leaves each group in row order.
    pairs = pairs[np.argsort(pairs["digest"], kind="stable")]
    same = pairs["digest"][1:] == pairs["digest"][:-1]
    member = np.zeros(len(pairs), bool)
    member[1:] |= same
    member[:-1] |= same
    return pairs[member]


def find_duplicates(index: DigestIndex, keys_of: KeyReader,
                    exclude: np.ndarray | None = None) -> np.ndarray:
    """Sorted row ids that repeat the key of an earlier row (rows in ``exclude`` ignored)."""
    found: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    held = 0
    for pairs in index.partitions():
        cand = candidates(pairs, exclude)
        for chunk in _whole_groups(cand, CONFIRM_ROWS):
            if len(chunk) > CONFIRM_ROWS:  # one key repeated very often: keys bit by bit
                found.append(_confirm_streamed(chunk, keys_of))
                continue
            pending.append(chunk)
            held += len(chunk)
            if held >= CONFIRM_ROWS:
                found.append(_confirm(np.concatenate(pending), keys_of))
                pending, held = [], 0
    if held:
        found.append(_confirm(np.concatenate(pending), keys_of))
    return np.sort(np.concatenate(found)) if found else np.empty(0, np.int64)


def _whole_groups(cand: np.ndarray, limit: int) -> Iterator[np.ndarray]:
    """Slices of at most ~``limit`` sorted candidates, never splitting a digest's group."""
    start = 0
    while start < len(cand):
        end = min(start + limit, len(cand))
        while end < len(cand) and cand["digest"][end] == cand["digest"][end - 1]:
            end += 1
        yield cand[start:end]
        start = end


def _confirm_streamed(cand: np.ndarray, keys_of: KeyReader) -> np.ndarray:
    """``_confirm`` for more candidates than CONFIRM_ROWS (a digest group that big is one key
    repeated, or a few): rows in order, CONFIRM_ROWS keys at a time, remembering only the
    distinct keys seen so far."""
    rows = np.unique(cand["row"])
    seen = pa.array([], pa.string())
    found: list[np.ndarray] = []
    for start in range(0, len(rows), CONFIRM_ROWS):
        got_rows, keys = keys_of(rows[start:start + CONFIRM_ROWS])
        table = pa.table({"row": pa.array(got_rows, pa.int64()), "key": keys})
        first = table.group_by("key", use_threads=False).aggregate([("row", "min")])
        new = first.filter(pc.invert(pc.is_in(first["key"], value_set=seen)))
        winners = np.sort(new.column("row_min").to_numpy())
        found.append(np.setdiff1d(got_rows, winners, assume_unique=True))
        seen = pa.concat_arrays([seen, new.column("key").combine_chunks()])
    return np.concatenate(found) if found else np.empty(0, np.int64)


class KeyReader:
    """Reads the keys of given rows back, in one pass over the spool (see ``Spool.keys``)."""

    def __init__(self, spool: Spool, column: str) -> None:
        self.spool, self.column = spool, column

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, pa.Array]:
        return self.spool.keys(rows, self.column)


def _confirm(cand: np.ndarray, keys_of: KeyReader) -> np.ndarray:
    """Of candidate rows (whole digest groups), those whose exact key an earlier row has."""
    rows = np.unique(cand["row"])
    got_rows, keys = keys_of(rows)
    table = pa.table({"row": pa.array(got_rows, pa.int64()), "key": keys})
    first = table.group_by("key", use_threads=False).aggregate([("row", "min")])
    winners = np.sort(first.column("row_min").to_numpy())
    return np.setdiff1d(got_rows, winners, assume_unique=True)


class Spool:
    """Provisional planned batches on local disk (Arrow IPC, lz4), read back in order."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, "spool.arrows")
        self._sink: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if self._writer is None:
            self._sink = pa.OSFile(self.path, "wb")
            codec = "lz4" if pa.Codec.is_available("lz4") else None
            self._writer = pa.ipc.new_stream(self._sink, batch.schema,
                                             options=pa.ipc.IpcWriteOptions(compression=codec))
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            assert self._sink is not None
            self._sink.close()
            self._writer = None

    def batches(self) -> Iterator[pa.RecordBatch]:
        if not os.path.exists(self.path):
            return
        with pa.OSFile(self.path, "rb") as source:
            yield from pa.ipc.open_stream(source)

    def keys(self, rows: np.ndarray, column: str) -> tuple[np.ndarray, pa.Array]:
        """(rows, their ``column`` values) for sorted ``rows``; one pass over the spool."""
        got_rows: list[np.ndarray] = []
        got: list[pa.Array] = []
        for batch in self.batches():
            if not batch.num_rows:
                continue
            ids = batch.column("row_id")
            lo, hi = ids[0].as_py(), ids[-1].as_py() + 1  # row ids run consecutively
            a, b = np.searchsorted(rows, [lo, hi])
            if b > a:
                take = rows[a:b]
                got_rows.append(take)
                got.append(batch.column(column).take(pa.array(take - lo)))
        if not got:
            return np.empty(0, np.int64), pa.array([], pa.string())
        return np.concatenate(got_rows), pa.concat_arrays(got)
