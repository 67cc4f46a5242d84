"""`deblur submit` against a real `ray start --head` with the dashboard and token auth on.

The head binds GCS, the dashboard and the node address to 127.0.0.1; the token is random per
run. The submitted job runs the real pipeline (random weights, small images) on the head.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pytest

from deblur.run import submit as submit_mod
from deblur.config import load
from deblur.errors import ConfigError
from deblur.job.ledger import Ledger
from deblur.io.storage import Storage
from tests.conftest import free_port, jpeg
from tests.integration.helpers import all_results, stop_ray_of_this_run

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
DEBLUR = str(BIN / "deblur")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A token-authenticated Ray head on loopback; yields the env a client needs."""
    token = secrets.token_hex(16)
    home = tmp_path_factory.mktemp("home")  # no ~/.ray/auth_token from the developer's home
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    dashboard = free_port()
    start = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             "--include-dashboard=true", "--num-cpus=2", "--num-gpus=1",
             # Not Ray's fixed defaults (52365, 10001): another test worker's Ray may hold
             # them, and a head whose job agent cannot bind refuses every submission.
             f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}",
             "--disable-usage-stats"]
    done = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        yield {**env, "DEBLUR_ADDRESS": f"http://127.0.0.1:{dashboard}"}
    finally:
        stop_ray_of_this_run()  # not `ray stop --force`: that stops every Ray on the machine


def _inputs(root: Path, count: int, corrupt: int = 0) -> Path:
    folder = root / "in"
    folder.mkdir()
    for i in range(count):
        (folder / f"img {i:02d}.jpg").write_bytes(jpeg(40, 32, seed=i))
    for i in range(corrupt):
        (folder / f"bad{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def _submit(env: dict[str, str], *args: str, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    return subprocess.run([DEBLUR, "submit", *args, "--address", env["DEBLUR_ADDRESS"]],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_submit_follow_runs_the_job_and_returns_its_exit_code(head: dict[str, str],
                                                              tmp_path: Path) -> None:
    source = _inputs(tmp_path, 5, corrupt=1)
    dest = tmp_path / "out"
    done = _submit(head, str(source), str(dest), "--random-weights", "--job-id", "follow-1",
                   "--metrics-port", "0", "--shard-size", "3", "--follow")
    output = done.stdout + done.stderr
    # exit code 1 is the job's own: it finished, one image failed
    assert done.returncode == 1, output
    assert "submitted: deblur-follow-1" in output
    job_root = str(dest / "_deblur" / "follow-1") + "/"
    assert f"job root: {job_root}" in output
    assert "done: 5 ok, 1 failed" in output  # the driver's log line, streamed back
    assert head["RAY_AUTH_TOKEN"] not in output

    ledger = Ledger.open(Storage(), job_root)
    assert ledger.job()["job_id"] == "follow-1"
    results = all_results(ledger)
    assert results.num_rows == 6 and len(set(results.column("row_id").to_pylist())) == 6
    failed = results.filter(pc.equal(results.column("status"), "failed"))
    assert failed.column("reason").to_pylist() == ["corrupt"]
    assert len(list((dest).glob("img *.jpg"))) == 5

    status = subprocess.run([DEBLUR, "status", job_root, "--json"], env=head,
                            capture_output=True, text=True, timeout=120)
    assert json.loads(status.stdout)["ok"] == 5


