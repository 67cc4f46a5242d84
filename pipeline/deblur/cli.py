"""The ``deblur`` command line: thin commands over the library.

Heavy modules (torch, ray, pyarrow) are imported inside the commands so ``deblur --help``
stays fast. Domain errors become one line on stderr and an exit code, here and only here.

Exit codes: 0 every image ok; 1 the job finished but some images failed (the rest written);
2 usage, configuration or manifest error (nothing ran); 3 the job stopped early (cancelled or
interrupted: `deblur run --resume` or `deblur rerun` finishes it); 4 a runtime error (storage
unreachable, workers could not start, …).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

# light: no torch, ray or pyarrow at import
from deblur.config import MODEL_NAMES, OUTPUT_FORMATS, PRECISIONS, SCENE_MODEL
from deblur.console import printable

EXIT_OK, EXIT_FAILED_IMAGES, EXIT_USAGE, EXIT_STOPPED, EXIT_RUNTIME = 0, 1, 2, 3, 4

app = typer.Typer(help="Distributed batch image deblurring with MIMO-UNet on Ray.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)  # plain click help: wraps cleanly at 80 columns


def _version(value: bool) -> None:
    if value:
        from deblur import __version__

        _say(f"deblur {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")]
        = False) -> None:
    """Distributed batch image deblurring with MIMO-UNet on Ray.

    Settings also come from DEBLUR_<SECTION>__<FIELD> variables, RAY_ADDRESS from Ray's own
    convention (README.md, "Configuration")."""


def _say(text: str = "", *, err: bool = False) -> None:
    """A line for the person: keys and messages come from users' data, so control characters
    are shown escaped (``console.printable``), never sent to the terminal. JSON output goes
    through ``typer.echo`` as it is."""
    typer.echo(printable(text), err=err)


def _fail(message: str, code: int) -> typer.Exit:
    _say(f"error: {message}", err=True)
    return typer.Exit(code)


def _guard(func: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a command body, turning domain errors into one line and an exit code."""
    from deblur.errors import (ConfigError, ManifestError, ModelError, PipelineError,
                               WeightsError)

    try:
        return func(*args, **kwargs)
    except (ConfigError, ManifestError, ModelError, WeightsError) as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    except PipelineError as exc:  # storage, a worker that cannot start, the cluster, …
        raise _fail(str(exc), EXIT_RUNTIME) from None
    except KeyboardInterrupt:  # a second SIGINT/SIGTERM while the driver was stopping
        raise _fail("interrupted: `deblur rerun JOB_ROOT` finishes the job", EXIT_STOPPED
                    ) from None


# -- options shared by run and rerun ---------------------------------------------------------

# RAY_ADDRESS as Ray's own CLI reads it; without either, Ray starts in this process.
Address = Annotated[str | None, typer.Option(
    envvar="RAY_ADDRESS",
    help="Ray cluster (ray://… or auto); default: a Ray inside this process.")]
