"""Nothing a key contains may drive the terminal (issue 25, item 3).

Local files whose names carry ESC, an OSC title sequence, CR, BEL, a C1 CSI (U+009B) and a bidi
override (U+202E) go through a real `deblur run` (in-process Ray, random weights) and then
every human-facing command (`status`, `status --failed`, `list`, `report`, `plan`); no raw
control character reaches stdout or stderr, the job's log file or report.html, while `--json`
keeps the exact strings.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import unicodedata
from pathlib import Path

import pytest

from deblur.console import PrintableFormatter, printable

from .helpers import DEBLUR, jpeg

OSC_KEY = "evil\x1b]0;PWNED\x07\x1b[2Jx.jpg"  # retitles the window, clears the screen
CR_KEY = "over\rwrite.jpg"
# No ASCII control character: planned as a valid key, then refused by the decoder
# (unsupported_format), so the key also reaches the worker's message.
BIDI_KEY = "bad\u202e\u009b31mgpj.jpg"


def raw_controls(text: str) -> list[str]:
    """The characters of ``text`` a terminal would act on (newlines between lines are fine)."""
    return sorted({c for c in text if c != "\n" and not c.isprintable()
                   and unicodedata.category(c) != "Zs"})


def test_printable_escapes_every_kind_visibly() -> None:
    text = "a\x1b]0;T\x07b\rc\x00\x7f\x9b\u202e\u2066\u200b\u2028\ufeff d\u00a0e\t"
    shown = printable(text)
    assert raw_controls(shown) == []
    for escape in ("\\x1b", "\\x07", "\\r", "\\x00", "\\x7f", "\\x9b", "\\u202e", "\\u2066",
                   "\\u200b", "\\u2028", "\\ufeff", "\\t"):
        assert escape in shown, escape
    assert " d\u00a0e" in shown  # ordinary and no-break spaces stay as they are
    assert printable("plain key/é.jpg") == "plain key/é.jpg"
    assert printable("a\nb\x1b", keep_newlines=True) == "a\nb\\x1b"
    assert printable("a\nb") == "a\\nb"  # a key cannot forge a second line


def test_log_lines_are_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    record = logging.LogRecord("deblur.run.worker", logging.WARNING, __file__, 1,
                               "%s: no PSNR/SSIM", (OSC_KEY + "\nINFO forged line",), None)
    line = PrintableFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert raw_controls(line) == [] and "\n" not in line
    assert "evil\\x1b]0;PWNED\\x07" in line


@pytest.mark.integration
@pytest.mark.slow
def test_hostile_keys_never_reach_the_terminal(tmp_path: Path) -> None:
    # The destination is named by the user too, and shown by list, status and the run.
    src, out = tmp_path / "src", tmp_path / "out\x1b[2J\u202eevil"
    src.mkdir()
    (src / "fine.jpg").write_bytes(jpeg(40, 32, 1))
    (src / "\u202eright.jpg").write_bytes(jpeg(40, 32, 2))  # valid: processed ok
    for name in (OSC_KEY, CR_KEY):
        (src / name).write_bytes(jpeg(40, 32, 3))
    (src / BIDI_KEY).write_bytes(b"not an image")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}

    def deblur(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*DEBLUR, *args], capture_output=True, text=True, timeout=300,
                              env=env)
        assert done.returncode == code, done.stdout + done.stderr
        return done

    def said(*args: str) -> str:
        done = deblur(*args)
        return done.stdout + done.stderr

    run = deblur("run", str(src), str(out), "--random-weights", "--metrics-port", "0",
                 "--shard-size", "2", code=1)
    job = next((out / "_deblur").iterdir())
    job_root = str(job)
    assert f"job root: {tmp_path}/out\\x1b[2J\\u202eevil/_deblur/{job.name}/" in run.stdout
    log_path = str(job / "logs" / "driver.log")
    shown = {
        "run": run.stdout + run.stderr,
        "status": said("status", job_root),
        "status --failed": said("status", job_root, "--failed"),
        "list": said("list", str(out)),
        "report": said("report", job_root),
        "plan": said("plan", str(src), str(out)),
        "log file": Path(log_path).read_text(encoding="utf-8"),
        "report.html": (Path(job_root) / "report.html").read_text(encoding="utf-8"),
    }
    for where, text in shown.items():
        assert raw_controls(text) == [], f"{where}: {raw_controls(text)!r}\n{text}"
    # Each hostile key is named, visibly escaped, where failures are listed.
    for text in (shown["run"], shown["status --failed"]):
        assert "evil\\x1b]0;PWNED\\x07\\x1b[2Jx.jpg: invalid_key" in text, text
        assert "over\\rwrite.jpg: invalid_key" in text, text
        assert "bad\\u202e\\x9b31mgpj.jpg: unsupported_format" in text, text
    assert "evil\\x1b]0;PWNED" in shown["plan"] and "\\x9b" in shown["report.html"]

    # --json keeps the exact strings (JSON escapes them itself).
    rows = [json.loads(line) for line in
            deblur("status", job_root, "--failed", "--json").stdout.splitlines()]
    assert {Path(r["key"]).name for r in rows} == {OSC_KEY, CR_KEY, BIDI_KEY}
    assert json.loads(deblur("status", job_root, "--json").stdout)["failed"] == 3
