"""What `deblur run` and `rerun` show the operator: a progress line refreshed by a timer, and
logging routed so Ray's and libraries' lines land in the job's log file, not the terminal.

Light on purpose (no torch, ray or pyarrow): the CLI imports it before anything starts.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable
from typing import Any, TextIO

PLAIN_INTERVAL_S = 10.0
"""Seconds between plain progress lines when the stream is not a terminal (CI logs, files)."""
REFRESH_S = 0.5
"""How often the timer redraws: at least once a second even when no shard event arrives
(model loading, a slow first batch), so the rate and ETA never look frozen."""
RATE_WINDOW_S = 60.0
"""The images/s shown is over this last stretch, so it follows the job's current pace."""


def printable(text: object, *, keep_newlines: bool = False) -> str:
    """``text`` as a person may see it: every character that could drive a terminal or
    reorder what is shown is written as a visible escape (``\\x1b``, ``\\u202e``).

    Keys and messages come from users' data, and a terminal acts on what it is sent: ESC and
    C1 controls (CSI is U+009B) start sequences that retitle the window or rewrite the screen,
    CR and BEL move the cursor or ring, bidi overrides and isolates (U+202A-202E,
    U+2066-2069) and other format characters (zero-width, U+FEFF) reorder or hide text, and
    line separators forge lines. So everything ``str.isprintable`` refuses is escaped, except
    the ordinary spaces (category Zs). ``keep_newlines``: a block of lines (a rendered report,
    a traceback) keeps its ``\\n``s; each line is escaped. Every human-facing output uses
    this (the CLI's lines, log lines, the HTML report); ``--json`` keeps the exact strings
    (JSON escapes them itself)."""
    text = str(text)
    if text.isprintable():  # the usual case, at C speed
        return text
    if keep_newlines:
        return "\n".join(printable(line) for line in text.split("\n"))
    return "".join(c if c.isprintable() or unicodedata.category(c) == "Zs"
                   else repr(c)[1:-1] for c in text)


