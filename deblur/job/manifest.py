"""Manifests in, validated shard rows out: streaming, never a 10M-row list of Python objects.

A job's source is either a manifest object or a prefix/folder that is listed:

- ``*.parquet``: column ``key`` (or ``uri``), optional ``output_key`` and ``reference``;
- ``*.csv``: the same columns, with a header row;
- ``*.jsonl`` / ``*.ndjson``: one object per line with the same fields;
- ``*.txt``: one key per line. Lines end at ``\n`` (a ``\r`` before it is dropped) and nowhere
  else: Unicode line separators (U+2028, U+0085, …) are part of a key. A key keeps its
  surrounding spaces as written (nothing is stripped); only empty lines and lines starting
  with ``#`` are skipped;
- anything else is a prefix: its image objects (by extension) are listed, page by page.

Keys in a manifest are full URIs (``s3://…``, ``file://…``, absolute paths) or relative to the
manifest's folder. Each row's *relative key* (relative to the source prefix, or the key within
its bucket for a URI elsewhere) is joined under the destination to form the output key.

Keys from a *listing* (a listed prefix, or a Parquet listing written by ``deblur manifest``,
which records its prefix) are literal keys in the listed bucket/folder, always: a key such as
``/etc/x.png``, ``file:///x.png`` or ``s3://other/x.png`` under ``s3://src/in/`` names the object
``s3://src/in//etc/x.png`` (and so on), never another file or bucket. Only manifest entries may
be URIs or absolute paths, and those must lie under an allowed prefix (``allow_prefixes``;
default: the manifest's own folder or S3 prefix, SOURCE and DESTINATION), compared
on normalised URIs (``..`` resolved, ``//`` collapsed, ``file://`` equal to a plain path), or
the row fails as ``outside_source``.

Local listings: a symbolic link that dangles or loops is a failed row (``broken_link``); one
that resolves outside the source folder is a failed row (``outside_source``) unless
``follow_links``. A row whose output is its own input (DEST == SRC, or an ``output_key`` naming
the input) fails as ``would_overwrite_input`` unless ``overwrite_inputs``. A folder job whose
destination lies inside its source is refused (``ConfigError``) before anything is written.

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
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from deblur.io import codec
from deblur.config import CodecConfig, JobConfig
from deblur.errors import ConfigError, ManifestError, StorageError, one_line
from deblur.io.storage import Storage, as_folder, is_s3, join, parse_s3, to_local_path

MAX_KEY_BYTES = 1024  # S3's limit on a key
BATCH_ROWS = 65_536
MANIFEST_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson", ".txt")
KEY_COLUMNS = ("key", "uri")
BASE_METADATA = b"deblur.base"
JOB_AREA = "_deblur/"  # the default job root's folder under DEST (deblur.job.ledger.JOB_AREA)

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
    """(base prefix for relative keys, stream of batches); see ``_read_source``."""
    base, batches, _ = _read_source(source, storage)
    return base, batches


def _read_source(source: str, storage: Storage
                 ) -> tuple[str, Iterator[pa.RecordBatch], bool]:
    """(base prefix for relative keys, stream of batches with a ``key`` column and extras).

    The base is the manifest's folder, or the prefix a ``deblur manifest`` listing recorded in
    its Parquet metadata (``deblur.base``), so a listing stored elsewhere still maps keys
    relative to the listed prefix. The flag says the keys are literal (a listing's).
    """
    if not is_manifest(source):
        return as_folder(source), _listing_batches(source, storage), True
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
    literal = False
    if lower.endswith(".parquet"):
        try:
            reader = pq.ParquetFile(io.BytesIO(data))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ManifestError(f"manifest {source} is not a readable Parquet file: "
                                f"{one_line(exc)}") from None
        recorded = (reader.schema_arrow.metadata or {}).get(BASE_METADATA)
        base = as_folder(recorded.decode()) if recorded else base
        literal = bool(recorded)  # written by write_listing: its keys are listed keys
    return base, _parse(source, data), literal


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
    """One key per ``\n``-terminated line (``\r\n`` too), kept exactly as written: not
    ``str.splitlines`` (which also splits at U+2028, U+0085, …), and no stripping."""
    text = data.decode("utf-8")
    lines: list[str] = []
    for line in text.split("\n"):
        if line.endswith("\r"):
            line = line[:-1]
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


def _listing_batches(prefix: str, storage: Storage, skip: str | None = None,
                     follow_links: bool | None = None) -> Iterator[pa.RecordBatch]:
    """Listed keys (relative to ``prefix``, literal), with an ``error`` column for local
    symbolic links that must not be read (``local.link_problem``). ``skip``: a relative
    folder not to list; ``follow_links`` None leaves links resolving outside to the worker."""
    from deblur.io.local import link_problem

    keys: list[str] = []
    errors: list[str | None] = []
    root = None if is_s3(prefix) else to_local_path(prefix)

    def batch() -> pa.RecordBatch:
        return pa.RecordBatch.from_pydict({"key": pa.array(keys, pa.string()),
                                           "error": pa.array(errors, pa.string())})

    try:
        for info in storage.list(prefix, codec.IMAGE_EXTENSIONS):
            if skip and info.key.startswith(skip):
                continue
            error = None
            if root is not None and (info.etag is None or follow_links is not None):
                error = link_problem(info.uri, root, bool(follow_links))
            keys.append(info.key)
            errors.append(error)
            if len(keys) == BATCH_ROWS:
                yield batch()
                keys, errors = [], []
    except StorageError as exc:
        raise ManifestError(f"cannot list source {prefix}: {exc}; check the prefix and "
                            f"permissions") from None
    if keys:
        yield batch()


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


def _is_absolute(key: str) -> bool:
    """Whether a manifest entry names its object itself (a URI or an absolute path)."""
    return is_s3(key) or key.startswith("file://") or key.startswith("/")


def normalise_uri(uri: str) -> str:
    """One spelling per object, for comparing prefixes: ``..`` and ``.`` resolved, ``//``
    collapsed, ``file:///a`` == ``/a``, relative local paths made absolute, no trailing
    slash. Only for comparisons: the object read is the one the row names."""
    if is_s3(uri):
        bucket, _, key = uri[5:].partition("/")
        key = posixpath.normpath("/" + key).lstrip("/")
        return f"s3://{bucket}/{key}".rstrip("/") if key else f"s3://{bucket}"
    path = to_local_path(uri)
    if not path.startswith("/"):
        path = os.path.abspath(path)
    path = "/" + posixpath.normpath(path).lstrip("/")  # normpath keeps a leading "//"
    return path.rstrip("/") or "/"


def within(uri: str, prefix: str) -> bool:
    """Whether ``uri`` is ``prefix`` or lies under it, both normalised (``normalise_uri``)."""
    return uri == prefix or uri.startswith(prefix.rstrip("/") + "/")


def default_allowed_prefixes(source: str, destination: str) -> tuple[str, ...]:
    """SOURCE and DESTINATION as given, and for a manifest its own folder (S3 prefix or local
    folder; not its whole bucket)."""
    allowed = [source, destination]
    if is_manifest(source):
        allowed.append(source_prefix(source))
    return tuple(allowed)


def check_destination(source: str, destination: str) -> None:
    """Refuse a folder job whose destination lies inside its source (its outputs would be
    listed as inputs on the next run). DEST == SOURCE is an in-place job, checked per row."""
    if not source or not destination or is_manifest(source):
        return
    src, dest = normalise_uri(source), normalise_uri(destination)
    if dest != src and within(dest, src):
        raise ConfigError(
            f"destination {destination} is inside source {source}: its outputs would be read "
            f"back as inputs by the next listing. Choose a destination outside the source "
            f"folder (e.g. a sibling), or the source folder itself with --overwrite-inputs to "
            f"replace images in place")


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
    """Turns manifest batches into shard rows; keeps only digests between batches.

    Args:
        base: the prefix relative keys resolve against.
        destination: the output prefix.
        codec_config: output format (output key extensions).
        literal: keys come from a listing: each is a literal key under ``base``, never a URI.
        allowed: prefixes absolute/URI manifest entries must lie under; None checks nothing.
        overwrite_inputs: the job's setting; None leaves the check to the worker (which
            checks it before reading anyway). Links are checked while listing.
        job_root: this job's root; no output may fall inside it, nor inside DEST/_deblur/
            (where every default job root lives).
    """

    def __init__(self, base: str, destination: str, codec_config: CodecConfig, *,
                 literal: bool = False, allowed: tuple[str, ...] | None = None,
                 overwrite_inputs: bool | None = None, job_root: str | None = None) -> None:
        self.base = as_folder(base)
        self.destination = as_folder(destination)
        self.codec = codec_config
        self.literal = literal
        self.allowed = allowed
        self.allowed_norm = tuple(normalise_uri(p) for p in allowed or ())
        self.overwrite_inputs = overwrite_inputs
        self.job_root = as_folder(job_root) if job_root else None
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
        pre = batch.column("error").to_pylist() if "error" in batch.schema.names else None
        row_ids, inputs, outputs, errors, references = [], [], [], [], []
        for i, key in enumerate(keys):
            row_id = self.counts.rows
            self.counts.rows += 1
            uri, out_uri, error = self._row(key, outs[i] if outs else None,
                                            pre[i] if pre else None)
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

    def _row(self, key: str | None, output: str | None,
             pre_error: str | None = None) -> tuple[str, str, str | None]:
        if key is None or not key.strip():
            return "", "", "invalid_key: empty key in the manifest"
        shown = repr(key[:200])
        if "\x00" in key:
            return key.replace("\x00", "\\0"), "", f"invalid_key: {shown} contains a NUL byte"
        if self.literal:  # a listed key: the object under the listed prefix, never a URI
            uri = (self.base if is_s3(self.base) else to_local_path(self.base)) + key
            rel = key
        else:
            uri, rel = _relative(key, self.base)
        if pre_error:
            return uri, "", pre_error
        if self.allowed is not None and not self.literal and _is_absolute(key):
            norm = normalise_uri(uri)
            if not any(within(norm, p) for p in self.allowed_norm):
                return uri, "", (f"outside_source: {shown} is outside the allowed prefixes "
                                 f"{', '.join(self.allowed)}; not read. Add --allow-prefix "
                                 f"PREFIX to read entries there")
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
        out_uri = join(self.destination, out_rel)
        reserved = self._in_job_root(out_rel, out_uri)
        if reserved:
            return uri, "", (f"reserved_output: {shown}: its output {out_uri} lies inside the "
                             f"job root {reserved}, which only the ledger writes; choose "
                             f"another output_key")
        if self.overwrite_inputs is False and overwrites_input(uri, out_uri):
            return uri, "", would_overwrite(uri, out_uri)
        return uri, out_uri, None


    def _in_job_root(self, out_rel: str, out_uri: str) -> str | None:
        """The job root an output would fall in: DEST/_deblur/ (every default job root under
        DEST) or this job's own root, wherever --job-root put it."""
        if out_rel.split("/", 1)[0] + "/" == JOB_AREA:
            return join(self.destination, JOB_AREA)
        if self.job_root and within(normalise_uri(out_uri), normalise_uri(self.job_root)):
            return self.job_root
        return None


