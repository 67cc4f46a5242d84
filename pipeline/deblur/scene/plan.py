"""Scene jobs' shards: one scene, one shard.

A scene job's source is a folder (prefix) of scene folders, or a manifest beside them: a
view's scene is the first folder of its key under the source's base (``SRC/<scene>/…``).
The planner's rows (validated, deduplicated, output keys mapped: ``job/manifest.py``) are
grouped by scene instead of cut every ``shard_size`` rows, so a scene is fitted by one actor,
committed at once and rerun as a whole.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from deblur.job.manifest import SHARD_SCHEMA


def scene_of(key: str, base: str) -> str:
    """The scene folder of a view ``key`` under the source's ``base`` folder (with a slash)."""
    rel = key[len(base):] if key.startswith(base) else key
    head, sep, _ = rel.partition("/")
    return base + head + "/" if sep else base


def iter_scene_shards(batches: Iterator[pa.RecordBatch], base: str) -> Iterator[pa.Table]:
    """The planned rows as one table per scene, scenes in order of first appearance."""
    scenes: dict[str, list[dict]] = {}
    for batch in batches:
        for row in batch.to_pylist():
            scenes.setdefault(scene_of(row["key"], base), []).append(row)
    for rows in scenes.values():
        yield pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
