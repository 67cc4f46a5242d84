"""What the first screen says on a CPU-only machine (issue 25, item 4), with real Ray started
as `deblur run` starts it (stand-in GPUs) and real workers (random weights):

- a worker Ray has placed is loading its model: the line says so, never "waiting for GPU";
- the failed count moves as shards commit, not only at the end;
- once nothing is pending, no "(waiting for …)" is left on the line.
"""

from __future__ import annotations

import io
import re

import pytest

from deblur.cluster import stand_in_gpus, start_ray
from deblur.console import ProgressView
from deblur.run.pool import ActorPool
from tests.conftest import jpeg, make_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGES = 12


@pytest.fixture(scope="module")
def cpu_job_ray(tmp_path_factory: pytest.TempPathFactory):
    import ray

    root = tmp_path_factory.mktemp("first-screen")
    files = {f"{i:02d}.jpg": jpeg(32, 24, i) if i % 3 else b"not an image"
             for i in range(IMAGES)}
    ledger = make_job(str(root), files, shard_size=2, **{
        "scheduler.min_workers": 1, "scheduler.max_workers": 1,
        "scheduler.shards_per_worker": 1, "worker.io_threads": 1, "metrics.enabled": False})
    started = not ray.is_initialized()  # a Ray another module left up is used as it is
    start_ray(ledger.config())  # as the driver does: logical GPUs on a machine without CUDA
    yield ledger
    if started:
        ray.shutdown()


def test_cpu_only_first_screen_names_what_the_worker_waits_for(cpu_job_ray) -> None:
    ledger = cpu_job_ray
    assert stand_in_gpus(ledger.config()), "this test needs a machine without CUDA"
    view = ProgressView(io.StringIO(), tty=False)
    lines: list[str] = []

    def seen(progress) -> None:
        view.update(progress)
        lines.append(view.line())

    progress = ActorPool(ledger.config(), ledger, seen).run(ledger.shard_ids(), IMAGES)
    assert progress.rows_done == IMAGES and progress.failed == IMAGES // 3

    assert not [line for line in lines if "GPU" in line], lines
    assert any("1 pending (waiting for the worker to load its model)" in line
               for line in lines), lines
    assert not [line for line in lines if "0 pending (waiting" in line], lines
    # The failed count moves as shards commit: some line shows failures before the end.
    counts = [tuple(map(int, m.groups())) for m in
              (re.search(r"^(\d+)/\d+ images .* (\d+) failed", line) for line in lines) if m]
    assert any(failed and done < IMAGES for done, failed in counts), lines
    assert counts[-1] == (IMAGES, IMAGES // 3)
