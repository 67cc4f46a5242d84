"""Manifests in, validated shard rows out: streaming, never a 10M-row list of Python objects.

A job's source is either a manifest object or a prefix/folder that is listed:

- ``*.parquet``: column ``key`` (or ``uri``), optional ``output_key`` and ``reference``;
- ``*.csv``: the same columns, with a header row;
- ``*.jsonl`` / ``*.ndjson``: one object per line with the same fields;
- ``*.txt``: one key per line;
- anything else is a prefix: its image objects (by extension) are listed, page by page.

Keys in a manifest are full URIs (``s3://…``, ``file://…``, absolute paths) or relative to the
manifest's folder. Each row's *relative key* (relative to the source prefix, or the key within
its bucket for a URI elsewhere) is joined under the destination to form the output key.

Manifest-level problems raise ``ManifestError`` at once, naming the file and the fix. Row-level
problems never stop the job and are never dropped: the row is planned with an ``error`` of the
form ``reason: message`` and its result row records that failure. Rows are checked for NUL
bytes, keys over 1024 bytes, keys escaping the output prefix (``..``, absolute), duplicates, and
output keys two inputs would share (``a//b`` and ``a/b`` included). Duplicates are detected by
64-bit digests, so memory grows by a few dozen bytes per row, not by the key's size.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from deblur.io import codec
from deblur.config import CodecConfig
from deblur.errors import ManifestError, StorageError, one_line
from deblur.io.storage import Storage, as_folder, is_s3, join, parse_s3, to_local_path

MAX_KEY_BYTES = 1024  # S3's limit on a key
BATCH_ROWS = 65_536
MANIFEST_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson", ".txt")
KEY_COLUMNS = ("key", "uri")
BASE_METADATA = b"deblur.base"

SHARD_SCHEMA = pa.schema([
    pa.field("row_id", pa.int64(), nullable=False),
    pa.field("key", pa.string(), nullable=False),  # full input URI
    pa.field("output_key", pa.string(), nullable=False),  # full output URI ("" if invalid)
    pa.field("reference", pa.string()),  # optional sharp reference URI (quality figures)
    pa.field("error", pa.string()),  # "reason: message" for a row that cannot be processed
])


@dataclass
class PlanCounts:
    """What planning found; stored in job.json and printed by the CLI."""

    rows: int = 0
    shards: int = 0
    invalid: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"rows": self.rows, "shards": self.shards, "invalid": dict(self.invalid),
                "valid": self.rows - sum(self.invalid.values())}


def is_manifest(source: str) -> bool:
    return source.lower().endswith(MANIFEST_SUFFIXES)


def source_prefix(source: str) -> str:
    """The folder relative keys are resolved against: the manifest's folder, or the prefix."""
    if is_manifest(source):
        head = source.rsplit("/", 1)[0] if "/" in source else "."
        return as_folder(head)
    return as_folder(source)


# -- reading -------------------------------------------------------------------------------


def read_batches(source: str, storage: Storage) -> tuple[str, Iterator[pa.RecordBatch]]:
    """(base prefix for relative keys, stream of batches with a ``key`` column and extras).

    The base is the manifest's folder, or the prefix a ``deblur manifest`` listing recorded in
    its Parquet metadata (``deblur.base``), so a listing stored elsewhere still maps keys
    relative to the listed prefix.
    """
    if not is_manifest(source):
        return as_folder(source), _listing_batches(source, storage)
    try:
        data = storage.get(source)
    except StorageError as exc:
        raise ManifestError(f"cannot read manifest {source}: {exc}; check the path and "
                            f"permissions") from None
    if not data:
        raise ManifestError(f"manifest {source} is empty (0 bytes): it must list at least one "
                            f"image key")
    lower = source.lower()
    base = source_prefix(source)
    if lower.endswith(".parquet"):
        try:
            reader = pq.ParquetFile(io.BytesIO(data))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ManifestError(f"manifest {source} is not a readable Parquet file: "
                                f"{one_line(exc)}") from None
        recorded = (reader.schema_arrow.metadata or {}).get(BASE_METADATA)
        base = as_folder(recorded.decode()) if recorded else base
    return base, _parse(source, data)


def _parse(source: str, data: bytes) -> Iterator[pa.RecordBatch]:
    lower = source.lower()
    try:
        if lower.endswith(".parquet"):
            batches = _parquet_batches(data, source)
        elif lower.endswith(".csv"):
            batches = _csv_batches(data)
        elif lower.endswith((".jsonl", ".ndjson")):
            batches = _json_batches(data)
        else:
            batches = _text_batches(data)
        yield from (_normalise(b, source) for b in batches)
    except ManifestError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError, OSError) as exc:
        raise ManifestError(f"manifest {source} cannot be parsed: {one_line(exc)}; write it "
                            f"as Parquet/CSV/JSONL with a 'key' column, or text with one key "
                            f"per line") from None


