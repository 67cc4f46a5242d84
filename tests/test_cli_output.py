"""What the operator sees (issue 19, "Terminal"): a progress line refreshed by a timer (plain
log lines off a terminal), choices and --version, help that wraps at 80 columns, `status` with
one defined throughput and integer counts, `list` as a table (--json for machines), and
DEBLUR_* environment settings. The real `deblur run` (Ray's logs kept off the terminal) is in
tests/integration/test_cli_run_output.py."""

from __future__ import annotations

import io
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deblur import __version__
from deblur.cli import GPU_TYPES, _load, app
from deblur.console import ProgressView, hms
from deblur.io.storage import Storage, join
from deblur.job.ledger import Ledger, default_job_root, run_throughput
from tests.conftest import job_config, jpeg


@dataclass
class FakeProgress:
    """The fields of deblur.run.pool.Progress the view reads (the pool mutates it in place)."""

    rows_total: int
    rows_done: int = 0
    failed: int = 0
    workers_active: int = 0
    workers_pending: int = 0
    waiting_for: str = ""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- progress ----------------------------------------------------------------------------------


def test_hms() -> None:
    assert hms(3725) == "1:02:05" and hms(59.6) == "0:01:00" and hms(None) == "-:--:--"


def test_rate_is_over_the_last_minute_and_eta_is_h_mm_ss() -> None:
    clock, out = FakeClock(), io.StringIO()
    view = ProgressView(out, tty=False, clock=clock)
    progress = FakeProgress(rows_total=3630, workers_active=1)
    view.update(progress)
    clock.now += 30
    progress.rows_done = 30
    view.update(progress)
    assert view.rate() == pytest.approx(1.0)
    assert "30/3630 images  1.00/s  ETA 1:00:00  0 failed  workers 1 active, 0 pending" \
        in view.line()
    # Nothing finishes for two minutes: the rate over the last minute falls to 0 (the
    # whole-run average would still claim ~0.2/s) and the ETA becomes unknown.
    for _ in range(12):
        clock.now += 10
        view.tick()
    assert view.rate() == 0.0 and "ETA -:--:--" in view.line()


def test_the_timer_redraws_without_a_shard_event() -> None:
    """Between pool callbacks (model loading, a slow batch) the line still moves: the timer
    thread ticks on its own. Without it, only `update` would ever print."""
    clock, out = FakeClock(), io.StringIO()
    view = ProgressView(out, tty=False, interval=10.0, refresh=0.01, clock=clock)
    progress = FakeProgress(rows_total=10, workers_pending=1, waiting_for="CPU: 1")
    view.update(progress)  # the one and only callback
    view.start()
    try:
        progress.rows_done, progress.workers_active, progress.workers_pending = 4, 1, 0
        progress.waiting_for = ""
        clock.now += 11
        deadline = time.monotonic() + 10
        while out.getvalue().count("\n") < 2 and time.monotonic() < deadline:
            threading.Event().wait(0.01)
    finally:
        view.stop()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("0/10 images") and "(waiting for CPU: 1)" in lines[0]
    assert lines[1].startswith("4/10 images") and "workers 1 active, 0 pending" in lines[1]


def test_off_a_terminal_one_plain_line_per_interval() -> None:
    clock, out = FakeClock(), io.StringIO()
    view = ProgressView(out, tty=False, interval=10.0, clock=clock)
    progress = FakeProgress(rows_total=100)
    for done in range(0, 50, 5):  # many events within 9 s: one line
        progress.rows_done = done
        clock.now += 1
        view.update(progress)
        view.tick()
    clock.now += 10
    view.tick()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\x1b" not in out.getvalue()  # no terminal control codes
    assert lines[1].startswith("45/100 images")


def test_on_a_terminal_a_live_bar_that_is_erased_at_the_end() -> None:
    out = io.StringIO()
    view = ProgressView(out, tty=True, refresh=60.0).start()
    progress = FakeProgress(rows_total=8, rows_done=3, failed=1, workers_active=2)
    view.update(progress)
    view.tick()
    view.stop()
    text = out.getvalue()
    assert "3/8 images" in text and "1 failed" in text and "━" in text  # the bar
    assert "\x1b[" in text  # drawn in place (cursor control), then cleared by stop()


# -- choices, version, help --------------------------------------------------------------------


def test_version() -> None:
    done = CliRunner().invoke(app, ["--version"])
    assert done.exit_code == 0 and done.output.strip() == f"deblur {__version__}"


