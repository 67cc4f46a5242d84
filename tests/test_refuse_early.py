"""Bad configuration is refused before Ray starts and before a byte goes under DEST.

Each case runs the real ``deblur`` command in a subprocess and checks the exit code (2), that
stderr is one line with no traceback, that nothing was written (a local DEST folder, or an S3
bucket on moto), and that the process never imported Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deblur import config as config_mod
from deblur.errors import ConfigError, WeightsError
from deblur.io.storage import Storage, parse_s3
from deblur.job.ledger import Ledger
from deblur.model import MODELS, create_model
from deblur.model.weights import provenance
from deblur.run.inference import tile_grid
from tests.conftest import jpeg

# Runs the CLI, then records whether Ray was imported (it is imported only to start it).
_PROBE = """
import json, sys
from deblur.cli import main
sys.argv = ["deblur", *sys.argv[2:]]
try:
    main()
finally:
    with open(PROBE, "w") as f:
        json.dump({"ray": "ray" in sys.modules}, f)
"""


def _deblur(tmp_path: Path, *args: str) -> tuple[int, list[str], bool]:
    """(exit code, non-empty stderr lines, whether Ray was imported)."""
    probe = tmp_path / "probe.json"
    code = _PROBE.replace("PROBE", repr(str(probe)))
    done = subprocess.run([sys.executable, "-c", code, "-", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return done.returncode, lines, json.loads(probe.read_text())["ray"]


def _refused(tmp_path: Path, expected: str, *args: str) -> None:
    code, lines, ray_imported = _deblur(tmp_path, *args)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not ray_imported


@pytest.fixture()
def inputs(tmp_path: Path) -> str:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg(32, 24))
    return str(src)


@pytest.fixture(scope="module")
def mimo_unet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "MIMO-UNet.pkl"
    torch.save({"model": create_model("mimo-unet").state_dict()}, path)
    return path


def _nothing_under(folder: Path) -> None:
    assert not folder.exists() or not any(folder.rglob("*")), list(folder.rglob("*"))


def test_a_text_file_as_weights(tmp_path: Path, inputs: str) -> None:
    weights = tmp_path / "weights.pth"
    weights.write_text("these are not weights\n")
    _refused(tmp_path, "not a PyTorch checkpoint or safetensors file", "run", inputs,
             str(tmp_path / "out"), "--weights", str(weights))
    _nothing_under(tmp_path / "out")


@pytest.mark.integration
def test_an_unknown_model_into_a_bucket(tmp_path: Path, inputs: str, s3_bucket: str,
                                       storage: Storage) -> None:
    _refused(tmp_path, "model.name='mimo-unet-pro': unknown model; choose one of mimo-unet,",
             "run", inputs, s3_bucket + "/out", "--model", "mimo-unet-pro", "--random-weights")
    bucket, _ = parse_s3(s3_bucket + "/x")
    assert storage.client.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_weights_of_another_model(tmp_path: Path, inputs: str, mimo_unet_weights: Path
                                  ) -> None:
    _refused(tmp_path, "do not fit model 'mimo-unet-plus'; missing keys:", "run", inputs,
             str(tmp_path / "out"), "--weights", str(mimo_unet_weights),
             "--model", "mimo-unet-plus")
    _nothing_under(tmp_path / "out")


def test_an_overlap_wider_than_half_a_tile(tmp_path: Path, inputs: str) -> None:
    _refused(tmp_path, "model.tile_overlap=32: must be under half the tile side (64",
             "run", inputs, str(tmp_path / "out"), "--random-weights", "--tile-pixels", "4096")
    _nothing_under(tmp_path / "out")


def test_submit_refuses_before_it_contacts_the_cluster(tmp_path: Path, inputs: str) -> None:
    weights = tmp_path / "weights.pkl"
    weights.write_bytes(jpeg(8, 8))
    # Nothing listens there: without the check the command would fail reaching it (exit 4).
    _refused(tmp_path, "not a PyTorch checkpoint", "submit", inputs, str(tmp_path / "out"),
             "--address", "http://127.0.0.1:9", "--weights", str(weights))


def test_rerun_refuses_weights_that_changed_or_broke(tmp_path: Path,
                                                     mimo_unet_weights: Path) -> None:
    weights = tmp_path / "MIMO-UNet.pkl"
    weights.write_bytes(mimo_unet_weights.read_bytes())
    job = config_mod.load(None, {"source": str(tmp_path / "src"),
                                 "destination": str(tmp_path / "out"),
                                 "job_root": str(tmp_path / "job"),
                                 "model.weights": str(weights)})
    Storage().put(str(tmp_path / "src" / "a.jpg"), jpeg(16, 16))
    ledger = Ledger.create(Storage(), job, job_id="w", model_info=provenance(job.model))
    before = sorted(p.name for p in (tmp_path / "job").iterdir())

    torch.save({"model": {k: v + 1 if v.is_floating_point() else v
                          for k, v in create_model("mimo-unet").state_dict().items()}}, weights)
    _refused(tmp_path, "changed since job w was planned", "rerun", ledger.job_root)
    weights.write_text("oops")
    _refused(tmp_path, "not a PyTorch checkpoint", "rerun", ledger.job_root)
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == before  # no lease, no cancel
    _nothing_under(tmp_path / "out")


# -- the checks themselves, in-process ------------------------------------------------------

def test_provenance_reads_and_loads_the_weights(mimo_unet_weights: Path) -> None:
    import hashlib

    info = provenance(config_mod.ModelConfig(weights=str(mimo_unet_weights)))
    assert info["weights_sha256"] == hashlib.sha256(mimo_unet_weights.read_bytes()).hexdigest()
    with pytest.raises(WeightsError, match="do not fit model 'mimo-unet-plusplus'"):
        provenance(config_mod.ModelConfig(name="mimo-unet-plusplus",
                                          weights=str(mimo_unet_weights)))


def test_model_names_are_the_registry() -> None:
    assert config_mod.MODEL_NAMES == tuple(MODELS)


@pytest.mark.parametrize("tile_pixels", [4096, 5000, 96 * 96, 4_000_000, 10**8 + 7])
def test_tile_side_is_the_grid_tile(tile_pixels: int) -> None:
    side = config_mod.tile_side(tile_pixels)
    assert tile_grid(8, 8, tile_pixels, 0).tile == side
    config_mod.ModelConfig(random_weights=True, tile_pixels=tile_pixels,
                           tile_overlap=(side // 2 - 1) // 4 * 4).validate()
    with pytest.raises(ConfigError, match="under half the tile side"):
        config_mod.ModelConfig(random_weights=True, tile_pixels=tile_pixels,
                               tile_overlap=(side // 2 + 3) // 4 * 4).validate()


def test_nvjpeg_on_a_cpu_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="codec.backend=nvjpeg"):
        config_mod.load(None, {"source": str(tmp_path / "s"), "destination": str(tmp_path / "d"),
                               "model.random_weights": True, "codec.backend": "nvjpeg",
                               "model.device": "cpu"})


def test_help_lists_the_models() -> None:
    from typer.testing import CliRunner

    from deblur.cli import app

    text = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "250"}).output
    assert "mimo-unet|mimo-unet-plus|mimo-unet-plusplus" in text