MinWorkers = Annotated[int | None, typer.Option(help="Actors kept alive even when idle.")]
MaxWorkers = Annotated[int | None, typer.Option(help="Most worker actors (one model each).")]
GpusPerWorker = Annotated[float | None, typer.Option(help="GPUs per actor; fractions allowed.")]
MaxBatch = Annotated[int | None, typer.Option(help="Most images per forward pass.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
Verbose = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Also show Ray's and libraries' logs (and workers' output).")]
LogLevel = Annotated[str | None, typer.Option(
    metavar="[debug|info|warning|error]", help="Show logs from this level up (implies -v).")]
AsJson = Annotated[bool, typer.Option(
    "--json", help="Print a JSON summary on stdout at the end; progress on stderr.")]


def _pool_overrides(address: str | None, min_workers: int | None, max_workers: int | None,
                    gpus_per_worker: float | None, max_batch: int | None) -> dict[str, Any]:
    return {"scheduler.address": address, "scheduler.min_workers": min_workers,
            "scheduler.max_workers": max_workers, "worker.gpus_per_worker": gpus_per_worker,
            "batch.max_batch": max_batch}


Source = Annotated[str, typer.Argument(help="Manifest (.parquet/.csv/.jsonl/.txt) or prefix"
                                            " to list: s3://bucket/prefix or a folder.")]
Destination = Annotated[str, typer.Argument(help="Output prefix: s3://… or a folder.")]
ConfigFile = Annotated[Path | None, typer.Option(help="Job config YAML (see configs/).")]
# The choices as the metavar, checked by the config (one line and exit 2 when wrong, where a
# click Choice would print a boxed usage error).
Model = Annotated[str | None, typer.Option(
    metavar="[" + "|".join(MODEL_NAMES + (SCENE_MODEL,)) + "]",
    help="The network (default mimo-unet); deblurgs: SOURCE holds scene folders.")]
Weights = Annotated[str | None, typer.Option(
    help="Checkpoint URI: path, file:// or s3:// (.pkl/.pth/.safetensors).")]
RandomWeights = Annotated[bool, typer.Option(
    "--random-weights", help="Run untrained weights: a smoke test, the output is NOT deblurred.")]
Precision = Annotated[str | None, typer.Option(
    metavar="[" + "|".join(PRECISIONS) + "]", help="Numeric precision (default auto).")]
OutputFormat = Annotated[str | None, typer.Option(
    "--format", metavar="[" + "|".join(OUTPUT_FORMATS) + "]",
    help="Output format (default same as the input).")]
Quality = Annotated[int | None, typer.Option(help="JPEG/WebP quality 1..100.")]
TilePixels = Annotated[int | None, typer.Option(
    help="Images above this many pixels run as overlapping tiles.")]
ShardSize = Annotated[int | None, typer.Option(help="Images per shard.")]
JobRoot = Annotated[str | None, typer.Option(
    help="Where the job's ledger lives; default DEST/_deblur/<job_id>/.")]
JobId = Annotated[str | None, typer.Option(
    help="Id for a new job (default: UTC time + random); names the default job root.")]
Resume = Annotated[bool, typer.Option(
    "--resume", help="Finish the job at --job-root with its stored config (pool flags apply).")]
NoWait = Annotated[bool, typer.Option(
    "--no-wait", help="Refuse at once while another driver's lease is live, instead of "
                      "waiting to see whether it is renewed (for scripts).")]
MetricsPort = Annotated[int | None, typer.Option(
    help="Port of the driver's Prometheus /metrics (0: a free one).")]
FollowLinks = Annotated[bool, typer.Option(
    "--follow-links", help="Read symlinks in a local SOURCE that resolve outside it.")]
AllowPrefix = Annotated[list[str] | None, typer.Option(
    "--allow-prefix", metavar="PREFIX",
    help="Manifest URIs must lie under one (repeatable); default: the manifest's bucket or "
         "folder, SOURCE, DESTINATION.")]
OverwriteInputs = Annotated[bool, typer.Option(
    "--overwrite-inputs", help="Allow DEST == SOURCE (originals kept in the job root).")]


def _job_overrides(source: str, destination: str, *, job_root: str | None,
                   shard_size: int | None, model: str | None, weights: str | None,
                   random_weights: bool, precision: str | None, tile_pixels: int | None,
                   output_format: str | None, quality: int | None,
                   metrics_port: int | None) -> dict[str, Any]:
    return {
        "source": source, "destination": destination, "job_root": job_root,
        "shard_size": shard_size, "model.name": model, "model.weights": weights,
        "model.random_weights": random_weights or None, "model.precision": precision,
        "model.tile_pixels": tile_pixels, "codec.output_format": output_format,
        "codec.quality": quality, "metrics.port": metrics_port,
    }


@app.command(short_help="Deblur every image of SOURCE into DESTINATION.")
def run(
    source: Source,
    destination: Destination,
    *,
    config: ConfigFile = None,
    model: Model = None,
    weights: Weights = None,
    random_weights: RandomWeights = False,
    precision: Precision = None,
    output_format: OutputFormat = None,
    quality: Quality = None,
    tile_pixels: TilePixels = None,
    shard_size: ShardSize = None,
    job_root: JobRoot = None,
    job_id: JobId = None,
    resume: Resume = False,
    no_wait: NoWait = False,
    address: Address = None,
    min_workers: MinWorkers = None,
    max_workers: MaxWorkers = None,
    gpus_per_worker: GpusPerWorker = None,
    max_batch: MaxBatch = None,
    metrics_port: MetricsPort = None,
    follow_links: FollowLinks = False,
    allow_prefix: AllowPrefix = None,
    overwrite_inputs: OverwriteInputs = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    log_level: LogLevel = None,
    as_json: AsJson = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Start even though a live job writes into an overlapping "
                        "destination.")] = False,
) -> None:
    """Deblur every image of SOURCE into DESTINATION (same relative paths)."""
    out = _output(quiet, verbose, log_level, as_json)
    overrides = {
        **_job_overrides(source, destination, job_root=job_root, shard_size=shard_size,
                         model=model, weights=weights, random_weights=random_weights,
                         precision=precision, tile_pixels=tile_pixels,
                         output_format=output_format, quality=quality,
                         metrics_port=metrics_port),
        **_pool_overrides(address, min_workers, max_workers, gpus_per_worker, max_batch),
        "follow_links": follow_links or None, "overwrite_inputs": overwrite_inputs or None,
        "allow_prefixes": allow_prefix or None,
    }
    job = _guard(_load, config, overrides)
    # A resumed job runs its stored config; these flags (where given) still apply over it.
    now = {**_pool_overrides(address, min_workers, max_workers, gpus_per_worker, max_batch),
           "metrics.port": metrics_port}
    code = _guard(_run_job, job, resume=resume, out=out, job_id=job_id, force=force,
                  overrides=now, wait=not no_wait)
    raise typer.Exit(code)


def _load(path: Path | None, flags: dict[str, Any]) -> Any:
    """The job config: defaults < --config file < DEBLUR_* environment < flags given."""
    from deblur import config as config_mod
    from deblur.envvars import merged

    return config_mod.load(path, merged(os.environ, flags))


class _Output:
    """How run/rerun talk: progress view, logging, and the final summary's form."""

    def __init__(self, quiet: bool, verbose: bool, level: int | None, as_json: bool) -> None:
        self.quiet, self.verbose, self.level, self.as_json = quiet, verbose, level, as_json
        self.log_path: str | None = None

    def info(self, text: str) -> None:
        """A line for the person: stdout, or stderr when stdout carries the JSON."""
        _say(text, err=self.as_json)


def _output(quiet: bool, verbose: bool, log_level: str | None, as_json: bool) -> _Output:
    from deblur.console import parse_level, setup_logging

    level = _guard(parse_level, log_level)
    setup_logging(verbose, level)
    return _Output(quiet, verbose or level is not None, level, as_json)


def _execute(run_config: Any, ledger: Any, shards: list[int], rows: int, out: _Output) -> Any:
    """``execute`` with the job's log file attached and the progress view running."""
    from deblur.console import ProgressView, attach_job_log, detach_job_log, job_log_path
    from deblur.run.driver import execute

    out.log_path = job_log_path(ledger.job_root, ledger.job()["job_id"])
    attach_job_log(out.log_path)
    out.info(f"log: {out.log_path}")
    view = None if out.quiet else ProgressView(
        sys.stderr, scenes=run_config.model.name == SCENE_MODEL).start()
    try:
        return execute(run_config, ledger, shards, rows,
                       on_progress=None if view is None else view.update, verbose=out.verbose)
    finally:
        if view is not None:
            view.stop()
        detach_job_log()
        _keep_log(ledger, out.log_path)


def _keep_log(ledger: Any, path: str) -> None:
    """For an s3:// job root, a copy of this run's log under the job root's logs/."""
    from deblur.errors import PipelineError
    from deblur.io.storage import is_s3

    if not is_s3(ledger.job_root):
        return
    try:
        ledger.write_log(f"driver-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.log",
                         Path(path).read_text(encoding="utf-8", errors="replace"))
    except (OSError, PipelineError) as exc:
        _say(f"note: the log stays at {path} (not copied to the job root: {exc})",
                   err=True)


def _over_stored(ledger: Any, overrides: dict[str, Any]) -> Any:
    """The job's stored config with the flags given now (dotted names, None: not given)."""
    from deblur import config as config_mod

    data = ledger.config().to_dict()
    for dotted, value in overrides.items():
        if value is not None:
            section, _, name = dotted.partition(".")
            data[section][name] = value
    return config_mod.from_dict(data).validate()


def _run_job(job: Any, *, resume: bool, out: _Output, job_id: str | None = None,
             force: bool = False, overrides: dict[str, Any] | None = None,
             wait: bool = True) -> int:
    from deblur.run.driver import open_or_plan
    from deblur.io.storage import get_storage

    storage = get_storage(job.storage)
    ledger = open_or_plan(job, storage, resume=resume, job_id=job_id, force=force, wait=wait,
                          on_wait=_countdown(out))
    run_config = _over_stored(ledger, overrides or {})
    status = ledger.status()
    shards = sorted(set(ledger.shard_ids()) - ledger.done_shards())
    out.info(f"job root: {ledger.job_root}")
    if job.model.random_weights:
        _say("warning: --random-weights: the model is untrained, outputs are NOT "
                   "deblurred (smoke test only)", err=True)
    outcome = _execute(run_config, ledger, shards, status.pending, out)
    return _report(outcome, ledger, out)


@app.command(short_help="Send the job to a Ray cluster (Ray Jobs API).")
def submit(
    source: Source,
    destination: Destination,
    *,
    address: Annotated[str, typer.Option(
        envvar="RAY_API_SERVER_ADDRESS",
        help="Jobs API URL, e.g. http://HEAD:8265 (auth: RAY_AUTH_TOKEN).")],
    config: ConfigFile = None,
    model: Model = None,
    weights: Weights = None,
    random_weights: RandomWeights = False,
    precision: Precision = None,
    output_format: OutputFormat = None,
    quality: Quality = None,
    tile_pixels: TilePixels = None,
    shard_size: ShardSize = None,
    job_root: JobRoot = None,
    job_id: JobId = None,
    resume: Resume = False,
    min_workers: MinWorkers = None,
    max_workers: MaxWorkers = None,
    gpus_per_worker: GpusPerWorker = None,
    max_batch: MaxBatch = None,
    metrics_port: MetricsPort = None,
    runtime_env: Annotated[Path | None, typer.Option(
        help="Extra runtime_env (YAML/JSON: pip, env_vars, image_uri…); no credentials.")] = None,
    follow: Annotated[bool, typer.Option(
        "--follow", help="Stream the job's logs until it ends; exit with its exit code.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the submission as JSON.")] = False,
) -> None:
    """Send the job to a running Ray cluster (Ray Jobs API); prints the submission id."""
    overrides = _job_overrides(source, destination, job_root=job_root, shard_size=shard_size,
                               model=model, weights=weights, random_weights=random_weights,
                               precision=precision, tile_pixels=tile_pixels,
                               output_format=output_format, quality=quality,
                               metrics_port=metrics_port)
    overrides.update(_pool_overrides(None, min_workers, max_workers, gpus_per_worker, max_batch))
    job = _guard(_load, config, overrides)
    code = _guard(_submit, job, address, job_id=job_id, resume=resume,
                  runtime_env=runtime_env, follow=follow, as_json=as_json)
    raise typer.Exit(code)


def _submit(job: Any, address: str, *, job_id: str | None, resume: bool,
            runtime_env: Path | None, follow: bool, as_json: bool) -> int:
    import dataclasses

    from deblur.run import submit as submit_mod

    extra = submit_mod.load_runtime_env(runtime_env)
    _check_weights_here(job)
    if not os.environ.get("RAY_AUTH_TOKEN") and os.environ.get("RAY_AUTH_MODE") != "token":
        _say("note: no RAY_AUTH_TOKEN (nor RAY_AUTH_MODE=token with ~/.ray/auth_token): "
                   "only a cluster without token auth accepts this, and such a dashboard must "
                   "never be reachable beyond a private network (docs/deploy.md)", err=True)
    sub = submit_mod.submit(job, address, job_id=job_id, resume=resume, runtime_env=extra)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(sub)))
    else:
        _say(f"submitted: {sub.submission_id}")
        _say(f"job root: {sub.job_root}")
        _say(f"logs: ray job logs --address {sub.address} -f {sub.submission_id}; "
                   f"progress: deblur status {sub.job_root}")
    if not follow:
        return EXIT_OK
    try:
        status, exit_code = submit_mod.follow(address, sub.submission_id,
                                              lambda text: typer.echo(
                                                  printable(text, keep_newlines=True),
                                                  nl=False))
    except KeyboardInterrupt:
        _say(err=True)
        _say(f"stopped following; the job keeps running on the cluster. "
                   f"`deblur cancel {sub.job_root}` stops it after the shards in flight.",
                   err=True)
        return EXIT_STOPPED
    _say(f"{sub.submission_id}: {status}"
               + (f" (exit code {exit_code})" if exit_code is not None else ""), err=True)
    if status == "SUCCEEDED":
        return EXIT_OK
    if status == "STOPPED":
        return EXIT_STOPPED
    if exit_code in (EXIT_FAILED_IMAGES, EXIT_USAGE, EXIT_STOPPED):
        return exit_code
    return EXIT_RUNTIME