class PrintableFormatter(logging.Formatter):
    """A log formatter whose lines carry no raw control character (``printable``): the
    message is one line whatever it quotes; a traceback keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return printable(super().formatException(ei), keep_newlines=True)

    def formatStack(self, stack_info: str) -> str:
        return printable(super().formatStack(stack_info), keep_newlines=True)


def hms(seconds: float | None) -> str:
    """``h:mm:ss``; ``-:--:--`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "-:--:--"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class ProgressView:
    """One live line (a bar on a terminal, a plain log line every ``interval`` s otherwise).

    ``update`` is the pool's progress callback (it keeps the latest ``Progress``); a timer
    thread started by ``start`` calls ``tick``, which samples ``rows_done`` and redraws, so the
    line moves between shard events. ``clock`` is injectable so tests need no real waiting.
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None,
                 interval: float = PLAIN_INTERVAL_S, refresh: float = REFRESH_S,
                 clock: Callable[[], float] = time.monotonic,
                 window: float = RATE_WINDOW_S, scenes: bool = False) -> None:
        self.scenes = scenes  # a scene job: a shard is a scene, counted first on the line
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval, self.refresh, self.clock, self.window = interval, refresh, clock, window
        self.progress: Any = None
        self.samples: collections.deque[tuple[float, int]] = collections.deque()
        self.last_plain: float | None = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.live: Any = None

    # -- what the line says --------------------------------------------------------------

    def _sample(self) -> None:
        now = self.clock()
        sample = (now, int(self.progress.rows_done))
        if len(self.samples) > 1 and now - self.samples[-2][0] < 1.0:
            self.samples[-1] = sample  # the pool calls back often: keep ~1 sample a second
        else:
            self.samples.append(sample)
        # Keep one sample at or before the window's start, so the rate spans the full window.
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()

    def rate(self) -> float:
        """Images per second over the last ``window`` seconds (0 before two samples)."""
        if len(self.samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def line(self) -> str:
        p = self.progress
        if p is None:
            return "starting…"
        rate = self.rate()
        left = max(p.rows_total - p.rows_done, 0)
        eta = hms(left / rate) if rate > 0 else ("0:00:00" if left == 0 else hms(None))
        # Refreshed once a second by the pool: never shown once nothing is pending.
        waiting = getattr(p, "waiting_for", "") if p.workers_pending else ""
        scenes = f"{p.shards_done}/{p.shards_total} scenes  " if self.scenes else ""
        return (f"{scenes}{p.rows_done}/{p.rows_total} images  {rate:.2f}/s  ETA {eta}  "
                f"{p.failed} failed  workers {p.workers_active} active, "
                f"{p.workers_pending} pending"
                + (f" (waiting for {waiting})" if waiting else "")
                + (self._fitting(p) if self.scenes else ""))

    @staticmethod
    def _fitting(p: Any) -> str:
        """'  fitting scene 3: step 120/3000' for the scenes being optimised now (three at most
        by shard, then how many more), so a minutes-long fit visibly moves."""
        fitting = sorted(getattr(p, "fitting", {}).items())
        if not fitting:
            return ""
        shown = ", ".join(f"scene {shard}: step {step}/{steps}"
                          for shard, (step, steps) in fitting[:3])
        more = f" and {len(fitting) - 3} more" if len(fitting) > 3 else ""
        return f"  fitting {shown}{more}"

    def _renderable(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        p = self.progress
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True, overflow="ellipsis")  # one line, whatever the width
        grid.add_row(ProgressBar(total=max(p.rows_total, 1) if p else 1,
                                 completed=p.rows_done if p else 0, width=20),
                     self.line())
        return grid

    # -- driving it ------------------------------------------------------------------------

    def update(self, progress: Any) -> None:
        with self.lock:
            first = self.progress is None
            self.progress = progress
            self._sample()
        if first:
            self.tick()

    def tick(self) -> None:
        """Redraw (terminal) or print a plain line when ``interval`` has passed."""
        with self.lock:
            if self.progress is not None:
                self._sample()
            if self.tty:
                if self.live is not None:
                    self.live.update(self._renderable(), refresh=True)
                return
            now = self.clock()
            if self.progress is None or (self.last_plain is not None
                                         and now - self.last_plain < self.interval):
                return
            self.last_plain = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def start(self) -> ProgressView:
        if self.tty:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self.stream, force_terminal=True)
            # transient: the live line is erased at the end; the summary is its own block.
            # Log lines written to sys.stderr meanwhile are printed above the live line
            # (rich's proxy), not through it; stdout is left alone (it may carry --json).
            self.live = Live(self._renderable(), console=console, auto_refresh=False,
                             transient=True, redirect_stdout=False,
                             redirect_stderr=self.stream is sys.stderr)
            self.live.start()
        self.thread = threading.Thread(target=self._run, name="deblur-progress", daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stopped.wait(self.refresh):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a display error must never stop the job
                logging.getLogger("deblur.console").debug("progress redraw", exc_info=True)

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        with self.lock:
            if self.live is not None:
                self.live.stop()
                self.live = None


class LeaseCountdown:
    """The one live line shown while rerun or run --resume waits out another driver's lease:
    redrawn in place on a terminal, a plain line every ``interval`` s otherwise. Called with
    the seconds left, then with None when the wait ends (the line is erased)."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None,
                 interval: float = PLAIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval, self.clock = interval, clock
        self.last_plain: float | None = None

    @staticmethod
    def line(left: float) -> str:
        return f"waiting for the previous driver's lease: {hms(left)} left; Ctrl-C to stop"

    def __call__(self, left: float | None) -> None:
        if self.tty:
            # \r and erase-line: the line is redrawn in place, and gone once the wait ends.
            self.stream.write("\r\x1b[2K" + ("" if left is None else self.line(left)))
        elif left is not None:
            now = self.clock()
            if self.last_plain is not None and now - self.last_plain < self.interval:
                return
            self.last_plain = now
            self.stream.write(self.line(left) + "\n")
        self.stream.flush()


# -- logging -----------------------------------------------------------------------------------


class _Terminal(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest and rich swap it)."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose
        self.setFormatter(PrintableFormatter("%(levelname)s %(name)s: %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        # deblur's own warnings, and the driver's few INFO lines (the metrics URL); Ray and
        # the libraries only reach the job's log file.
        if record.name.startswith("deblur.run.driver"):
            return record.levelno >= logging.INFO
        return record.name.startswith("deblur") and record.levelno >= logging.WARNING

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            self.handleError(record)


class _Buffer(logging.Handler):
    """Keeps records until the job's log file is known (the job root comes from planning)."""

    LIMIT = 5000

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: collections.deque[logging.LogRecord] = collections.deque(
            maxlen=self.LIMIT)
        self.target: logging.Handler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.target is not None:
            if record.levelno >= self.target.level:
                self.target.handle(record)
        else:
            self.records.append(record)

    def attach(self, target: logging.Handler) -> None:
        self.target = target
        while self.records:
            record = self.records.popleft()
            if record.levelno >= target.level:
                target.handle(record)


_FILE = _Buffer()


def parse_level(text: str | None) -> int | None:
    """``debug``/``INFO``/… to a logging level; None when not given."""
    if text is None:
        return None
    level = logging.getLevelName(text.strip().upper())
    if not isinstance(level, int):
        from deblur.errors import ConfigError

        raise ConfigError(f"--log-level {text!r}: choose debug, info, warning or error")
    return level


def setup_logging(verbose: bool = False, level: int | None = None) -> None:
    """Root logging for a command: the terminal gets deblur's warnings (everything at
    ``level``, default INFO, with ``verbose``/``--log-level``); every record at INFO and up
    goes to the job's log file once ``attach_job_log`` names it."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, (_Terminal, _Buffer)):
            root.removeHandler(handler)
    loud = verbose or level is not None
    terminal = _Terminal(loud)
    terminal.setLevel(level if level is not None else logging.INFO)
    root.addHandler(terminal)
    root.addHandler(_FILE)
    root.setLevel(min(logging.INFO, level if level is not None else logging.INFO))
    logging.captureWarnings(True)  # libraries' warnings too: the log file, or -v
    quiet_ray_logger()


def quiet_ray_logger() -> None:
    """Ray's logger carries its own stderr handler and does not propagate; route it through
    ours instead (terminal only with -v, always the job's log file). Only touches a logger
    Ray has already created: importing Ray here would slow every command."""
    if "ray" not in sys.modules:
        return
    ray_log = logging.getLogger("ray")
    for handler in list(ray_log.handlers):
        ray_log.removeHandler(handler)
    ray_log.propagate = True


def job_log_path(job_root: str, job_id: str) -> str:
    """The run's local log file: under a local job root's ``logs/``; for an s3:// root, a
    local temporary folder (the file is copied under the job root when the run ends)."""
    from deblur.io.storage import is_s3, to_local_path

    if is_s3(job_root):
        folder = os.path.join(tempfile.gettempdir(), "deblur-logs", job_id)
    else:
        folder = os.path.join(to_local_path(job_root), "logs")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, "driver.log")


def attach_job_log(path: str) -> logging.Handler:
    """Send every record (those before, buffered, too) to ``path``, appended."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(min(logging.INFO, logging.getLogger().level or logging.INFO))
    handler.setFormatter(PrintableFormatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _FILE.attach(handler)
    return handler


def detach_job_log() -> None:
    if _FILE.target is not None:
        _FILE.target.close()
        _FILE.target = None
