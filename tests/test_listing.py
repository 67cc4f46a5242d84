"""A big S3 prefix listed folder by folder in parallel: the same objects in the same order as
one sequential listing (so the same row ids), on the real client against moto."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from deblur.config import CodecConfig, StorageConfig
from deblur.io import listing
from deblur.io.listing import list_fanned
from deblur.io.storage import Storage, join
from deblur.job.manifest import plan_rows


def _tree() -> list[str]:
    keys = ["a.jpg", "a0.jpg", "a b/x.jpg", "b.txt", "é/ü.png", "z.jpg", "folder/"]
    keys += [f"a/{i:03d}.jpg" for i in range(60)]  # beside a.jpg and a0.jpg: order matters
    keys += [f"a/sub/{i}.png" for i in range(8)]
    keys += [f"flat/{i:04d}.jpg" for i in range(70)]  # a folder too big to discover into
    keys += [f"deep/{d}/{e}/{i}.jpg" for d in "pq" for e in "rs" for i in range(12)]
    keys += [f"m{j:02d}/{i}.webp" for j in range(30) for i in range(3)]
    return keys


@pytest.fixture(scope="module")
def tree(moto_server: str) -> Iterator[str]:
    storage = Storage()
    bucket = "listing-tree"
    storage.client.create_bucket(Bucket=bucket)
    prefix = f"s3://{bucket}/in/"
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: storage.put(prefix + k, b"x"), _tree()))
    storage.put(f"s3://{bucket}/in-other/a.jpg", b"x")  # a sibling prefix: never listed
    # Pages of 50 keys: the tree behaves as one 20x its size would with S3's 1000.
    saved, listing.PAGE_KEYS = listing.PAGE_KEYS, 50
    yield prefix
    listing.PAGE_KEYS = saved


def test_fanned_listing_equals_the_sequential_one(tree: str) -> None:
    storage = Storage()
    sequential = list(storage.list(tree))
    assert len(sequential) == len(_tree())
    stats: dict[str, int] = {}
    before = storage.ops["LIST"]
    fanned = list(list_fanned(storage, tree, None, 4, stats))
    assert fanned == sequential
    assert stats["folders"] >= 8  # deep/p/r … m29/, a/, flat/, listed side by side
    assert storage.ops["LIST"] - before > 3
    # 16 at once: 36 folders are too few, so discovery goes two levels deeper; a/ and flat/
    # have full first pages and are listed whole, the small folders' objects come with their
    # discovery, deep/p/r/ … deep/q/s/ are listed side by side
    deeper: dict[str, int] = {}
    assert list(list_fanned(storage, tree, None, 16, deeper)) == sequential
    assert deeper["folders"] == 6
    images = (".jpg", ".png", ".webp")
    assert (list(list_fanned(storage, tree, images, 3))
            == list(storage.list(tree, images)))


def test_a_small_prefix_costs_one_list_as_before(tree: str) -> None:
    storage = Storage()
    stats: dict[str, int] = {}
    got = list(list_fanned(storage, join(tree, "deep/p"), None, 8, stats))
    assert len(got) == 24 and stats["folders"] == 0 and storage.ops["LIST"] == 1


def test_a_consumer_that_stops_early_frees_the_threads(tree: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listing, "QUEUE_PAGES", 1)
    stream = list_fanned(Storage(), tree, None, 4)
    assert len([next(stream) for _ in range(120)]) == 120
    stream.close()  # returns once the folder threads have stopped


def test_planning_a_prefix_gives_the_same_rows_whatever_the_concurrency(tree: str) -> None:
    rows = []
    for concurrency in (1, 6):
        storage = Storage(StorageConfig(list_concurrency=concurrency))
        batches, planner = plan_rows(tree, "s3://listing-tree/out/", storage, CodecConfig())
        rows.append([r for b in batches for r in b.to_pylist()])
    assert rows[0] == rows[1] and len(rows[0]) == len(_tree()) - 2  # b.txt, folder/


def test_list_concurrency_below_one_is_refused_before_anything_starts() -> None:
    from deblur import config as config_mod
    from deblur.errors import ConfigError

    with pytest.raises(ConfigError, match="storage.list_concurrency=0: must be >= 1"):
        config_mod.load(None, {"storage.list_concurrency": 0, "model.random_weights": True})