def _check_weights_here(job: Any) -> None:
    """Before submitting: the weights load into the model, when this machine can read them.

    A file that is not a checkpoint or does not fit fails here (exit 2, nothing submitted);
    one that only the cluster can read (its own path or bucket) is checked by its driver."""
    from deblur.errors import StorageError, WeightsError
    from deblur.model.weights import provenance

    try:
        provenance(job.model)
    except WeightsError as exc:
        if not isinstance(exc.__cause__, (StorageError, OSError)):  # read, not judged
            raise
        _say(f"note: the weights cannot be read from here ({exc}); the driver checks "
                   f"them on the cluster before its workers start", err=True)


@app.command(short_help="Finish a job: pending shards and failed rows only.")
def rerun(
    job_root: Annotated[str, typer.Argument(help="The job to finish: its ledger root.")],
    *,
    address: Address = None,
    min_workers: MinWorkers = None,
    max_workers: MaxWorkers = None,
    gpus_per_worker: GpusPerWorker = None,
    max_batch: MaxBatch = None,
    no_wait: NoWait = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    log_level: LogLevel = None,
    as_json: AsJson = False,
) -> None:
    """Process the job's pending shards and failed rows only; ok outputs are not rewritten.

    Right after a driver died: its lease is taken over at once when it ran on this host,
    otherwise waited out (a live driver renews it, and the rerun then refuses)."""
    out = _output(quiet, verbose, log_level, as_json)
    code = _guard(_rerun, job_root, _pool_overrides(address, min_workers, max_workers,
                                                    gpus_per_worker, max_batch), out,
                  wait=not no_wait)
    raise typer.Exit(code)