def _parquet_batches(data: bytes, source: str) -> Iterator[pa.RecordBatch]:
    reader = pq.ParquetFile(io.BytesIO(data))
    names = reader.schema_arrow.names
    wanted = [n for n in ("key", "uri", "output_key", "reference") if n in names]
    if not {"key", "uri"} & set(wanted):
        raise ManifestError(_no_key_column(source, names))
    yield from reader.iter_batches(batch_size=BATCH_ROWS, columns=wanted)


def _csv_batches(data: bytes) -> Iterator[pa.RecordBatch]:
    import pyarrow.csv as pcsv

    reader = pcsv.open_csv(
        io.BytesIO(data), read_options=pcsv.ReadOptions(block_size=1 << 22),
        convert_options=pcsv.ConvertOptions(
            column_types={c: pa.string() for c in ("key", "uri", "output_key", "reference")},
            strings_can_be_null=False))
    yield from reader


def _json_batches(data: bytes) -> Iterator[pa.RecordBatch]:
    import pyarrow.json as pjson

    schema = pa.schema([(c, pa.string()) for c in ("key", "uri", "output_key", "reference")])
    reader = pjson.open_json(
        io.BytesIO(data), read_options=pjson.ReadOptions(block_size=1 << 22),
        parse_options=pjson.ParseOptions(explicit_schema=schema,
                                         unexpected_field_behavior="ignore"))
    yield from reader


def _text_batches(data: bytes) -> Iterator[pa.RecordBatch]:
    text = data.decode("utf-8")
    lines: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append(line)
            if len(lines) == BATCH_ROWS:
                yield pa.RecordBatch.from_pydict({"key": pa.array(lines, pa.string())})
                lines = []
    if lines:
        yield pa.RecordBatch.from_pydict({"key": pa.array(lines, pa.string())})


def _no_key_column(source: str, names: list[str]) -> str:
    return (f"manifest {source} has no 'key' (or 'uri') column; found columns {names}. "
            f"Rename the column holding the image keys to 'key'")


def _normalise(batch: pa.RecordBatch, source: str) -> pa.RecordBatch:
    names = batch.schema.names
    # JSONL parsed with a fixed schema has every column; one that is all null is absent.
    present = [c for c in KEY_COLUMNS
               if c in names and batch.column(c).null_count < batch.num_rows]
    column = present[0] if present else None
    if column is None:
        raise ManifestError(_no_key_column(source, names))
    keys = batch.column(column).cast(pa.string())
    columns = {"key": keys}
    for extra in ("output_key", "reference"):
        if extra in names:
            columns[extra] = batch.column(extra).cast(pa.string())
    return pa.RecordBatch.from_pydict(columns)


def _listing_batches(prefix: str, storage: Storage,
                     skip: str | None = None) -> Iterator[pa.RecordBatch]:
    keys: list[str] = []
    try:
        for info in storage.list(prefix, codec.IMAGE_EXTENSIONS):
            if skip and info.uri.startswith(skip):
                continue
            keys.append(info.key)
            if len(keys) == BATCH_ROWS:
                yield pa.RecordBatch.from_pydict({"key": pa.array(keys, pa.string())})
                keys = []
    except StorageError as exc:
        raise ManifestError(f"cannot list source {prefix}: {exc}; check the prefix and "
                            f"permissions") from None
    if keys:
        yield pa.RecordBatch.from_pydict({"key": pa.array(keys, pa.string())})


# -- validation and output keys ------------------------------------------------------------


def _relative(key: str, base: str) -> tuple[str, str]:
    """(full input URI, key relative to the source prefix) for one manifest entry."""
    if is_s3(key):
        if key.startswith(base):
            return key, key[len(base):]
        return key, parse_s3(key)[1]
    if key.startswith("file://") or key.startswith("/"):
        path = to_local_path(key)
        local_base = to_local_path(base)
        if path.startswith(local_base):
            return path, path[len(local_base):]
        return path, path.lstrip("/")
    return join(base, key), key


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