def overwrites_input(uri: str, out_uri: str) -> bool:
    """Whether a row's output object is its input object (compared normalised)."""
    return normalise_uri(uri) == normalise_uri(out_uri)


def would_overwrite(uri: str, out_uri: str) -> str:
    return (f"would_overwrite_input: {uri}: its output {out_uri} is the input itself; not "
            f"written. Choose another destination, or pass --overwrite-inputs to replace "
            f"inputs in place (originals are kept under the job root)")


def plan_rows(source: str, destination: str, storage: Storage, codec_config: CodecConfig,
              *, job: JobConfig | None = None
              ) -> tuple[Iterator[pa.RecordBatch], RowPlanner]:
    """Validated shard rows (as batches) for the whole source, and the planner's counts.

    ``job`` supplies ``allow_prefixes``, ``follow_links`` and ``overwrite_inputs``; without it
    absolute/URI manifest entries are checked against the default prefixes
    (``default_allowed_prefixes``) and the other two are left to the worker, which checks
    them before it reads.
    """
    check_destination(source, destination)
    allowed = (job.allow_prefixes if job is not None and job.allow_prefixes
               else default_allowed_prefixes(source, destination))
    follow = job.follow_links if job is not None else None
    overwrite = job.overwrite_inputs if job is not None else None
    if is_manifest(source):
        base, batches, literal = _read_source(source, storage)
    else:
        base, literal = as_folder(source), True
        skip = None
        if normalise_uri(source) == normalise_uri(destination):
            skip = JOB_AREA  # in place: never list the job area (default job roots)
        batches = _listing_batches(source, storage, skip, follow)
    planner = RowPlanner(base, destination, codec_config, literal=literal, allowed=allowed,
                         overwrite_inputs=overwrite,
                         job_root=job.job_root if job is not None else None)
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
