"""The quick tier stays quick: tests/conftest.py marks and checks what would not belong in it.

Each test here runs a small pytest session of its own (a child process, with this suite's
conftest) so that what the hooks do to a test shows in that session's outcome.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import QUICK_MARKEXPR

REPO = Path(__file__).resolve().parent.parent


def _pytest(folder: Path, body: str, *args: str) -> subprocess.CompletedProcess:
    """pytest on ``folder``/test_inner.py (``body``) with this suite's hooks and fixtures."""
    (folder / "conftest.py").write_text("from tests.conftest import *  # noqa: F401,F403\n")
    (folder / "test_inner.py").write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning", *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def test_a_test_using_a_server_fixture_is_left_out_of_the_quick_tier(tmp_path: Path) -> None:
    """Marked at collection from the fixtures it uses, also through another fixture and for
    the S3 half of ``root``; nothing is started to find that out."""
    done = _pytest(tmp_path, """
        import pytest

        @pytest.fixture()
        def bucket_prefix(s3_bucket):
            return s3_bucket + "/x"

        def test_plain():
            pass

        def test_direct(moto_server):
            pass

        def test_indirect(bucket_prefix):
            pass

        def test_both_stores(root):
            pass
    """, "--collect-only", "-m", QUICK_MARKEXPR)
    assert done.returncode == 0, done.stdout + done.stderr
    collected = {line.split("::")[-1] for line in done.stdout.splitlines() if "::" in line}
    assert collected == {"test_plain", "test_both_stores[local]"}, done.stdout


def test_the_users_of_the_shared_ray_run_one_after_another(tmp_path: Path) -> None:
    """The shared Ray is stopped before any test that does not use it (that test may start
    a Ray of its own), so its users are collected together: it starts once."""
    done = _pytest(tmp_path, """
        def test_a(shared_ray):
            pass

        def test_b():
            pass

        def test_c(shared_ray):
            pass

        def test_d():
            pass
    """, "--collect-only")
    assert done.returncode == 0, done.stdout + done.stderr
    order = [line.split("::")[-1] for line in done.stdout.splitlines() if "::" in line]
    assert order == ["test_a", "test_c", "test_b", "test_d"], done.stdout


def test_an_unmarked_test_that_runs_a_server_program_fails_naming_it(tmp_path: Path) -> None:
    """Only the program's name matters to the check (it sees every subprocess start), so a
    harmless program called `helm` stands for the real one."""
    program = tmp_path / "bin" / "helm"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    inner = tmp_path / "inner"
    inner.mkdir()
    done = _pytest(inner, f"""
        import subprocess

        import pytest

        def test_unmarked():
            subprocess.run([{str(program)!r}, "version"], check=True)

        @pytest.mark.integration
        def test_marked():
            subprocess.run([{str(program)!r}, "version"], check=True)

        def test_unrelated_program():
            subprocess.run(["true"], check=True)
    """, "-rA")
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "3 passed, 1 error" in out, out  # the call passes; its teardown reports the error
    assert "ERROR test_inner.py::test_unmarked" in out, out
    assert "used helm but is not marked integration" in out, out


@pytest.mark.integration
def test_an_unmarked_test_that_asks_for_moto_by_name_fails_naming_it(tmp_path: Path) -> None:
    """``getfixturevalue`` hides a fixture from collection; the connection still shows."""
    done = _pytest(tmp_path, """
        import boto3

        def test_unmarked(request):
            request.getfixturevalue("moto_server")
            boto3.client("s3").list_buckets()

        def test_marked_through_its_fixture(moto_server):
            boto3.client("s3").list_buckets()
    """, "-rA")
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "2 passed, 1 error" in out, out
    assert "ERROR test_inner.py::test_unmarked" in out, out
    assert "used moto but is not marked integration" in out, out


@pytest.mark.integration
@pytest.mark.slow
def test_an_unmarked_test_that_starts_ray_fails_naming_it(tmp_path: Path) -> None:
    """A Ray started in the test's process, or by any process it runs, is seen: every Ray
    session of the run lands under the run's private RAY_TMPDIR."""
    done = _pytest(tmp_path, """
        import ray

        def test_unmarked():
            ray.init(address="local", num_cpus=1, include_dashboard=False,
                     configure_logging=False, log_to_driver=False)
            ray.shutdown()
    """, "-rA")
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "1 passed, 1 error" in out, out
    assert "used Ray but is not marked integration" in out, out


def test_every_module_queued_first_exists() -> None:
    """A module renamed or removed would silently fall back to collection order."""
    from tests.conftest import HEAVY_FIRST

    tests = Path(__file__).parent
    assert [m for m in HEAVY_FIRST if not (tests / m).is_file()] == []