@pytest.mark.parametrize("args, said", [
    (["--precision", "fp64"], "model.precision='fp64': choose one of"),
    (["--format", "gif"], "codec.output_format='gif': choose one of"),
    (["--model", "unet"], "model.name"),
])
def test_a_wrong_choice_is_one_line_and_exit_2(tmp_path: Path, args: list[str],
                                              said: str) -> None:
    done = CliRunner().invoke(app, ["run", str(tmp_path / "src"), str(tmp_path / "out"),
                                    "--random-weights", *args])
    assert done.exit_code == 2, done.output
    assert done.output.count("\n") == 1 and said in done.output, done.output


def test_choices_are_shown_in_help() -> None:
    runner = CliRunner()
    run_help = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "80"}).output
    assert "[auto|fp32|fp16|bf16]" in run_help and "[same|jpeg|png|webp]" in run_help
    assert "[mimo-unet|mimo-unet-plus|mimo-unet-plusplus|deblurgs]" in run_help
    assert "[debug|info|warning|error]" in run_help and "-v, --verbose" in run_help
    assert "[env var: RAY_ADDRESS]" in run_help
    plan_help = runner.invoke(app, ["plan", "--help"], env={"COLUMNS": "80"}).output
    assert "--gpu-type [" + "|".join(GPU_TYPES) + "]" in plan_help


def test_gpu_type_choices_match_the_measured_table() -> None:
    from deblur.job.estimate import THROUGHPUT

    assert set(GPU_TYPES) == {gpu for gpu, _ in THROUGHPUT}, \
        "update deblur.cli.GPU_TYPES to the device types of estimate.THROUGHPUT"


@pytest.mark.parametrize("command", ["run", "rerun", "submit", "status", "list", "plan",
                                     "report", "cancel", "manifest", "samples", "train"])
def test_help_is_legible_at_80_columns(command: str) -> None:
    done = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    assert all(len(line) <= 80 for line in lines), [l for l in lines if len(l) > 80]
    assert not [l for l in lines if l.rstrip().endswith("…")], done.output  # nothing cut off
    # A word split at its hyphen across lines (`[default: no-` / `force]`) reads badly.
    assert not [l for l in lines if re.search(r"[a-z]-$", l.rstrip())], done.output


# -- status and list ---------------------------------------------------------------------------


def _finished_job(tmp_path: Path) -> Ledger:
    storage = Storage()
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    for i in range(3):
        storage.put(join(src, f"{i}.jpg"), jpeg(8, 8, i))
    job = job_config(src, out, default_job_root(out, "j1"))
    ledger = Ledger.create(storage, job, job_id="j1", model_info={
        "name": "mimo-unet", "weights": None, "weights_sha256": None, "random_weights": True})
    ledger.write_summary({
        "state": "finished", "total": 3, "ok": 0, "failed": 0, "pending": 3,
        "run": {"seconds": 30.0, "images": 8, "worker_seconds": 4.0, "images_per_s": 0.27},
        "quality": {"mean_sharpness_gain": 1.25, "sharpness_gain_count": 8}})
    return ledger


def test_throughput_definition() -> None:
    assert run_throughput({"run": {"images": 8, "worker_seconds": 4.0}}) == 2.0
    assert run_throughput({"run": {"images": 8, "worker_seconds": None}}) is None
    assert run_throughput(None) is None


def test_status_one_throughput_the_model_and_integer_counts(tmp_path: Path) -> None:
    ledger = _finished_job(tmp_path)
    done = CliRunner().invoke(app, ["status", ledger.job_root])
    assert done.exit_code == 0, done.output
    text = done.output
    assert text.count("images/s") == 1, text  # one throughput, not two that disagree
    assert "throughput: 2.00 images/s, last run (images per second of wall time while " \
           "workers ran)" in text
    assert "model: mimo-unet, RANDOM weights" in text
    assert "sharpness_gain_count 8," in text or text.rstrip().endswith("sharpness_gain_count 8")
    assert "8.000" not in text and "mean_sharpness_gain 1.250" in text
    as_json = json.loads(CliRunner().invoke(app, ["status", ledger.job_root, "--json"]).output)
    assert as_json["total"] == 3 and as_json["summary"]["run"]["images"] == 8
    assert as_json["images_per_s_while_workers_ran"] == 2.0


def test_list_is_a_table_and_json_on_request(tmp_path: Path) -> None:
    ledger = _finished_job(tmp_path)
    out = str(tmp_path / "out")
    table = CliRunner().invoke(app, ["list", out], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    header, *rows = [l for l in table.output.splitlines() if l.strip() and set(l) - set(" ─")]
    assert header.split() == ["JOB", "ID", "CREATED", "STATE", "OK", "FAILED", "PENDING",
                              "DESTINATION"]
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ledger.job()["created_at"]))
    assert rows[0].split() == ["j1", *created.split(), "finished", "0", "0", "3", out]
    listed = CliRunner().invoke(app, ["list", out, "--json"])
    (job,) = [json.loads(line) for line in listed.output.splitlines()]
    assert job["job_id"] == "j1" and job["pending"] == 3 and job["destination"] == out
    assert isinstance(job["created_at"], float)