def _check_relative(rel: str) -> str | None:
    """Why a relative key cannot be used safely as an output path, or None."""
    if "\x00" in rel:
        return "invalid_key: contains a NUL byte"
    if len(rel.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return f"invalid_key: longer than {MAX_KEY_BYTES} bytes"
    if not rel or rel.endswith("/"):
        return "invalid_key: names a folder, not an object"
    if rel.startswith("/") or rel.startswith("\\"):
        return "invalid_key: absolute path would escape the output prefix"
    parts = rel.replace("\\", "/").split("/")
    if ".." in parts:
        return "invalid_key: '..' would escape the output prefix"
    if any(ord(ch) < 32 for ch in rel):
        return "invalid_key: contains a control character"
    return None


def normalise_output(rel: str) -> str:
    """Collapse ``a//b`` and ``a/./b`` so two spellings of one object collide visibly."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    return "/".join(parts)


class RowPlanner:
    """Turns manifest batches into shard rows; keeps only digests between batches."""

    def __init__(self, base: str, destination: str, codec_config: CodecConfig) -> None:
        self.base = as_folder(base)
        self.destination = as_folder(destination)
        self.codec = codec_config
        self.seen_inputs: set[int] = set()
        self.seen_outputs: set[int] = set()
        self.counts = PlanCounts()
        self.dest_key_len = len(parse_s3(self.destination)[1].encode()) if is_s3(
            self.destination) else 0

    def plan(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        keys = batch.column("key").to_pylist()
        outs = batch.column("output_key").to_pylist() if "output_key" in batch.schema.names \
            else None
        refs = batch.column("reference").to_pylist() if "reference" in batch.schema.names \
            else None
        row_ids, inputs, outputs, errors, references = [], [], [], [], []
        for i, key in enumerate(keys):
            row_id = self.counts.rows
            self.counts.rows += 1
            uri, out_uri, error = self._row(key, outs[i] if outs else None)
            if error:
                reason = error.split(":", 1)[0]
                self.counts.invalid[reason] = self.counts.invalid.get(reason, 0) + 1
            row_ids.append(row_id)
            inputs.append(uri)
            outputs.append(out_uri)
            errors.append(error)
            ref = refs[i] if refs else None
            references.append(_relative(ref, self.base)[0] if ref else None)
        return pa.RecordBatch.from_arrays(
            [pa.array(row_ids, pa.int64()), pa.array(inputs, pa.string()),
             pa.array(outputs, pa.string()), pa.array(references, pa.string()),
             pa.array(errors, pa.string())], schema=SHARD_SCHEMA)

    def _row(self, key: str | None, output: str | None) -> tuple[str, str, str | None]:
        if key is None or not key.strip():
            return "", "", "invalid_key: empty key in the manifest"
        shown = repr(key[:200])
        if "\x00" in key:
            return key.replace("\x00", "\\0"), "", f"invalid_key: {shown} contains a NUL byte"
        uri, rel = _relative(key, self.base)
        problem = _check_relative(rel)
        if problem:
            return uri, "", f"{problem.split(': ', 1)[0]}: {shown} {problem.split(': ', 1)[1]}"
        digest = _digest(uri)
        if digest in self.seen_inputs:
            return uri, "", f"duplicate_key: {shown} appears earlier in the manifest"
        self.seen_inputs.add(digest)
        if output:
            problem = _check_relative(output)
            if problem:
                return uri, "", (f"{problem.split(': ', 1)[0]}: output_key {output[:200]!r} "
                                 f"{problem.split(': ', 1)[1]}")
            out_rel = output
        else:
            out_rel = codec.output_key(rel, self.codec)
        out_rel = normalise_output(out_rel)
        if self.dest_key_len + len(out_rel.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
            return uri, "", (f"invalid_key: {shown}: its output key under {self.destination} "
                             f"would exceed S3's {MAX_KEY_BYTES}-byte limit")
        out_digest = _digest(out_rel)
        if out_digest in self.seen_outputs:
            return uri, "", (f"output_collision: {shown} maps to output {out_rel!r}, which an "
                             f"earlier row already writes")
        self.seen_outputs.add(out_digest)
        return uri, join(self.destination, out_rel), None


def plan_rows(source: str, destination: str, storage: Storage,
              codec_config: CodecConfig) -> tuple[Iterator[pa.RecordBatch], RowPlanner]:
    """Validated shard rows (as batches) for the whole source, and the planner's counts."""
    if is_manifest(source):
        base, batches = read_batches(source, storage)
    else:
        base = as_folder(source)
        skip = None
        if as_folder(destination).startswith(base):
            skip = as_folder(destination)  # in-place jobs must not list their own outputs
        batches = _listing_batches(source, storage, skip)
    planner = RowPlanner(base, destination, codec_config)
    return (planner.plan(b) for b in batches), planner


def iter_shards(batches: Iterator[pa.RecordBatch], shard_size: int) -> Iterator[pa.Table]:
    """Regroup batches into tables of exactly ``shard_size`` rows (the last may be shorter)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while batch.num_rows:
            take = min(batch.num_rows, shard_size - count)
            pending.append(batch.slice(0, take))
            batch = batch.slice(take)
            count += take
            if count == shard_size:
                yield pa.Table.from_batches(pending, schema=SHARD_SCHEMA)
                pending, count = [], 0
    if count:
        yield pa.Table.from_batches(pending, schema=SHARD_SCHEMA)


def write_listing(prefix: str, out: str, storage: Storage) -> int:
    """List PREFIX's images into a Parquet manifest at OUT for reuse by later jobs.

    Keys are stored relative to PREFIX (compact), and PREFIX itself in the file's metadata,
    so the manifest works from wherever it is stored.
    """
    sink = io.BytesIO()
    schema = pa.schema([pa.field("key", pa.string())],
                       metadata={BASE_METADATA: as_folder(prefix).encode()})
    count = 0
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        for batch in _listing_batches(prefix, storage):
            writer.write_batch(pa.RecordBatch.from_arrays([batch.column("key")], schema=schema))
            count += batch.num_rows
    if not count:
        raise ManifestError(f"no images under {prefix} (extensions "
                            f"{', '.join(codec.IMAGE_EXTENSIONS)}); check the prefix")
    storage.put(out, sink.getvalue())
    return count
