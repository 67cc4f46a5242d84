"""Scene jobs' shards: one scene, one shard.

A scene job's source is a folder (prefix) of scene folders, or a manifest: a view's scene is
the manifest's ``scene`` column where it has one, else the first folder of its key under the
source's base (``SRC/<scene>/…``).
The planner's rows (validated, deduplicated, output keys mapped: ``job/manifest.py``) are
grouped by scene instead of cut every ``shard_size`` rows, so a scene is fitted by one actor,
committed at once and rerun as a whole.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from deblur.io.storage import Storage
from deblur.job.manifest import SHARD_SCHEMA, is_manifest, read_batches


def scene_of(key: str, base: str) -> str:
    """The scene folder of a view ``key`` under the source's ``base`` folder (with a slash)."""
    rel = key[len(base):] if key.startswith(base) else key
    head, sep, _ = rel.partition("/")
    return base + head + "/" if sep else base


def manifest_scenes(source: str, storage: Storage) -> list[str | None] | None:
    """A manifest's ``scene`` column in row order (a planned row's ``row_id`` indexes it);
    None for a listing or a manifest without one. A second read of the manifest: scene jobs'
    manifests are small (views, not millions of images)."""
    if not is_manifest(source):
        return None
    column: list[str | None] = []
    found = False
    for batch in read_batches(source, storage)[1]:
        if "scene" in batch.schema.names:
            found = True
            column.extend(batch.column("scene").to_pylist())
        else:
            column.extend([None] * batch.num_rows)
    return column if found else None


def iter_scene_shards(batches: Iterator[pa.RecordBatch], base: str,
                      named: list[str | None] | None = None) -> Iterator[pa.Table]:
    """The planned rows as one table per scene, scenes in order of first appearance.

    ``named``: the manifest's scene column by row id (``manifest_scenes``); a row without a
    value there falls back to its first folder.
    """
    scenes: dict[str, list[dict]] = {}
    for batch in batches:
        for row in batch.to_pylist():
            label = named[row["row_id"]] if named and row["row_id"] < len(named) else None
            scene = "scene:" + label if label else scene_of(row["key"], base)
            scenes.setdefault(scene, []).append(row)
    for rows in scenes.values():
        yield pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
