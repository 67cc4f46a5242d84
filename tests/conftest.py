"""Shared fixtures and helpers, each kept once here.

Fixtures: a real moto S3 server on 127.0.0.1 (HTTP, the real boto3 client), a fresh bucket, a
``root`` that is a local folder or an S3 prefix, and a fault-injecting proxy.
Helpers (plain functions, imported as ``from tests.conftest import ...``): free loopback
ports, noise images and their encoded bytes (JPEG makers), job configurations and planned
jobs, stand-in models, and a Storage that reports its reads.

Test tiers: ``scripts/test.sh --quick`` runs the tests marked none of ``QUICK_EXCLUDES``. Two
hooks here keep that tier honest as tests are added (see "test tiers" below).
"""

from __future__ import annotations

import glob
import io
import os
import shutil
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from deblur import config as config_mod
from deblur.config import StorageConfig
from deblur.io.storage import Storage, join
from tests.faultproxy import FaultProxy

if TYPE_CHECKING:
    from deblur.job.ledger import Ledger

# Dummy credentials for moto only; real ones must never reach the tests.
_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-never-shown",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


# -- test tiers ------------------------------------------------------------------------------
# The quick tier (`scripts/test.sh --quick`, `-m QUICK_MARKEXPR`) is every test that needs no
# Ray, no server and no training. Two hooks keep it so, with nobody having to remember:
# - at collection, a test that uses a fixture starting a server or Ray (directly or through
#   another fixture) is marked `integration`: SERVER_FIXTURES names them;
# - at run time, a test left unmarked that still starts Ray (in this process or in any child:
#   every Ray session lands under this run's private RAY_TMPDIR), runs one of SERVER_PROGRAMS
#   or connects to the moto server (asked for by name with `getfixturevalue`, which collection
#   cannot see) fails at teardown, naming what it used and the mark it needs.
# The second check runs in the full suite too, so CI catches a test that would rot the tier.

QUICK_EXCLUDES = ("integration", "slow", "train")
QUICK_MARKEXPR = " and ".join(f"not {mark}" for mark in QUICK_EXCLUDES)
#: Fixtures that start a server or Ray; a test module's own such fixture belongs here too.
SERVER_FIXTURES = frozenset({"moto_server", "shared_ray", "cluster", "autoscaling_cluster",
                             "head", "prometheus"})
#: Programs that are servers or external tools (installed by scripts/install_tools.sh).
SERVER_PROGRAMS = frozenset({"prometheus", "promtool", "chromium", "helm", "ray"})


class _Watch:
    """What the test now running has used (fed by the audit hook and the Ray temp dir)."""

    item: pytest.Item | None = None
    used: list[str] = []
    servers: dict[tuple[str, int], str] = {}  # address -> name, of servers this process runs
    sessions: set[str] = set()
    ray_up = False


def _ray_sessions() -> set[str]:
    return set(glob.glob(os.path.join(os.environ["RAY_TMPDIR"], "ray", "session_2*")))


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _audit(event: str, args: tuple) -> None:
    if _Watch.item is None:
        return
    if event == "subprocess.Popen":  # (executable, args, cwd, env)
        argv = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        program = os.path.basename(os.fsdecode(args[0] or argv[0]))
        if program in SERVER_PROGRAMS:
            _Watch.used.append(program)
    elif event == "socket.connect" and isinstance(args[1], tuple):  # (socket, address)
        server = _Watch.servers.get(args[1][:2])
        if server is not None:
            _Watch.used.append(server)