def _countdown(out: _Output) -> Any:
    """The live line shown while waiting out another driver's lease (none with -q)."""
    from deblur.console import LeaseCountdown

    return None if out.quiet else LeaseCountdown(sys.stderr)


def _rerun(job_root: str, overrides: dict[str, Any], out: _Output, *, wait: bool = True
           ) -> int:
    from deblur.job.ledger import Ledger
    from deblur.run.driver import check_model

    ledger = Ledger.open_recorded(job_root)
    job = _over_stored(ledger, overrides)
    check_model(ledger, job)  # before the lease and Ray: a bad model writes nothing
    # The same takeover as run --resume (job/lease.py): a dead local driver's at once.
    ledger.acquire_lease(job.scheduler.lease_ttl_s, wait=wait, on_wait=_countdown(out))
    ledger.clear_cancel()
    index = ledger.index()  # one read of the index serves both
    status = ledger.status(index)
    shards = ledger.rerun_selection(index=index)
    ledger.clear_attempts(shards)  # an operator's rerun gives each shard its attempts afresh
    out.info(f"job root: {ledger.job_root}: rerunning {len(shards)} shards "
             f"({status.pending} pending, {status.failed} failed rows)")
    outcome = _execute(job, ledger, shards, status.pending + status.failed, out)
    return _report(outcome, ledger, out)


