"""Manifests in, validated shard rows out: streaming, never a 10M-row list of Python objects.

A job's source is either a manifest object or a prefix/folder that is listed:

- ``*.parquet``: column ``key`` (or ``uri``), optional ``output_key`` and ``reference``;
- ``*.csv``: the same columns, with a header row;
- ``*.jsonl`` / ``*.ndjson``: one object per line with the same fields;
- ``*.txt``: one key per line. Lines end at ``\n`` (a ``\r`` before it is dropped) and nowhere
  else: Unicode line separators (U+2028, U+0085, …) are part of a key. A key keeps its
  surrounding spaces as written (nothing is stripped); only empty lines and lines starting
  with ``#`` are skipped;
- anything else is a prefix: its image objects (by extension) are listed, page by page;
- a glob over one folder's files of one of these formats (``s3://b/inventory/*.parquet``): one
  manifest, its files read in name order.

Keys in a manifest are full URIs (``s3://…``, ``file://…``, absolute paths) or relative to the
manifest's folder. Each row's *relative key* (relative to the source prefix, or the key within
its bucket for a URI elsewhere) is joined under the destination to form the output key.

Keys from a *listing* (a listed prefix, or a Parquet listing written by ``deblur manifest``,
which records its prefix) are literal keys in the listed bucket/folder, always: a key such as
``/etc/x.png``, ``file:///x.png`` or ``s3://other/x.png`` under ``s3://src/in/`` names the object
``s3://src/in//etc/x.png`` (and so on), never another file or bucket. Only manifest entries may
be URIs or absolute paths, and those must lie under an allowed prefix (``allow_prefixes``;
default: the manifest's own bucket (S3) or folder (local), SOURCE and DESTINATION), compared
on normalised URIs (``..`` resolved, ``//`` collapsed, ``file://`` equal to a plain path), or
the row fails as ``outside_source``. A manifest whose rows all lie outside (all of its first
OUTSIDE_CHECK_ROWS) is a misconfiguration, not a few stray rows: planning refuses it
(``ManifestError``), naming the prefix the rows share and ``--allow-prefix``.

Local listings: a symbolic link that dangles or loops is a failed row (``broken_link``); one
that resolves outside the source folder is a failed row (``outside_source``) unless
``follow_links``. A row whose output is its own input (DEST == SRC, or an ``output_key`` naming
the input) fails as ``would_overwrite_input`` unless ``overwrite_inputs``. A folder job whose
destination lies inside its source is refused (``ConfigError``) before anything is written.

Manifest-level problems raise ``ManifestError`` at once, naming the file and the fix. Row-level
problems never stop the job and are never dropped: the row is planned with an ``error`` of the
form ``reason: message`` and its result row records that failure. Rows are checked for NUL
bytes, keys over 1024 bytes, keys escaping the output prefix (``..``, absolute), duplicates, and
output keys two inputs would share (``a//b`` and ``a/b`` included).

Memory is flat in the number of rows: a manifest streams (``dataset``: ranged GETs, Parquet by
row group; ``…/*.parquet`` reads a folder of files as one manifest), plain keys are planned a
column at a time, and duplicates and collisions are found in two passes over a local spool with
a fixed amount of memory (``dedup``), each confirmed on the keys, never on a digest alone.
A listed S3 prefix fans out over its folders (``deblur.io.listing``).
"""

from __future__ import annotations

import io
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deblur.io import codec
from deblur.config import CodecConfig, JobConfig
from deblur.errors import ConfigError, ManifestError, StorageError, one_line
from deblur.io.listing import list_fanned
from deblur.io.storage import Storage, as_folder, is_s3, join, parse_s3, to_local_path
from deblur.job.dedup import DigestIndex, KeyReader, Spool, digest64, find_duplicates
from deblur.job.dataset import RangedFile, dataset_files, is_dataset, open_file, text_lines

