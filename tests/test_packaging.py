"""The installed package: one namespaced import path, checked from a built wheel.

Builds a wheel of this checkout, installs it (without dependencies) into a fresh
virtual environment that borrows the test environment's dependencies through a
``.pth`` line, and runs it from an unrelated directory: ``import voxelflow`` works,
the console script works on real input, and no generic top-level module (``cli``,
``pipeline``, ``stores``) is installed.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

GENERIC = ("cli", "pipeline", "stores")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                           str(out), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (found,) = out.glob("voxelflow-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with only the wheel installed, dependencies borrowed by a .pth."""
    home = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True)
    python = home / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig;print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # This environment's dependency folders; the .pth files inside them (this checkout's
    # editable install among them) are not read when a folder comes from a .pth line.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "zz_test_deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    return home


def test_wheel_holds_only_the_voxelflow_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"voxelflow"}, top
    for module in ("voxelflow/__init__.py", "voxelflow/cli.py",
                   "voxelflow/stores/workspace.py", "voxelflow/pipeline/stages/frames.py",
                   "voxelflow/pipeline/ridge/__init__.py"):
        assert module in names, module
    assert not [n for n in names if n.startswith(("voxelflow/tests/", "voxelflow/benchmarks/"))]
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert "voxelflow = voxelflow.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def test_installed_wheel_imports_as_voxelflow_only(venv, tmp_path):
    code = (
        "import importlib.util, voxelflow, voxelflow.cli, voxelflow.stores;"
        "print(voxelflow.__file__);"
        f"print([m for m in {GENERIC!r} if importlib.util.find_spec(m) is not None])"
    )
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    location, generic = proc.stdout.strip().splitlines()
    assert Path(location).is_relative_to(venv), location  # the wheel, not this checkout
    assert generic == "[]", f"generic top-level modules installed: {generic}"


def test_installed_console_script_runs_a_stage(venv, tmp_path):
    from voxelflow.pipeline.synthetic.movies import write_moving_video

    video = tmp_path / "clip.mp4"
    write_moving_video(video, 2.0, rate=10, size=(48, 64))
    proc = subprocess.run([str(venv / "bin" / "voxelflow"), "frames", str(video), "--name",
                           "clip", "--fps", "2", "--size", "32", "--store", "w.zarr",
                           "--no-progress"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    import xarray as xr

    tree = xr.open_datatree(tmp_path / "w.zarr", engine="zarr")
    assert tree["frames/clip/run-000"]["frames"].shape == (4, 32, 32, 3)