def _report(outcome: Any, ledger: Any, out: _Output | None = None) -> int:
    """The final summary: its own block (after a blank line), or one JSON object (--json)."""
    from deblur.job.ledger import run_throughput
    from deblur.observe.job_text import closing_lines, failure_lines

    out = out or _Output(False, False, None, False)
    status = outcome.status
    summary = ledger.read_summary() or {}
    stopped = bool(outcome.progress.cancelled or status.pending)
    code = EXIT_STOPPED if stopped else (EXIT_FAILED_IMAGES if status.failed else EXIT_OK)
    if out.as_json:
        typer.echo(json.dumps({
            "job_root": outcome.job_root, "state": summary.get("state"), "exit_code": code,
            **status.to_dict(), "images_per_s": run_throughput(summary),
            "seconds": (summary.get("run") or {}).get("seconds"), "log": out.log_path},
            default=str))
    else:
        for line in closing_lines(status, summary, outcome.job_root, out.log_path):
            _say(line)
    for reason, count in sorted(status.failures_by_reason.items()):
        _say(f"  failed {reason}: {count}", err=True)
    if status.failed:
        for line in failure_lines(ledger, status.failed):
            _say(line, err=True)
    if stopped:
        _say(f"stopped early: `deblur rerun {outcome.job_root}` finishes the job",
                   err=True)
    return code


@app.command(short_help="A job's totals, failures, throughput and state.")
def status(
    job_root: Annotated[str, typer.Argument(help="The job's ledger root.")],
    *,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    failed: Annotated[bool, typer.Option(
        "--failed", help="List failed images: `key: reason: message` (JSON with --json).")
    ] = False,
    reason: Annotated[str | None, typer.Option(
        help="With --failed (implied): only failures of this reason, e.g. corrupt.")] = None,
) -> None:
    """Totals (ok / failed / pending), failures by reason, throughput and shard states."""
    if failed or reason:
        _guard(_failed_rows, job_root, reason, as_json)
        return
    _guard(_status, job_root, as_json)


