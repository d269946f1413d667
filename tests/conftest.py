"""Shared fixtures: real data folder (skips when absent), CLI runner."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VOXELFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))
BBB = SHARED_DATA / "big_buck_bunny_0_30.webm"
HAXBY = SHARED_DATA / "haxby2001_sub001"


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

# Idle OpenMP threads sleep instead of spinning (read once, when torch loads its OpenMP
# runtime: hence here, before any test module imports torch; CLI subprocesses inherit
# it).  Under ``pytest -n 2`` on 2 cores two workers run torch's 2 threads each, and
# spinning threads burn the cores the other worker's threads wait for: test_train.py
# took 239 CPU s spinning, 103 CPU s passive, same load.  Results are unchanged (it
# only decides what an idle thread does).  An explicit setting is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="module", autouse=True)
def thread_environment_restored():
    """Undo what a test module leaves in the thread variables of ``os.environ``.

    distributed's Nanny sets ``OMP_NUM_THREADS=1`` (its ``pre-spawn-environ``) in the
    *parent* process when it starts a worker, and never restores it; every CLI
    subprocess a later module starts would then run torch on 1 thread while the
    in-process reference runs on the default, and bitwise comparisons between them
    would depend on test order.
    """
    before = {k: os.environ.get(k) for k in THREAD_VARS}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def bbb_clip() -> Path:
    if not BBB.exists():
        pytest.skip(f"real clip not present: {BBB}")
    return BBB


@pytest.fixture
def haxby_dir() -> Path:
    if not HAXBY.exists():
        pytest.skip(f"real fMRI data not present: {HAXBY}")
    return HAXBY


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m voxelflow.cli ARGS`` in a subprocess (the real entry point), capture output."""
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "voxelflow.cli", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def cli_here(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """What :func:`run_cli` returns, from the CLI's entry point ``cli.main`` run in this
    process, in ``cwd`` (default the repository, as run_cli), with sys.stdout/stderr
    captured: no new interpreter, so no ~4 s of imports per command.  argparse's
    usage errors give their exit status; any other exception propagates (a subprocess
    would exit 1 with the traceback: the test fails either way).  Kill tests and the
    console script itself (tests/test_packaging.py) still need a real process."""
    from voxelflow import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd or ROOT), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as exc:  # argparse: usage errors (2)
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["voxelflow", *args], int(code or 0), out.getvalue(),
                                       err.getvalue())


def cli_main(capsys, *args: str) -> tuple[int, str, str]:
    """The real CLI entry point, in process (fast): exit status, stdout, stderr."""
    from voxelflow import cli

    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def cli_error(capsys, *argv: str) -> str:
    """Run ``cli.main(argv)`` in process; assert exit 2 and one ``voxelflow: error:`` line."""
    from voxelflow import cli
    try:
        status = cli.main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        status = exc.code
    out = capsys.readouterr()
    assert status == 2, (out.out, out.err)
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("voxelflow: error: "), out.err
    return lines[0]


# The storage tests' fixtures (tests/stores): imported here rather than defined in a
# tests/stores/conftest.py, which would shadow this module for `from conftest import`.
from storage_fixtures import bold_runs, fit_inputs, forked, videos  # noqa: E402,F401