_OWN_RAY_TMPDIR = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    # A private Ray temp dir: new sessions in it are this run's (the check above), and Ray
    # runs of other suites on the machine stay apart. Short, under /tmp: Ray's socket paths
    # below it must stay within the 107 bytes a Unix socket name allows.
    # An xdist worker inherits its controller's dir: it takes its own, or each worker's check
    # would see the other's sessions (and stop_ray_of_this_run would stop the other's Ray).
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if "RAY_TMPDIR" not in os.environ or worker is not None:
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=f"rt-{worker or ''}", dir="/tmp")
        config.stash[_OWN_RAY_TMPDIR] = os.environ["RAY_TMPDIR"]
    if not getattr(sys, "_deblur_tier_audit", False):  # audit hooks cannot be removed: once
        sys.addaudithook(_audit)
        sys._deblur_tier_audit = True  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    own = config.stash.get(_OWN_RAY_TMPDIR, None)
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)
        os.environ.pop("RAY_TMPDIR", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    # The users of the shared Ray run one after another (from where the first one stood, in
    # their order): the shared Ray starts once, not once per stretch between other tests.
    sharing = [item for item in items if "shared_ray" in getattr(item, "fixturenames", ())]
    if sharing:
        first, shared = items.index(sharing[0]), set(sharing)
        rest = [item for item in items if item not in shared]
        items[:] = rest[:first] + sharing + rest[first:]
    if hasattr(config, "workerinput"):  # an xdist worker: its order is the run's queue
        items.sort(key=_heavy_rank)  # stable: the rest keep the order above


# -- parallel runs ---------------------------------------------------------------------------
# scripts/test.sh runs the suite on two xdist workers, a module at a time each (--dist
# loadscope: a module's fixtures start once), taking modules in collection order
# (--no-loadscope-reorder). The longest modules are queued first, so that the two workers end
# together instead of one finishing a long module alone at the end. Module totals of a serial
# run on 2 cores, longest first; a module missing here only costs time, never a result.
HEAVY_FIRST = (
    "integration/test_driver_restart.py", "test_train.py", "integration/test_scene_run.py",
    "integration/test_signals.py", "test_gpu_bench.py", "integration/test_scale.py",
    "integration/test_submit.py", "test_scene_fit.py", "test_inference.py",
    "integration/test_hangs.py", "test_job_root_safety.py",
    "integration/test_driver_lost_alert.py", "integration/test_outage.py",
    "integration/test_node_loss.py", "integration/test_autoscaling.py",
    "integration/test_storage_faults.py", "integration/test_terminal_safety.py",
    "integration/test_poison.py",
)


def _heavy_rank(item: pytest.Item) -> int:
    module = item.nodeid.split("::", 1)[0].removeprefix("tests/")
    return HEAVY_FIRST.index(module) if module in HEAVY_FIRST else len(HEAVY_FIRST)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    # Before any fixture of the test (module-scoped ones included) is set up.
    if _SharedRay.up and "shared_ray" not in getattr(item, "fixturenames", ()):
        _SharedRay.stop()  # this test may start a Ray of its own (a cluster, a `ray start`)
    if item.get_closest_marker("integration") is None:
        _Watch.item, _Watch.used = item, []
        _Watch.sessions, _Watch.ray_up = _ray_sessions(), _ray_initialized()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    if call.when != "teardown" or _Watch.item is not item:
        return
    _Watch.item = None
    used = sorted(set(_Watch.used))
    if _ray_sessions() - _Watch.sessions or (_ray_initialized() and not _Watch.ray_up):
        used.append("Ray")
    if used:
        report = outcome.get_result()
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} used {', '.join(used)} but is not marked integration, so "
            f"the quick tier (-m '{QUICK_MARKEXPR}') runs it: mark it "
            "@pytest.mark.integration (or use a fixture in SERVER_FIXTURES, tests/conftest.py)")