# -- environment ------------------------------------------------------------------------------


def test_environment_settings_sit_between_the_file_and_the_flags(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEBLUR_SCHEDULER__MAX_WORKERS", "3")
    monkeypatch.setenv("DEBLUR_MODEL__PRECISION", "fp16")
    monkeypatch.setenv("DEBLUR_SHARD_SIZE", "50")
    monkeypatch.setenv("DEBLUR_TORCH_CPU_INDEX", "not a setting: left alone")
    flags = {"source": str(tmp_path / "src"), "destination": str(tmp_path / "o"),
             "model.random_weights": True, "model.precision": None}
    job = _load(None, flags)
    assert (job.scheduler.max_workers, job.model.precision, job.shard_size) == (3, "fp16", 50)
    job = _load(None, {**flags, "scheduler.max_workers": 2})  # a flag given wins
    assert job.scheduler.max_workers == 2


@pytest.mark.parametrize("name, value, said", [
    ("DEBLUR_SCHEDULER__MAX_WORKERS", "four", "DEBLUR_SCHEDULER__MAX_WORKERS='four': "
                                              "expected int"),
    ("DEBLUR_SCHEDULER__MAXWORKERS", "4", "DEBLUR_SCHEDULER__MAXWORKERS: no such setting"),
    ("DEBLUR_MODEL__PRECISION", "fp64", "model.precision='fp64'"),
])
def test_a_bad_environment_setting_is_one_line_and_exit_2(tmp_path: Path, name: str,
                                                          value: str, said: str) -> None:
    done = CliRunner().invoke(app, ["run", str(tmp_path / "src"), str(tmp_path / "out"),
                                    "--random-weights"], env={name: value})
    assert done.exit_code == 2, done.output
    assert done.output.count("\n") == 1 and said in done.output, done.output


# -- logging -----------------------------------------------------------------------------------


def test_library_logs_go_to_the_log_file_and_verbose_brings_them_back(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from deblur.console import attach_job_log, detach_job_log, setup_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging()
        logging.getLogger("ray._private.worker").info("before the log file is known")
        log = tmp_path / "driver.log"
        attach_job_log(str(log))
        logging.getLogger("ray._private.worker").warning("a ray line")
        logging.getLogger("deblur.run.pool").warning("a deblur warning")
        detach_job_log()
        err = capsys.readouterr().err
        assert "a ray line" not in err and "before the log" not in err
        assert "a deblur warning" in err
        text = log.read_text()
        assert "before the log file is known" in text and "a ray line" in text
        setup_logging(verbose=True)
        logging.getLogger("ray._private.worker").info("now shown")
        assert "now shown" in capsys.readouterr().err
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def test_a_bad_log_level_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = CliRunner().invoke(app, ["run", str(tmp_path / "src"), str(tmp_path / "out"),
                                    "--random-weights", "--log-level", "loud"])
    assert done.exit_code == 2 and done.output.count("\n") == 1, done.output
    assert "--log-level 'loud'" in done.output


def test_the_log_file_lives_with_the_job(root: str, storage: Storage) -> None:
    """Under a local job root's logs/; for an s3:// root a local file, copied under the job
    root's logs/ when the run ends (so it outlives the machine that ran the driver)."""
    import tempfile

    from deblur.cli import _keep_log
    from deblur.console import job_log_path
    from tests.conftest import make_job

    ledger = make_job(root, {"a.jpg": jpeg(8, 8)}, storage)
    path = job_log_path(ledger.job_root, "test")
    Path(path).write_text("INFO ray._private.worker: Started a local Ray instance.\n")
    _keep_log(ledger, path)
    copies = [i for i in storage.list(join(ledger.job_root.rstrip("/"), "logs"), (".log",))]
    if root.startswith("s3://"):
        assert path.startswith(tempfile.gettempdir())
        (copy,) = copies
        assert b"Started a local Ray" in storage.get(copy.uri)
    else:
        assert Path(path) == Path(ledger.job_root, "logs", "driver.log")
        assert [c.key.rsplit("/", 1)[-1] for c in copies] == ["driver.log"]  # no copy needed


def test_the_command_list_is_not_cut_at_80_columns() -> None:
    done = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80"})
    listed = done.output.split("Commands:", 1)[1].splitlines()
    cut = [line for line in listed if line.rstrip().endswith("...")]
    assert not cut, done.output
    assert "--version" in done.output
