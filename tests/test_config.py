"""Job configuration: YAML + flags, strict validation with messages that say what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from deblur import config
from deblur.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["default.yaml", "gpu-cluster.yaml"])
def test_shipped_configs_load(name: str) -> None:
    job = config.load(ROOT / "configs" / name, {"model.random_weights": True})
    assert job.shard_size == 1000


def test_flags_override_the_file_and_none_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("shard_size: 10\nbatch:\n  max_batch: 4\n")
    job = config.load(path, {"batch.max_batch": 8, "shard_size": None,
                             "model.random_weights": True})
    assert (job.shard_size, job.batch.max_batch) == (10, 8)


def test_round_trip_through_a_dict() -> None:
    job = config.load(None, {"model.random_weights": True, "worker.gpus_per_worker": 0.25})
    assert config.from_dict(job.to_dict()) == job


@pytest.mark.parametrize(("overrides", "message"), [
    ({"shard_size": 0}, "shard_size=0"),
    ({"model.precision": "fp8"}, "model.precision='fp8'"),
    ({"codec.output_format": "gif"}, "codec.output_format='gif'"),
    ({"codec.quality": 101}, "codec.quality=101"),
    ({"batch.bucket_multiple": 6}, "multiple of 4"),
    ({"scheduler.min_workers": 3, "scheduler.max_workers": 2}, "exceeds"),
    ({"storage.retry_mode": "yolo"}, "storage.retry_mode"),
])
def test_bad_values_name_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config.load(None, {"model.random_weights": True, **overrides})


def test_unknown_keys_and_wrong_types_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("batch:\n  max_bach: 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'batch.max_bach'"):
        config.load(path, {"model.random_weights": True})
    path.write_text("batch:\n  max_batch: lots\n")
    with pytest.raises(ConfigError, match="batch.max_batch='lots': expected int"):
        config.load(path, {"model.random_weights": True})


def test_unreadable_or_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