def _failed_rows(job_root: str, reason: str | None, as_json: bool) -> None:
    from deblur.job.ledger import Ledger
    from deblur.observe.job_text import failure_line

    ledger = Ledger.open_recorded(job_root)
    for row in ledger.failed_rows(reason):
        if as_json:  # the exact strings (JSON escapes control characters itself)
            typer.echo(json.dumps(row, default=str))
        else:
            _say(failure_line(row))


def _status(job_root: str, as_json: bool) -> None:
    from deblur.job.ledger import Ledger, run_throughput
    from deblur.observe.job_text import status_lines

    ledger = Ledger.open_recorded(job_root)
    if not as_json:
        for line in status_lines(ledger):
            _say(line)
        return
    state, error = ledger.state()
    summary = ledger.read_summary()
    typer.echo(json.dumps({**ledger.status().to_dict(), "state": state, "error": error,
                           "last_snapshot": ledger.latest_snapshot(), "summary": summary,
                           "images_per_s_while_workers_ran": run_throughput(summary)},
                          indent=2, default=str))


@app.command(short_help="Stop a job after the shards in flight.")
def cancel(job_root: Annotated[str, typer.Argument(help="The job's ledger root.")]) -> None:
    """Stop the job after the shards in flight (its driver then exits 3).

    The driver dispatches no more shards, lets those in flight finish and writes
    summary.json; `deblur rerun` (or `run --resume`) finishes the job later."""
    _guard(_cancel, job_root)


def _cancel(job_root: str) -> None:
    from deblur.job.ledger import Ledger

    ledger = Ledger.open_recorded(job_root)
    ledger.request_cancel()
    lease = ledger.live_lease()
    if lease is not None:
        _say(f"cancel requested for {job_root}; its live driver {lease.describe()} "
                   f"stops dispatching within seconds and exits once the shards in flight "
                   f"finish")
    else:
        _say(f"cancel requested for {job_root}; no live driver holds it now: "
                   f"`deblur rerun {job_root}` clears the request and finishes the job")


@app.command(short_help="Write the job's report.html (totals, samples).")
def report(
    job_root: Annotated[str, typer.Argument(help="The job's ledger root.")],
    *,
    out: Annotated[str | None, typer.Option(help="Also write the page here (path or s3://).")
                   ] = None,
    open_page: Annotated[bool, typer.Option("--open", help="Open it in a browser.")] = False,
    samples: Annotated[int, typer.Option(help="QA examples per group.")] = 4,
) -> None:
    """Write report.html: totals, failures, quality histograms, before/after samples."""
    _guard(_report_page, job_root, out, open_page, samples)


def _report_page(job_root: str, out: str | None, open_page: bool, samples: int) -> None:
    from deblur.job.ledger import Ledger
    from deblur.observe.report import write_report
    from deblur.io.storage import is_s3

    ledger = Ledger.open_recorded(job_root)
    stored = write_report(ledger, out, samples)
    _say(f"report: {stored}" + (f" and {out}" if out else ""))
    if open_page:
        import webbrowser

        local = out if out and not is_s3(out) else (None if is_s3(stored) else stored)
        if local is None:
            _say("--open needs a local copy: add --out report.html", err=True)
        else:
            webbrowser.open(Path(local).resolve().as_uri())


@app.command("list")
def list_jobs(
    destination: Annotated[str, typer.Argument(help="A job's destination.")],
    *,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object per job and line (epoch times).")] = False,
) -> None:
    """List the jobs recorded under DESTINATION/_deblur/, oldest first."""
    _guard(_list, destination, as_json)


def _list(destination: str, as_json: bool) -> None:
    from deblur.io.storage import get_storage
    from deblur.observe.job_text import jobs_table, jobs_with_counts

    jobs = jobs_with_counts(get_storage(), destination)
    if as_json:
        for job in jobs:
            typer.echo(json.dumps(job, default=str))
        return
    if not jobs:
        _say(f"no jobs under {destination}")
        return
    from rich.console import Console

    # stdout as it is now (a test runner swaps it); no colour codes when it is not a TTY.
    Console(file=sys.stdout, highlight=False).print(jobs_table(jobs))


