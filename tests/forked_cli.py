"""Run the real CLI in child processes that can be killed at a named write step, fast.

Starting ``python -m voxelflow.cli`` costs seconds of imports (xarray, dask, zarr); a
crash test that kills a child at a dozen points would spend minutes importing.
:class:`ForkedCLI` starts one helper process that imports the CLI once (and starts no
thread), then forks a fresh child per command: each child is a separate process with
its own pid and its own Zarr threads, running ``voxelflow.cli.main(argv)``.

* ``fault="STEP[@N]"`` sets ``VOXELFLOW_FAULT`` in the child: it SIGKILLs itself the
  N-th time it reaches that step (:mod:`voxelflow.stores.faults`).
* ``hold="STEP[@N]"`` makes the child stop at that step instead, create the file
  ``<hold_dir>/held`` and wait until ``<hold_dir>/go`` exists (an observed state for
  the test to act on: no sleeps, no timing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_HELPER = r"""
import importlib, json, os, sys, threading, time
from voxelflow import cli
from voxelflow.stores import faults

for _name in sys.argv[1:]:  # modules every child would import anyway (torch: seconds)
    importlib.import_module(_name)

def hold_at(spec, folder):
    name, _, nth = spec.partition("@")
    seen = [0]
    real = faults.fault_point
    def point(step):
        real(step)
        if step == name:
            seen[0] += 1
            if seen[0] == int(nth or 1):
                open(os.path.join(folder, "held"), "w").close()
                while not os.path.exists(os.path.join(folder, "go")):
                    time.sleep(0.01)
    faults.fault_point = point
    import voxelflow.stores.stage as stage, voxelflow.stores.replace as replace
    stage.fault_point = replace.fault_point = point

ended = {}

def code_of(status):
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "wait":
        if cmd["pid"] not in ended:
            ended[cmd["pid"]] = code_of(os.waitpid(cmd["pid"], 0)[1])
        print(json.dumps({"status": ended.pop(cmd["pid"])}), flush=True)
        continue
    if cmd["op"] == "poll":
        if cmd["pid"] not in ended:
            pid, status = os.waitpid(cmd["pid"], os.WNOHANG)
            if pid:
                ended[cmd["pid"]] = code_of(status)
        print(json.dumps({"alive": cmd["pid"] not in ended}), flush=True)
        continue
    if threading.active_count() != 1:
        print(json.dumps({"error": "threads before fork"}), flush=True)
        continue
    pid = os.fork()
    if pid:
        print(json.dumps({"pid": pid}), flush=True)
        continue
    try:
        os.chdir(cmd["cwd"])
        out = os.open(cmd["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err = os.open(cmd["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdin.close()
        if cmd.get("fault"):
            os.environ["VOXELFLOW_FAULT"] = cmd["fault"]
        if cmd.get("hold"):
            hold_at(cmd["hold"], cmd["hold_dir"])
        sys.argv = ["voxelflow", *cmd["argv"]]
        code = cli.main(cmd["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
"""


class ForkedCLI:
    """One import of the CLI, a forked child per command (see the module docstring)."""

    def __init__(self, workdir: Path, preload: tuple[str, ...] = ()) -> None:
        """``preload``: modules the helper imports once before forking (e.g. ``torch``
        for ``voxelflow features`` children); importing starts no thread."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "VOXELFLOW_FAULT"}
        self._proc = subprocess.Popen([sys.executable, "-c", _HELPER, *preload],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      env=env)
        self._n = 0

    def _ask(self, cmd: dict) -> dict:
        self._proc.stdin.write(json.dumps(cmd) + "\n")
        self._proc.stdin.flush()
        reply = json.loads(self._proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def start(self, *argv: str, cwd: Path | None = None, fault: str | None = None,
              hold: str | None = None, hold_dir: Path | None = None) -> tuple[int, Path, Path]:
        """Fork a child running ``voxelflow ARGV``; return ``(pid, stdout file, stderr file)``."""
        self._n += 1
        out, err = self.workdir / f"{self._n}.out", self.workdir / f"{self._n}.err"
        reply = self._ask({"op": "start", "argv": list(argv), "cwd": str(cwd or self.workdir),
                           "out": str(out), "err": str(err), "fault": fault, "hold": hold,
                           "hold_dir": str(hold_dir) if hold_dir else None})
        return reply["pid"], out, err

    def wait(self, pid: int) -> int:
        """The child's exit status (``-9`` when it was SIGKILLed)."""
        return self._ask({"op": "wait", "pid": pid})["status"]

    def alive(self, pid: int) -> bool:
        """Whether the child is still running."""
        return self._ask({"op": "poll", "pid": pid})["alive"]

    def run(self, *argv: str, **kwargs) -> tuple[int, str, str]:
        """Run ``voxelflow ARGV`` to its end: ``(status, stdout, stderr)``."""
        pid, out, err = self.start(*argv, **kwargs)
        status = self.wait(pid)
        return status, out.read_text(), err.read_text()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait()