MAX_KEY_BYTES = 1024  # S3's limit on a key
OUTSIDE_CHECK_ROWS = 1000
"""A manifest whose first this-many rows (or all, if fewer) lie outside the allowed prefixes is
refused at planning: enough rows to tell a wrong setting from a few hostile entries, few enough
that planning 100 M rows stops within its first batch."""
BATCH_ROWS = 65_536
PARSE_BLOCK_BYTES = 1 << 22  # CSV/JSONL parsed this much at a time (pyarrow's block)
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


def _read_source(source: str, storage: Storage, files: list[str] | None = None
                 ) -> tuple[str, Iterator[pa.RecordBatch], bool]:
    """(base prefix for relative keys, stream of batches with a ``key`` column and extras).

    The base is the manifest's folder, or the prefix a ``deblur manifest`` listing recorded in
    its Parquet metadata (``deblur.base``), so a listing stored elsewhere still maps keys
    relative to the listed prefix. The flag says the keys are literal (a listing's).

    A manifest is read as a stream (``dataset.RangedFile``: ranged GETs, Parquet by row
    group), never whole; a dataset source (``…/*.parquet``) is its files in name order.
    """
    if not is_manifest(source):
        return as_folder(source), _listing_batches(source, storage), True
    files = files or source_files(source, storage)
    first = open_file(storage, files[0])
    base = source_prefix(source)
    recorded = _recorded_base(files[0], first)
    if recorded is not None:
        base = as_folder(recorded)
    # Written by write_listing: its keys are listed keys, relative to the listed prefix.
    return base, _files_batches(source, files, first, recorded, storage), recorded is not None


def source_files(source: str, storage: Storage) -> list[str]:
    """The manifest files a manifest source names: itself, or a dataset's files."""
    return dataset_files(source, storage) if is_dataset(source) else [source]


def _recorded_base(uri: str, stream: RangedFile) -> str | None:
    """The prefix a ``deblur manifest`` listing recorded (Parquet metadata), or None."""
    if not uri.lower().endswith(".parquet"):
        return None
    try:
        schema = pq.ParquetFile(stream).schema_arrow
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"manifest {uri} is not a readable Parquet file: "
                            f"{one_line(exc)}") from None
    finally:
        stream.seek(0)
    recorded = (schema.metadata or {}).get(BASE_METADATA)
    return recorded.decode() if recorded else None


def _files_batches(source: str, files: list[str], first: RangedFile, recorded: str | None,
                   storage: Storage) -> Iterator[pa.RecordBatch]:
    for uri in files:
        stream = first if uri == files[0] else open_file(storage, uri)
        if uri != files[0] and _recorded_base(uri, stream) != recorded:
            raise ManifestError(f"manifest files of {source} disagree: {uri} records listed "
                                f"prefix {_recorded_base(uri, stream)!r}, {files[0]} "
                                f"{recorded!r}; one dataset holds one listing")
        yield from _parse(uri, stream)


def _parse(source: str, stream: RangedFile) -> Iterator[pa.RecordBatch]:
    lower = source.lower()
    try:
        if lower.endswith(".parquet"):
            batches = _parquet_batches(stream, source)
        elif lower.endswith(".csv"):
            batches = _csv_batches(stream)
        elif lower.endswith((".jsonl", ".ndjson")):
            batches = _json_batches(stream)
        else:
            batches = _text_batches(stream)
        yield from (_normalise(b, source) for b in batches)
    except ManifestError:
        raise
    except StorageError as exc:  # a ranged GET failed after the store's retries
        raise ManifestError(f"cannot read manifest {source}: {exc}; check the path and "
                            f"permissions") from None
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError, OSError) as exc:
        raise ManifestError(f"manifest {source} cannot be parsed: {one_line(exc)}; write it "
                            f"as Parquet/CSV/JSONL with a 'key' column, or text with one key "
                            f"per line") from None