@app.command()
def manifest(
    prefix: Annotated[str, typer.Argument(help="Prefix or folder to list (images only).")],
    out: Annotated[str, typer.Argument(help="Parquet manifest to write (s3:// or local).")],
) -> None:
    """Write the listing of PREFIX as a reusable Parquet manifest."""
    _guard(_manifest, prefix, out)


def _manifest(prefix: str, out: str) -> None:
    from deblur.job.manifest import write_listing
    from deblur.io.storage import get_storage

    count = write_listing(prefix, out, get_storage())
    _say(f"wrote {count} keys to {out}")


@app.command(short_help="Make blurry sample images for a demo.")
def samples(
    folder: Annotated[Path, typer.Argument(help="Folder to write the sample images into.")],
    count: Annotated[int, typer.Option(help="How many images.")] = 8,
    scenes: Annotated[int, typer.Option(
        help="Write this many multi-view scenes (for --model deblurgs) instead.")] = 0,
    views: Annotated[int, typer.Option(help="Views per scene (with --scenes).")] = 8,
    size: Annotated[str, typer.Option(help="Scene view size WIDTHxHEIGHT.")] = "64x48",
) -> None:
    """Make synthetic blurry sample images (known motion blur) for a demo job; with
    --scenes, scenes of several views blurred by camera motion, with transforms.json."""
    from deblur.dev.samples import reference_folder, write_samples

    if scenes:
        from deblur.dev.scenes import write_scenes

        width, _, height = size.lower().partition("x")
        if not (width.isdigit() and height.isdigit() and int(width) >= 16
                and int(height) >= 16 and views >= 2):
            raise _fail(f"--size {size!r} / --views {views}: write WIDTHxHEIGHT of at least "
                        "16x16 and 2 or more views", EXIT_USAGE)
        written = write_scenes(folder, count=scenes, views=views, width=int(width),
                               height=int(height))
        _say(f"wrote {len(written)} scenes of {views} blurry views to {folder} (sharp "
             f"references and true poses in {reference_folder(folder)})")
        return
    paths = write_samples(folder, count=count)
    _say(f"wrote {len(paths)} blurry sample images to {folder} "
               f"(sharp references in {reference_folder(folder)})")


GPU_TYPES = ("cpu-dev",)
"""``plan --gpu-type`` choices for help: the device types of estimate.THROUGHPUT, copied here
because that module imports pyarrow (help must stay fast); tests/test_cli_output.py checks the
two agree. A wrong value is refused by the estimate itself, in one line with exit 2."""