def test_submit_without_follow_prints_the_id_and_the_job_runs(
        head: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.job_submission import JobSubmissionClient

    source = _inputs(tmp_path, 3)
    done = _submit(head, str(source), str(tmp_path / "out"), "--random-weights",
                   "--metrics-port", "0", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    sub = json.loads(done.stdout.strip().splitlines()[-1])
    assert sub["submission_id"] == f"deblur-{sub['job_id']}"
    assert sub["job_root"].endswith(f"/_deblur/{sub['job_id']}/")

    jobs = JobSubmissionClient(head["DEBLUR_ADDRESS"],
                               headers={"Authorization": f"Bearer {head['RAY_AUTH_TOKEN']}"})
    # following later, from another process, is the same as --follow
    monkeypatch.setenv("RAY_AUTH_TOKEN", head["RAY_AUTH_TOKEN"])
    chunks: list[str] = []
    status, code = submit_mod.follow(head["DEBLUR_ADDRESS"], sub["submission_id"],
                                     chunks.append)
    assert (status, code) == ("SUCCEEDED", 0), "".join(chunks)[-2000:]
    assert "done: 3 ok, 0 failed" in "".join(chunks)
    info = jobs.get_job_info(sub["submission_id"])
    assert info.metadata["deblur.job_root"] == sub["job_root"]
    # the config went as a file in the working_dir, and no credential in the runtime_env
    assert "RAY_AUTH_TOKEN" not in json.dumps(info.runtime_env)
    assert Ledger.open(Storage(), sub["job_root"]).status().ok == 3


@pytest.mark.parametrize("token, says", [(None, "requires a token"),
                                         ("wrong-token", "rejected the token")])
def test_submit_without_the_right_token_is_refused(head: dict[str, str], tmp_path: Path,
                                                   token: str | None, says: str) -> None:
    env = {k: v for k, v in head.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    if token:
        env["RAY_AUTH_TOKEN"] = token
    source = _inputs(tmp_path, 1)
    done = _submit(env, str(source), str(tmp_path / "out"), "--random-weights",
                   "--job-id", "refused")
    output = done.stdout + done.stderr
    assert done.returncode == 4, output
    assert says in output and head["RAY_AUTH_TOKEN"] not in output
    assert not (tmp_path / "out").exists()


def test_submit_fails_fast_on_an_unreachable_head_or_bad_address(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_AUTH_TOKEN": "t0ken-never-printed"}
    done = subprocess.run([DEBLUR, "submit", str(tmp_path / "src"), str(tmp_path / "o"),
                           "--random-weights", "--address", f"http://127.0.0.1:{free_port()}"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 4 and "cannot reach the Ray dashboard" in done.stderr
    assert "t0ken-never-printed" not in done.stdout + done.stderr
    done = subprocess.run([DEBLUR, "submit", str(tmp_path / "src"), str(tmp_path / "o"),
                           "--random-weights", "--address", "ray://127.0.0.1:10001"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "http://HEAD:8265" in done.stderr


# -- the submission itself, without a cluster ------------------------------------------------

def test_prepare_fixes_the_job_root_and_the_cluster_address() -> None:
    config = load(None, {"source": "s3://b/in/", "destination": "s3://b/out/",
                         "model.random_weights": True})
    ready, job_id = submit_mod.prepare(config, job_id="j-1", resume=False)
    assert job_id == "j-1" and ready.job_root == "s3://b/out/_deblur/j-1/"
    assert ready.scheduler.address == "auto"
    with pytest.raises(ConfigError, match="job id"):
        submit_mod.prepare(config, job_id="../evil", resume=False)
    with pytest.raises(ConfigError, match="--resume needs --job-root"):
        submit_mod.prepare(config, job_id=None, resume=True)


def test_entrypoint_quotes_hostile_paths() -> None:
    config = load(None, {"source": "/data/it's here; rm -rf ~", "destination": "/o/$(id)",
                         "model.random_weights": True})
    command = submit_mod.entrypoint(config, "j", resume=True)
    assert shlex.split(command) == ["deblur", "run", "/data/it's here; rm -rf ~", "/o/$(id)",
                                    "--config", submit_mod.CONFIG_NAME, "--job-id", "j",
                                    "--resume"]


def test_runtime_env_refuses_credentials_and_working_dir(tmp_path: Path) -> None:
    env_file = tmp_path / "env.yaml"
    env_file.write_text("pip: [requests]\nenv_vars: {LOG_LEVEL: debug}\n")
    assert submit_mod.load_runtime_env(env_file)["pip"] == ["requests"]
    env_file.write_text("env_vars: {AWS_SECRET_ACCESS_KEY: abc}\n")
    with pytest.raises(ConfigError, match="readable by anyone with dashboard access"):
        submit_mod.load_runtime_env(env_file)
    env_file.write_text("working_dir: .\n")
    with pytest.raises(ConfigError, match="drop working_dir"):
        submit_mod.load_runtime_env(env_file)
