"""``deblur submit``: send a job to a running Ray cluster through the Ray Jobs API.

The job is checked here first (config, source/destination syntax), so a typo fails in a second
on the laptop instead of minutes later on the cluster. The validated config travels as a YAML
file in the runtime_env's ``working_dir`` and the entrypoint is the same ``deblur run`` a user
would type on the head, so a submitted job and a local one are one code path.

The job id and job root are chosen here, not on the cluster: the submission id is
``deblur-<job_id>`` and the job root is printed before anything runs, so ``deblur status`` and
``deblur cancel`` work on it whether or not the submitter follows the logs.

Authentication: Ray's token auth (``RAY_AUTH_MODE=token`` on the cluster). The token comes from
``RAY_AUTH_TOKEN`` (or Ray's own token file) and is sent as a bearer header; it is never
printed and never put into the runtime_env, which anyone who can read the dashboard can see.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from deblur.config import JobConfig
from deblur.errors import ConfigError, SubmitError
from deblur.job.ledger import check_job_id, default_job_root, new_job_id

CONFIG_NAME = "deblur-job.yaml"
# Credentials must reach workers through the cluster's own identity (IAM role, IRSA, a
# Kubernetes Secret), never through the runtime_env: the Jobs API shows it to every reader.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
              "RAY_AUTH_TOKEN")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
NO_AGENT = "No available agent to submit job"
AGENT_WAIT_S = 60.0  # how long a just-started head may take to bring its job agent up


@dataclass(frozen=True)
class Submission:
    """What was sent: enough for the user to find the job again."""

    submission_id: str
    job_id: str
    job_root: str
    address: str
    entrypoint: str


def check_address(address: str) -> str:
    """The dashboard URL the Jobs API answers on; refuses Ray client/GCS addresses early."""
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(
            f"--address {address!r}: submit talks to the Ray dashboard / Jobs API, give its "
            "URL, e.g. http://HEAD:8265 (ray:// and GCS host:port addresses are for "
            "`deblur run --address`)")
    return address.rstrip("/")


def auth_headers() -> dict[str, str]:
    """A bearer header from RAY_AUTH_TOKEN; without it Ray's own token lookup still applies."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def load_runtime_env(path: Path | None) -> dict[str, Any]:
    """The user's extra runtime_env (pip, env_vars, container…) from YAML or JSON."""
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read --runtime-env {str(path)!r}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"--runtime-env {str(path)!r} is not YAML/JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--runtime-env {str(path)!r}: expected a mapping")
    if "working_dir" in data:
        raise ConfigError(f"--runtime-env {str(path)!r}: drop working_dir; deblur submit "
                          "ships the job config in its own working_dir (use py_modules "
                          "for code)")
    secrets = sorted(k for k in (data.get("env_vars") or {}) if k.upper() in SECRET_ENV)
    if secrets:
        raise ConfigError(
            f"--runtime-env {str(path)!r} sets {', '.join(secrets)}: runtime_env is readable "
            "by anyone with dashboard access; give the cluster credentials through its IAM "
            "role / a Kubernetes Secret instead (see docs/deploy.md)")
    return data


def prepare(config: JobConfig, *, job_id: str | None, resume: bool) -> tuple[JobConfig, str]:
    """The config the cluster will run (job root fixed, address auto) and its job id."""
    if resume:
        if not config.job_root:
            raise ConfigError("--resume needs --job-root: the job to resume")
        job_id = job_id or config.job_root.rstrip("/").rsplit("/", 1)[-1]
    job_id = check_job_id(job_id) if job_id else new_job_id()
    job_root = config.job_root or default_job_root(config.destination, job_id)
    scheduler = replace(config.scheduler, address="auto")
    return replace(config, job_root=job_root, scheduler=scheduler), job_id


def entrypoint(config: JobConfig, job_id: str, *, resume: bool) -> str:
    """The shell command Ray runs on the head: plain ``deblur run`` on the shipped config."""
    args = ["deblur", "run", config.source, config.destination, "--config", CONFIG_NAME,
            "--job-id", job_id]
    if resume:
        args.append("--resume")
    return " ".join(shlex.quote(a) for a in args)


def client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as exc:  # connection, version and auth failures all land here
        raise _translate(exc, address) from None


def submit(config: JobConfig, address: str, *, job_id: str | None = None,
           resume: bool = False, runtime_env: dict[str, Any] | None = None,
           entrypoint_num_cpus: float | None = None) -> Submission:
    """Send the job; returns once the cluster accepted it (it runs asynchronously)."""
    import yaml

    address = check_address(address)
    config, job_id = prepare(config, job_id=job_id, resume=resume)
    command = entrypoint(config, job_id, resume=resume)
    jobs = client(address)
    env = dict(runtime_env or {})
    env_vars = {"PYTHONUNBUFFERED": "1", **(env.get("env_vars") or {})}
    submission_id = f"deblur-{job_id}"
    with tempfile.TemporaryDirectory(prefix="deblur-submit-") as folder:
        Path(folder, CONFIG_NAME).write_text(
            yaml.safe_dump(config.to_dict(), sort_keys=False))
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                jobs.submit_job(
                    entrypoint=command, submission_id=submission_id,
                    runtime_env={**env, "working_dir": folder, "env_vars": env_vars},
                    metadata={"deblur.job_id": job_id,
                              "deblur.job_root": config.job_root or ""},
                    entrypoint_num_cpus=entrypoint_num_cpus)
                break
            except Exception as exc:
                # A head that just started answers 500 "No available agent" until its job
                # agent is up: wait for it (bounded), as `ray job submit` users retry by hand.
                if NO_AGENT in str(exc) and time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                raise _translate(exc, address) from None
    return Submission(submission_id=submission_id, job_id=job_id,
                      job_root=config.job_root or "", address=address, entrypoint=command)


def follow(address: str, submission_id: str, write: Callable[[str], None]) -> tuple[str, int | None]:
    """Stream the job's logs until it ends; returns (status, driver exit code)."""
    jobs = client(address)

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(submission_id):
            write(chunk)

    try:
        asyncio.run(tail())
        info = jobs.get_job_info(submission_id)
    except Exception as exc:
        raise _translate(exc, address) from None
    status = str(getattr(info.status, "value", info.status))
    if status not in TERMINAL:  # the log stream can close a moment before the status flips
        import time

        for _ in range(60):
            time.sleep(0.5)
            info = jobs.get_job_info(submission_id)
            status = str(getattr(info.status, "value", info.status))
            if status in TERMINAL:
                break
    return status, info.driver_exit_code


def _translate(exc: BaseException, address: str) -> SubmitError:
    """One line that says what to fix; never echoes request headers (the token)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    kind = type(exc).__name__
    if kind == "AuthenticationError" or "Authentication required" in text:
        if "failed" in text.lower() or "Forbidden" in text:
            return SubmitError(f"the Ray cluster at {address} rejected the token: check "
                               "RAY_AUTH_TOKEN against the cluster's (kubectl get secret … / "
                               "`ray get-auth-token` on the head)")
        return SubmitError(f"the Ray cluster at {address} requires a token: set "
                           "RAY_AUTH_TOKEN (the cluster runs with RAY_AUTH_MODE=token)")
    if isinstance(exc, ConnectionError) or "Failed to connect" in text:
        return SubmitError(f"cannot reach the Ray dashboard at {address}: is the head up and "
                           "the port forwarded (kubectl port-forward svc/…-head 8265)?")
    return SubmitError(f"Ray Jobs API at {address}: {kind}: {text[:500]}")