# -- servers and roots ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's standalone server on a free loopback port; sets the AWS_* environment so every
    boto3 client (this process, Ray workers, CLI subprocesses) talks to it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    _Watch.servers[(host, port)] = "moto"
    saved = {k: os.environ.get(k) for k in [*_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(_ENV)
    os.environ["AWS_ENDPOINT_URL"] = url
    yield url
    server.stop()
    _Watch.servers.pop((host, port), None)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class _SharedRay:
    """The session's in-process Ray, while it is up (started by the first `shared_ray`)."""

    up = False

    @classmethod
    def stop(cls) -> None:
        import ray

        ray.shutdown()
        cls.up = False


@pytest.fixture(scope="session")
def _shared_ray_session(moto_server: str) -> Iterator[None]:
    yield
    if _SharedRay.up:  # before moto stops: its workers hold clients of it
        _SharedRay.stop()


@pytest.fixture()
def shared_ray(_shared_ray_session: None) -> Iterator[ModuleType]:
    """One in-process Ray for the tests that run their jobs or pools in this process and own
    nothing of Ray's beyond their actors (which their pool kills): starting Ray costs several
    seconds on 2 cores, so they share one. 3 CPUs and 2 logical GPUs: what `start_ray` gives
    two workers on a CPU-only machine. Started after moto, so its workers inherit the AWS_*
    environment; a test that does not use it finds no Ray in this process (a test that
    builds its own cluster or runs `ray start` must not meet it). Yields the ``ray`` module."""
    import ray

    if not _SharedRay.up:
        if ray.is_initialized():  # left behind by an earlier test: not ours to lend
            ray.shutdown()
        ray.init(address="local", num_cpus=3, num_gpus=2, include_dashboard=False,
                 configure_logging=False, log_to_driver=False)
        _SharedRay.up = True
    yield ray
    assert _SharedRay.up and ray.is_initialized(), "a test shut the shared Ray down"


@pytest.fixture()
def s3_bucket(moto_server: str) -> str:
    """A fresh bucket per test, as ``s3://NAME``."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    Storage(StorageConfig(endpoint_url=moto_server)).client.create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The test runs twice: under a local folder and under a prefix of a fresh S3 bucket."""
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket") + "/data"
    return str(tmp_path / "data")


@pytest.fixture()
def storage(moto_server: str) -> Storage:
    return Storage(StorageConfig(endpoint_url=moto_server))


@pytest.fixture()
def fault_proxy(moto_server: str) -> Iterator[FaultProxy]:
    host_port = moto_server.removeprefix("http://").split(":")
    proxy = FaultProxy((host_port[0], int(host_port[1]))).start()
    yield proxy
    proxy.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- images ----------------------------------------------------------------------------------

def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Uniform noise, H x W x 3 uint8 (incompressible: every pixel is detail)."""
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8)


def image_bytes(img: Image.Image | np.ndarray, fmt: str, **options: object) -> bytes:
    """``img`` encoded as ``fmt`` (a PIL format name) with PIL's save ``options``."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A noise JPEG of the given size."""
    return image_bytes(noise(width, height, seed), "JPEG", quality=quality)


# -- jobs ------------------------------------------------------------------------------------

def job_config(source: str, destination: str, job_root: str | None = None,
               **overrides: object) -> config_mod.JobConfig:
    """A job with random weights (no checkpoint needed); ``overrides`` use dotted names, e.g.
    ``**{"worker.io_threads": 2}``."""
    settings: dict[str, object] = {"source": source, "destination": destination,
                                   "model.random_weights": True}
    if job_root is not None:
        settings["job_root"] = job_root
    return config_mod.load(None, {**settings, **overrides})


def make_job(root: str, files: dict[str, bytes], storage: Storage | None = None,
             job_id: str = "test", **overrides: object) -> Ledger:
    """Write ``files`` under ROOT/src and plan a job ROOT/src -> ROOT/out at ROOT/job."""
    from deblur.job.ledger import Ledger

    storage = storage or Storage()
    for name, data in files.items():
        storage.put(join(root, f"src/{name}"), data)
    job = job_config(join(root, "src"), join(root, "out"), join(root, "job"), **overrides)
    return Ledger.create(storage, job, job_id=job_id, model_info={})


# -- stand-in models (``infer`` for ShardProcessor) ------------------------------------------

def identity(images: list[np.ndarray], shape: tuple[int, int] | None) -> list[np.ndarray]:
    return [img.copy() for img in images]


def unsharp(images: list[np.ndarray], shape: tuple[int, int] | None) -> list[np.ndarray]:
    """A stand-in 'deblurrer' that really sharpens: output sharper than input."""
    out = []
    for img in images:
        f = img.astype(np.float32)
        blur = (np.roll(f, 1, 0) + np.roll(f, -1, 0) + np.roll(f, 1, 1) + np.roll(f, -1, 1)) / 4
        out.append(np.clip(f + 1.5 * (f - blur), 0, 255).astype(img.dtype))
    return out


# -- storage that reports its reads ----------------------------------------------------------

class CountingStorage(Storage):
    """A real Storage that records every read (off the product's path: tests only).

    ``whole`` lists whole-object GETs (recorded as they start), ``ranges`` ranged GETs as
    (uri, start, bytes returned). ``on_get(uri)``, if given, is called as a whole GET starts.
    """

    def __init__(self, config: StorageConfig | None = None,
                 on_get: Callable[[str], None] | None = None) -> None:
        super().__init__(config)
        self.whole: list[str] = []
        self.ranges: list[tuple[str, int, int]] = []
        self.on_get = on_get
        self.lock = threading.Lock()

    def get(self, uri: str) -> bytes:
        with self.lock:
            self.whole.append(uri)
        if self.on_get is not None:
            self.on_get(uri)
        return super().get(uri)

    def get_range(self, uri: str, length: int, start: int = 0) -> bytes:
        data = super().get_range(uri, length, start)
        with self.lock:
            self.ranges.append((uri, start, len(data)))
        return data