def _parquet_batches(stream: RangedFile, source: str) -> Iterator[pa.RecordBatch]:
    try:
        reader = pq.ParquetFile(stream, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"manifest {source} is not a readable Parquet file: "
                            f"{one_line(exc)}") from None
    names = reader.schema_arrow.names
    wanted = [n for n in ("key", "uri", "output_key", "reference", "scene") if n in names]
    if not {"key", "uri"} & set(wanted):
        raise ManifestError(_no_key_column(source, names))
    # One row group at a time (asked for one by one: a reader given them all may fetch them
    # in one range): memory is a row group, not the file.
    for group in range(reader.num_row_groups):
        yield from reader.iter_batches(batch_size=BATCH_ROWS, row_groups=[group],
                                       columns=wanted, use_threads=False)


def _csv_batches(stream: RangedFile) -> Iterator[pa.RecordBatch]:
    import pyarrow.csv as pcsv

    reader = pcsv.open_csv(
        stream,
        read_options=pcsv.ReadOptions(block_size=PARSE_BLOCK_BYTES, use_threads=False),
        convert_options=pcsv.ConvertOptions(
            column_types={c: pa.string()
                          for c in ("key", "uri", "output_key", "reference", "scene")},
            strings_can_be_null=False))
    yield from reader


def _json_batches(stream: RangedFile) -> Iterator[pa.RecordBatch]:
    import pyarrow.json as pjson

    schema = pa.schema([(c, pa.string())
                        for c in ("key", "uri", "output_key", "reference", "scene")])
    reader = pjson.open_json(
        stream, read_options=pjson.ReadOptions(block_size=PARSE_BLOCK_BYTES,
                                               use_threads=False),
        parse_options=pjson.ParseOptions(explicit_schema=schema,
                                         unexpected_field_behavior="ignore"))
    yield from reader


def _text_batches(stream: RangedFile) -> Iterator[pa.RecordBatch]:
    for lines in text_lines(stream, BATCH_ROWS):
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
    for extra in ("output_key", "reference", "scene"):  # scene: scene jobs' grouping
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
        for info in list_fanned(storage, prefix, codec.IMAGE_EXTENSIONS,
                                storage.config.list_concurrency):
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
    """SOURCE and DESTINATION as given, and for a manifest its own bucket (S3: an inventory
    manifest usually sits in one folder of the bucket whose images it names) or its own folder
    (local: the files beside it and below)."""
    allowed = [source, destination]
    if is_manifest(source):
        allowed.append(f"s3://{parse_s3(source)[0]}/" if is_s3(source)
                       else source_prefix(source))
    return tuple(allowed)


def _shared_folder(folder: str | None, uri: str) -> str:
    """The longest folder (ending in ``/``) holding both ``folder`` and ``uri``."""
    if folder is None:
        return uri.rsplit("/", 1)[0] + "/"
    common = os.path.commonprefix([folder, uri])
    return common[:common.rfind("/") + 1]


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


SPOOL_SCHEMA = pa.schema(list(SHARD_SCHEMA) + [
    pa.field("orig", pa.string()),  # the manifest's key, for rows that reach the duplicate check
    pa.field("out_rel", pa.string()),  # the output key, for rows that reach the collision check
])
"""A planned row before duplicates are known (``RowPlanner.provisional``), on local disk."""

# A key the vectorised path plans: no control character, backslash or '%' (file:// unquotes),
# no '//', not absolute, no '.' or '..' component, not a folder. Anything else takes the
# row-by-row path, which says what is wrong with it.
_UNSAFE = r"[\x00-\x1f\\%]|//|^/|/$|(^|/)\.\.?(/|$)"
_RESERVED = r"^_deblur(/|$)"  # JOB_AREA as the first component of an output key