@app.command(short_help="Dry run: count, sizes, cost. Writes nothing.")
def plan(
    source: Source,
    destination: Destination,
    *,
    config: ConfigFile = None,
    model: Model = None,
    shard_size: ShardSize = None,
    gpus: Annotated[int, typer.Option(help="Devices the job would run on.")] = 1,
    gpu_type: Annotated[str, typer.Option(
        metavar="[" + "|".join(GPU_TYPES) + "]",
        help="Device type with a measured throughput figure.")] = "cpu-dev",
    sample: Annotated[int, typer.Option(help="Image headers to read (a seeded sample).")] = 200,
    seed: Annotated[int, typer.Option(help="Sample seed.")] = 0,
    out: Annotated[Path | None, typer.Option(
        help="Also write the report as JSON to this file (nothing is written otherwise).")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Dry run: count, sizes, problems, GPU-hours and requests of a job. Writes nothing."""
    overrides = {"source": source, "destination": destination, "shard_size": shard_size,
                 "model.name": model}
    job = _guard(_plan_config, config, overrides)
    _guard(_plan, job, gpus=gpus, gpu_type=gpu_type, sample=sample, seed=seed, out=out,
           as_json=as_json)


def _plan_config(path: Path | None, overrides: dict[str, Any]) -> Any:
    """The job config as `run` loads it; a plan needs no weights, so none given is fine."""
    from deblur import config as config_mod
    from deblur.errors import ConfigError

    from deblur.envvars import merged

    try:
        return config_mod.load(path, merged(os.environ, overrides))
    except ConfigError as first:
        try:  # missing weights were the only problem if it loads as a random-weights config
            return config_mod.load(path, merged(os.environ,
                                                {**overrides, "model.random_weights": True}))
        except ConfigError:
            raise first from None


def _plan(job: Any, *, gpus: int, gpu_type: str, sample: int, seed: int, out: Path | None,
          as_json: bool) -> None:
    from deblur.job import estimate as plan_mod
    from deblur.io.storage import get_storage

    report = plan_mod.estimate(job, get_storage(job.storage), gpus=gpus, gpu_type=gpu_type,
                               sample_size=sample, seed=seed)
    data = json.dumps(report.to_dict(), indent=2)
    typer.echo(data if as_json else printable(plan_mod.render(report), keep_newlines=True))
    if out is not None:
        out.write_text(data + "\n")


@app.command(short_help="Train or fine-tune MIMO-UNet on Ray Train.")
def train(
    data: Annotated[str | None, typer.Argument(
        help="Manifest with key (blurry) and reference (sharp) columns; omit with --synthetic."
    )] = None,
    out: Annotated[str | None, typer.Argument(
        help="Where checkpoints, metrics and the final weights go (folder or s3:// prefix); "
             "a run there is resumed.")] = None,
    *,
    synthetic: Annotated[str | None, typer.Option(
        help="Sharp images (folder, prefix or manifest) blurred on the fly by random camera "
             "shake; then give only OUT.")] = None,
    init: Annotated[str | None, typer.Option(
        help="Start from these weights (any file `deblur run --weights` loads).")] = None,
    model: Annotated[str, typer.Option(
        help="Network to train.", metavar="[mimo-unet|mimo-unet-plus]")] = "mimo-unet",
    steps: Annotated[int, typer.Option(help="Optimizer steps in all.")] = 3000,
    workers: Annotated[int, typer.Option(help="Ray Train workers (DDP).")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(help="0 trains on CPUs.")] = 0.0,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs Ray reserves per worker.")] = 1.0,
    threads: Annotated[int | None, typer.Option(help="torch threads per worker.")] = None,
    crop: Annotated[int, typer.Option(help="Training crop size (multiple of 4).")] = 256,
    batch: Annotated[int, typer.Option(help="Crops per worker per step.")] = 4,
    rotate: Annotated[bool, typer.Option(
        help="Random 90-degree turns besides the flip.")] = True,
    min_scale: Annotated[float, typer.Option(
        help="--synthetic: random rescale floor (1: off).")] = 1.0,
    lr: Annotated[float, typer.Option(help="Adam learning rate (the authors: 1e-4).")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Data and initialisation seed.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 500,
    eval_every: Annotated[int, typer.Option(help="Steps between held-out PSNRs.")] = 500,
    eval_size: Annotated[int, typer.Option(
        help="Side of the held-out images' centre crops, px.")] = 256,
    log_every: Annotated[int, typer.Option(help="Steps between progress lines.")] = 10,
    holdout: Annotated[int | None, typer.Option(
        help="Images held out for the PSNR (default 1 in 20).")] = None,
    time_limit: Annotated[float | None, typer.Option(
        help="Minutes of training, then checkpoint and write the weights (resumable).")] = None,
    loader_workers: Annotated[int, typer.Option(help="Sample-making processes.")] = 0,
    address: Address = None,
) -> None:
    """Train (or fine-tune) MIMO-UNet on Ray Train; resumes a run found in OUT."""
    if out is None and synthetic is not None:
        data, out = None, data  # `deblur train --synthetic SHARP OUT`: the one argument is OUT
    if out is None:
        raise _fail("give OUT (and DATA, or --synthetic SHARP_SOURCE)", EXIT_USAGE)
    _guard(_train, dict(
        out=out, data=data, synthetic=synthetic, init=init, model=model, steps=steps,
        workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
        threads=threads, crop=crop, batch=batch, rotate=rotate, min_scale=min_scale, lr=lr,
        seed=seed,
        checkpoint_every=checkpoint_every, eval_every=eval_every, eval_size=eval_size,
        log_every=log_every, holdout=holdout, time_limit_s=None if time_limit is None else time_limit * 60,
        loader_workers=loader_workers, address=address,
        command=" ".join(["deblur", *sys.argv[1:]])))


def _train(options: dict[str, Any]) -> None:
    from deblur.train.trainer import TrainConfig, train as run_training

    last = run_training(TrainConfig(**options))
    if "holdout_psnr" in last:
        _say(f"held-out PSNR {last['holdout_blurry_psnr']:.2f} -> "
                   f"{last['holdout_psnr']:.2f} dB at step {last['step']}")


def main() -> None:
    from deblur.console import setup_logging

    # deblur's warnings on the terminal; run/rerun add the job's log file (and -v).
    setup_logging()
    app()


if __name__ == "__main__":
    main()