class RowPlanner:
    """Turns manifest batches into shard rows in two steps: ``provisional`` gives every row
    its verdict except duplicates and output collisions, and the rows that reach those checks
    their digests; ``finish`` applies the duplicates ``dedup.find_duplicates`` confirmed.

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
        vectorised: plan plain keys column by column (pyarrow.compute); False plans every
            row in Python (the reference the vectorised path is tested against).
    """

    def __init__(self, base: str, destination: str, codec_config: CodecConfig, *,
                 literal: bool = False, allowed: tuple[str, ...] | None = None,
                 overwrite_inputs: bool | None = None, job_root: str | None = None,
                 vectorised: bool = True) -> None:
        self.base = as_folder(base)
        self.destination = as_folder(destination)
        self.codec = codec_config
        self.literal = literal
        self.allowed = allowed
        self.allowed_norm = tuple(normalise_uri(p) for p in allowed or ())
        self.overwrite_inputs = overwrite_inputs
        self.job_root = as_folder(job_root) if job_root else None
        self.counts = PlanCounts()
        self.duplicates = 0
        """Rows found to repeat an earlier input or output (after ``finish``)."""
        self.spilled = 0
        """Digests that went to local disk (0: the job fitted the in-memory buffers)."""
        self.spool_bytes = 0
        """Size of the provisional rows on local disk (``_planned``)."""
        self.source_files = 0
        """Manifest files read (0 for a listing)."""
        self.dest_key_len = len(parse_s3(self.destination)[1].encode()) if is_s3(
            self.destination) else 0
        self.first_row: int | None = None
        """The row id this planner started at (a parallel task's file starts further on)."""
        self.outside = 0
        """Of the manifest's first OUTSIDE_CHECK_ROWS rows, those outside the allowed prefixes."""
        self.outside_folder: str | None = None
        """The longest folder those rows share (normalised)."""
        # What the vectorised path prepends; each equals what the row-by-row path computes
        # for a plain key (``_UNSAFE``), since normalising a prefix and a plain relative key
        # is normalising the prefix and appending the key.
        self._in_prefix = ((self.base if is_s3(self.base) else to_local_path(self.base))
                           if literal else self.base.rstrip("/") + "/")
        self._in_norm = normalise_uri(self._in_prefix).rstrip("/") + "/"
        self._out_prefix = self.destination.rstrip("/") + "/"
        dest_norm = normalise_uri(self.destination)
        self._out_norm = dest_norm.rstrip("/") + "/"
        self._root_norm = normalise_uri(self.job_root) if self.job_root else None
        # Every output inside the job root: let each row say so.
        self.vectorised = vectorised and not (
            self._root_norm is not None and within(dest_norm, self._root_norm))

    # -- step 1: every verdict but duplicates ---------------------------------------------

    def provisional(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """SPOOL_SCHEMA rows for a manifest batch; row ids continue from the last batch."""
        n = batch.num_rows
        first = self.counts.rows
        if self.first_row is None:
            self.first_row = first
        self.counts.rows += n
        names = batch.schema.names
        keys = batch.column("key")
        outs = batch.column("output_key") if "output_key" in names else None
        pre = batch.column("error") if "error" in names else None
        if self.vectorised and n:
            plain, out_rel = self._plain(keys, outs, pre)
        else:
            plain, out_rel = np.zeros(n, bool), pa.nulls(n, pa.string())
        columns = {
            "key": pc.binary_join_element_wise(self._in_prefix, keys, ""),
            "output_key": pc.binary_join_element_wise(self._out_prefix, out_rel, ""),
            "error": pa.nulls(n, pa.string()),
            "orig": keys,
            "out_rel": out_rel,
        }
        slow = np.flatnonzero(~plain)
        if len(slow):
            key_list = keys.take(slow).to_pylist()
            out_list = outs.take(slow).to_pylist() if outs is not None else [None] * len(slow)
            pre_list = pre.take(slow).to_pylist() if pre is not None else [None] * len(slow)
            rows = [self._slow(k, o, e) for k, o, e in zip(key_list, out_list, pre_list)]
            mask = pa.array(~plain)
            for i, name in enumerate(("key", "output_key", "error", "orig", "out_rel")):
                values = pa.array([r[i] for r in rows], pa.string())
                if len(slow) == n:
                    columns[name] = values
                else:
                    columns[name] = pc.replace_with_mask(columns[name].cast(pa.string()), mask,
                                                         values)
            for i, row in zip(slow, rows):
                if row[2]:
                    reason = row[2].split(":", 1)[0]
                    self.counts.invalid[reason] = self.counts.invalid.get(reason, 0) + 1
                    if reason == "outside_source" and first + i < OUTSIDE_CHECK_ROWS:
                        self.outside += 1
                        self.outside_folder = _shared_folder(self.outside_folder,
                                                             normalise_uri(row[0]))
        if first < OUTSIDE_CHECK_ROWS <= self.counts.rows:
            self.check_outside()
        references = pa.nulls(n, pa.string())
        if "reference" in names and batch.column("reference").null_count < n:
            references = pa.array([_relative(r, self.base)[0] if r else None
                                   for r in batch.column("reference").to_pylist()],
                                  pa.string())
        return pa.RecordBatch.from_arrays(
            [pa.array(np.arange(first, first + n, dtype=np.int64)), columns["key"],
             columns["output_key"], references, columns["error"], columns["orig"],
             columns["out_rel"]], schema=SPOOL_SCHEMA)

    def _plain(self, keys: pa.Array, outs: pa.Array | None, pre: pa.Array | None
               ) -> tuple[np.ndarray, pa.Array]:
        """Which rows the vectorised path plans (valid keys whose output is theirs), and the
        output keys relative to the destination (meaningful where plain)."""
        keys = keys.cast(pa.string())
        ok = pc.and_(pc.invert(pc.match_substring_regex(keys, _UNSAFE)),
                     pc.match_substring_regex(keys, "[A-Za-z0-9]"))  # not blank
        ok = pc.and_(ok, pc.less_equal(pc.binary_length(keys), MAX_KEY_BYTES))
        if outs is not None:
            ok = pc.and_(ok, pc.is_null(outs))
        if pre is not None:
            ok = pc.and_(ok, pc.is_null(pre))
        ok = pc.fill_null(ok, False)
        if self.codec.output_format == "same":
            out_rel = keys
        else:
            out_rel = pa.array([codec.output_key(k, self.codec) if k else k
                                for k in keys.to_pylist()], pa.string())
            ok = pc.and_(ok, pc.invert(pc.fill_null(
                pc.match_substring_regex(out_rel, _UNSAFE), True)))
        ok = pc.and_(ok, pc.less_equal(pc.binary_length(out_rel),
                                       MAX_KEY_BYTES - self.dest_key_len))
        ok = pc.and_(ok, pc.invert(pc.match_substring_regex(out_rel, _RESERVED)))
        out_norm = pc.binary_join_element_wise(self._out_norm, out_rel, "")
        if self._root_norm is not None:
            inside = pc.or_(pc.equal(out_norm, self._root_norm),
                            pc.starts_with(out_norm, self._root_norm.rstrip("/") + "/"))
            ok = pc.and_(ok, pc.invert(inside))
        if self.overwrite_inputs is False:
            in_norm = pc.binary_join_element_wise(self._in_norm, keys, "")
            ok = pc.and_(ok, pc.not_equal(in_norm, out_norm))
        return pc.fill_null(ok, False).to_numpy(zero_copy_only=False), out_rel

    def _slow(self, key: str | None, output: str | None, pre_error: str | None
              ) -> tuple[str, str, str | None, str | None, str | None]:
        """(input URI, output URI, error, key if it reached the duplicate check, output key
        if it reached the collision check), row by row, in the order of the checks."""
        if key is None or not key.strip():
            return "", "", "invalid_key: empty key in the manifest", None, None
        shown = repr(key[:200])
        if "\x00" in key:
            return (key.replace("\x00", "\\0"), "", f"invalid_key: {shown} contains a NUL "
                                                    f"byte", None, None)
        if self.literal:  # a listed key: the object under the listed prefix, never a URI
            uri = (self.base if is_s3(self.base) else to_local_path(self.base)) + key
            rel = key
        else:
            try:
                uri, rel = _relative(key, self.base)
            except StorageError:  # "s3://" or "s3:///x": a URI that names no bucket
                return key, "", f"invalid_key: {shown} names no bucket", None, None
        if pre_error:
            return uri, "", pre_error, None, None
        if self.allowed is not None and not self.literal and _is_absolute(key):
            norm = normalise_uri(uri)
            if not any(within(norm, p) for p in self.allowed_norm):
                return uri, "", (f"outside_source: {shown} is outside the allowed prefixes "
                                 f"{', '.join(self.allowed)}; not read. Add --allow-prefix "
                                 f"PREFIX to read entries there"), None, None
        problem = _check_relative(rel)
        if problem:
            return (uri, "", f"{problem.split(': ', 1)[0]}: {shown} "
                             f"{problem.split(': ', 1)[1]}", None, None)
        # Here the row reaches the duplicate check (``finish`` applies it).
        if output:
            problem = _check_relative(output)
            if problem:
                return uri, "", (f"{problem.split(': ', 1)[0]}: output_key {output[:200]!r} "
                                 f"{problem.split(': ', 1)[1]}"), key, None
            out_rel = output
        else:
            out_rel = codec.output_key(rel, self.codec)
        out_rel = normalise_output(out_rel)
        if self.dest_key_len + len(out_rel.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
            return uri, "", (f"invalid_key: {shown}: its output key under {self.destination} "
                             f"would exceed S3's {MAX_KEY_BYTES}-byte limit"), key, None
        # Here the row reaches the collision check (``finish`` applies it): a row failed
        # below still holds its output against later rows, as it always did.
        out_uri = join(self.destination, out_rel)
        reserved = self._in_job_root(out_rel, out_uri)
        if reserved:
            return uri, "", (f"reserved_output: {shown}: its output {out_uri} lies inside the "
                             f"job root {reserved}, which only the ledger writes; choose "
                             f"another output_key"), key, out_rel
        if self.overwrite_inputs is False and overwrites_input(uri, out_uri):
            return uri, "", would_overwrite(uri, out_uri), key, out_rel
        return uri, out_uri, None, key, out_rel

    def check_outside(self, total: int | None = None) -> None:
        """Refuse a manifest whose first OUTSIDE_CHECK_ROWS rows (or all, if fewer) all lie
        outside the allowed prefixes: a missing ``--allow-prefix``, not hostile entries. Only
        the planner that read from the manifest's first row can tell (``first_row``).
        ``total``: the manifest's rows once known (its end read, or its footers)."""
        checked = min(self.counts.rows, OUTSIDE_CHECK_ROWS)
        if self.first_row != 0 or not checked or self.outside < checked:
            return
        folder = self.outside_folder or ""
        rows = (f"all {total:,} rows" if total == checked else f"the first {checked:,} rows")
        if folder in ("", "s3://", "/"):  # no bucket or folder in common
            where = "share no bucket or folder"
            fix = "pass --allow-prefix once for each bucket or folder they name"
        else:
            where = f"all lie under {folder}"
            fix = f"pass --allow-prefix {folder} to read them"
        raise ManifestError(
            f"{rows} of the manifest name objects outside the allowed prefixes "
            f"({', '.join(self.allowed or ())}): they {where}. Nothing was planned; {fix} "
            f"(repeatable; it replaces the default prefixes)")

    def index(self, batch: pa.RecordBatch, inputs: DigestIndex, outputs: DigestIndex) -> None:
        """Record the digests of a provisional batch's inputs and outputs that are checked."""
        ids = batch.column("row_id").to_numpy()
        for column, target in (("orig", inputs), ("out_rel", outputs)):
            checked = batch.column(column).is_valid()
            keys = batch.column("key" if column == "orig" else column)
            if checked.false_count:
                target.add(digest64(keys.filter(checked)),
                           ids[checked.to_numpy(zero_copy_only=False)])
            else:
                target.add(digest64(keys), ids)

    # -- step 2: duplicates and collisions --------------------------------------------------

    def finish(self, batch: pa.RecordBatch, duplicates: np.ndarray, collisions: np.ndarray
               ) -> pa.RecordBatch:
        """The shard rows of a provisional batch, with the confirmed duplicates (sorted row
        ids repeating an earlier input) and collisions (repeating an earlier output)."""
        n = batch.num_rows
        errors_col, outputs_col = batch.column("error"), batch.column("output_key")
        if n:
            lo = batch.column("row_id")[0].as_py()
            dup = duplicates[slice(*np.searchsorted(duplicates, [lo, lo + n]))] - lo
            col = collisions[slice(*np.searchsorted(collisions, [lo, lo + n]))] - lo
            if len(dup) or len(col):
                errors, outputs = errors_col.to_pylist(), outputs_col.to_pylist()
                for i in dup:
                    shown = repr(batch.column("orig")[int(i)].as_py()[:200])
                    self._verdict(errors, outputs, int(i),
                                  f"duplicate_key: {shown} appears earlier in the manifest")
                for i in col:
                    shown = repr(batch.column("orig")[int(i)].as_py()[:200])
                    out_rel = batch.column("out_rel")[int(i)].as_py()
                    self._verdict(errors, outputs, int(i),
                                  f"output_collision: {shown} maps to output {out_rel!r}, "
                                  f"which an earlier row already writes")
                errors_col = pa.array(errors, pa.string())
                outputs_col = pa.array(outputs, pa.string())
        return pa.RecordBatch.from_arrays(
            [batch.column("row_id"), batch.column("key"), outputs_col,
             batch.column("reference"), errors_col], schema=SHARD_SCHEMA)

    def _verdict(self, errors: list[str | None], outputs: list[str], i: int, error: str
                 ) -> None:
        old = errors[i]
        if old:
            reason = old.split(":", 1)[0]
            self.counts.invalid[reason] -= 1
            if not self.counts.invalid[reason]:
                del self.counts.invalid[reason]
        reason = error.split(":", 1)[0]
        self.counts.invalid[reason] = self.counts.invalid.get(reason, 0) + 1
        errors[i], outputs[i] = error, ""
        self.duplicates += 1

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
    follow = job.follow_links if job is not None else None
    files: list[str] = []
    if is_manifest(source):
        files = source_files(source, storage)
        base, batches, literal = _read_source(source, storage, files)
    else:
        base, literal = as_folder(source), True
        skip = None
        if normalise_uri(source) == normalise_uri(destination):
            skip = JOB_AREA  # in place: never list the job area (default job roots)
        batches = _listing_batches(source, storage, skip, follow)
    planner = RowPlanner(base, destination, codec_config, literal=literal,
                         **planner_options(source, destination, job))
    planner.source_files = len(files)
    return _planned(batches, planner), planner


def planner_options(source: str, destination: str, job: JobConfig | None
                    ) -> dict[str, Any]:
    """The job's settings a RowPlanner checks rows against (see ``plan_rows``)."""
    return {"allowed": (job.allow_prefixes if job is not None and job.allow_prefixes
                        else default_allowed_prefixes(source, destination)),
            "overwrite_inputs": job.overwrite_inputs if job is not None else None,
            "job_root": job.job_root if job is not None else None}


def _planned(batches: Iterator[pa.RecordBatch], planner: RowPlanner,
             folder: str | None = None) -> Iterator[pa.RecordBatch]:
    """Two passes in bounded memory: every row's provisional verdict to a spool on local
    disk (and the digests to ``dedup.DigestIndex``), then duplicates and collisions found
    and confirmed on the keys, then the spool read back with them applied.

    Nothing comes out before the source has been read to its end (a duplicate may be the
    last row); local disk holds ~the spool (lz4 Arrow) and 32 bytes a row meanwhile.
    ``folder``: where that goes (default: the system temporary folder, ``TMPDIR``).
    """
    with tempfile.TemporaryDirectory(prefix="deblur-plan-", dir=folder) as work:
        spool = Spool(work)
        inputs, outputs = DigestIndex(work, "inputs"), DigestIndex(work, "outputs")
        try:
            for batch in batches:
                provisional = planner.provisional(batch)
                spool.write(provisional)
                planner.index(provisional, inputs, outputs)
        finally:
            spool.close()
        planner.check_outside(planner.counts.rows)  # one shorter than OUTSIDE_CHECK_ROWS
        planner.spilled = inputs.spilled + outputs.spilled
        planner.spool_bytes = os.path.getsize(spool.path) if os.path.exists(spool.path) else 0
        duplicates = find_duplicates(inputs, KeyReader(spool, "key"))
        # A duplicate input does not compete for its output (it is never written).
        collisions = find_duplicates(outputs, KeyReader(spool, "out_rel"), exclude=duplicates)
        del inputs, outputs
        for provisional in spool.batches():
            yield planner.finish(provisional, duplicates, collisions)


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


LISTING_PART_ROWS = 5_000_000  # keys per file when a listing is written as a dataset


def write_listing(prefix: str, out: str, storage: Storage) -> int:
    """List PREFIX's images into a Parquet manifest at OUT for reuse by later jobs.

    Keys are stored relative to PREFIX (compact), and PREFIX itself in the file's metadata,
    so the manifest works from wherever it is stored. The listing fans out over PREFIX's
    folders (``storage.list_concurrency``). OUT may be a dataset (``…/part-*.parquet``): the
    listing is then written as files of LISTING_PART_ROWS keys each (``*`` becomes 00000,
    00001, …), so no more than one file is ever held in memory; a job reads them back as one
    manifest, in the same order.
    """
    schema = pa.schema([pa.field("key", pa.string())],
                       metadata={BASE_METADATA: as_folder(prefix).encode()})
    names = _part_names(out, storage) if is_dataset(out) else None
    count = part = 0
    sink, writer = io.BytesIO(), None

    def flush() -> None:
        nonlocal sink, writer, part
        assert writer is not None
        writer.close()
        storage.put(names(part) if names else out, sink.getvalue())
        sink, writer, part = io.BytesIO(), None, part + 1

    for batch in _listing_batches(prefix, storage):
        keys = batch.column("key")
        while len(keys):
            if writer is None:
                writer = pq.ParquetWriter(sink, schema, compression="zstd")
            room = LISTING_PART_ROWS - count % LISTING_PART_ROWS if names else len(keys)
            writer.write_batch(pa.RecordBatch.from_arrays([keys.slice(0, room)],
                                                          schema=schema))
            count += min(room, len(keys))
            keys = keys.slice(room)
            if names and count % LISTING_PART_ROWS == 0:
                flush()
    if not count:
        raise ManifestError(f"no images under {prefix} (extensions "
                            f"{', '.join(codec.IMAGE_EXTENSIONS)}); check the prefix")
    if writer is not None:
        flush()
    return count


def _part_names(out: str, storage: Storage) -> Callable[[int], str]:
    """How the files of a listing written as a dataset are named; refuses a pattern other
    than one ``*``, and a folder that already holds matching files (they would be read as
    part of this listing)."""
    folder, _, pattern = out.rpartition("/")
    if pattern.count("*") != 1 or any(ch in pattern for ch in "?["):
        raise ManifestError(f"{out}: write a listing dataset as FOLDER/NAME-*.parquet (one "
                            f"'*', which becomes the part number)")
    try:
        existing = dataset_files(out, storage)
    except ManifestError:
        existing = []
    if existing:
        raise ManifestError(f"{out}: {len(existing)} files already match, e.g. "
                            f"{existing[0]}; they would be read with this listing. Choose "
                            f"an empty folder or another pattern")
    head, tail = pattern.split("*")
    return lambda part: f"{folder}/{head}{part:05d}{tail}"
