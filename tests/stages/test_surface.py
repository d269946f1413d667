"""CIFTI-2 dtseries and GIFTI func runs in (``voxelflow bold``), dscalar / dtseries /
GIFTI out (``voxelflow export``): files written with nibabel's own axis classes, round
trips bit for bit, coordinates against the brain-model axis."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from bids_inputs import TR, brain_models, write_dtseries, write_func_gii
from bold_inputs import cli_main
from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.stages.bold import run_bold_stage
from voxelflow.pipeline.stages.export import export_variable
from voxelflow.stores.workspace import Workspace


@pytest.fixture(scope="module")
def cifti_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifti")
    models = brain_models()
    rng = np.random.default_rng(3)
    data = [(50 + rng.standard_normal((20 + r, len(models)))).astype(np.float32)
            for r in range(2)]
    paths = [write_dtseries(root / f"run-{r}.dtseries.nii", d, models) for r, d in
             enumerate(data)]
    return paths, data, models


def test_cifti_in_and_out_bit_for_bit(tmp_path, cifti_runs):
    paths, data, models = cifti_runs
    ws = Workspace(tmp_path / "ws.zarr")
    summary = run_bold_stage(ws, paths, "c", zscore=False, chunk_voxels=8, progress=False)
    assert summary["tr"] == TR and summary["tr_source"] == "CIFTI series step"
    assert summary["voxels"] == len(models)
    for r, d in enumerate(data):
        np.testing.assert_array_equal(ws.open_run("bold/c", r)["bold"].values, d)
    group = ws.open_node("bold/c")
    np.testing.assert_array_equal(group["vertex"].values, models.vertex)
    np.testing.assert_array_equal(np.stack([group[c].values for c in "ijk"], 1), models.voxel)
    assert list(group["structure"].values) == list(models.name)
    # a run back out as a dtseries: same data, same brain models and series axis
    out = tmp_path / "run1.dtseries.nii"
    export_variable(ws, "bold/c/run-001", "bold", out)
    back = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(back.dataobj), data[1])
    assert back.header.get_axis(1) == models
    assert back.header.get_axis(0).step == TR
    # a (n, voxel) result as a dscalar, one map per row, names from the coordinate
    out = tmp_path / "stats.dscalar.nii"
    export_variable(ws, "bold/c", "raw_mean", out)
    back = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(back.dataobj),
                                  np.stack([d.mean(0, dtype=np.float64) for d in data]
                                           ).astype(np.float32))
    assert back.header.get_axis(1) == models
    assert isinstance(back.header.get_axis(0), nib.cifti2.cifti2_axes.ScalarAxis)


def test_cifti_structures_and_standardised(tmp_path, cifti_runs):
    paths, data, models = cifti_runs
    ws = Workspace(tmp_path / "ws.zarr")
    run_bold_stage(ws, paths, "ctx", structures=["CORTEX_LEFT", "CortexRight"],
                   chunk_voxels=4, progress=False)
    keep = np.isin(models.name, ["CIFTI_STRUCTURE_CORTEX_LEFT", "CIFTI_STRUCTURE_CORTEX_RIGHT"])
    x = data[0][:, keep].astype(np.float64)
    ref = (x - x.mean(0)) / x.std(0)
    np.testing.assert_allclose(ws.open_run("bold/ctx", 0)["bold"].values, ref, atol=1e-5)
    out = tmp_path / "mean.dscalar.nii"
    export_variable(ws, "bold/ctx", "mean", out)
    assert nib.load(str(out)).header.get_axis(1) == models[keep]
    with pytest.raises(InputError, match="no such brain model.*CORTEX_LEFT"):
        run_bold_stage(ws, paths, "bad", structures=["CEREBELLUM"], progress=False)
    with pytest.raises(InputError, match=r"export to \.dscalar\.nii"):
        export_variable(ws, "bold/ctx", "mean", tmp_path / "mean.nii.gz")


def test_gifti_pairs_in_and_out(tmp_path, capsys):
    rng = np.random.default_rng(5)
    data = {(r, h): (10 + rng.standard_normal((18, n))).astype(np.float32)
            for r in range(2) for h, n in (("L", 12), ("R", 9))}
    files = [str(write_func_gii(tmp_path / f"sub-01_run-{r}_hemi-{h}.func.gii", data[r, h], h))
             for r in range(2) for h in "LR"]
    store = str(tmp_path / "ws.zarr")
    code, out, err = cli_main(capsys, "bold", *files, "--hemi", "L", "R", "--subject", "g",
                              "--no-zscore", "--chunk-voxels", "8", "--store", store)
    assert code == 0, err
    assert "21 voxels" in out and "GIFTI TimeStep" in out
    ws = Workspace(store)
    for r in range(2):
        np.testing.assert_array_equal(ws.open_run("bold/g", r)["bold"].values,
                                      np.concatenate([data[r, "L"], data[r, "R"]], axis=1))
    assert list(ws.open_node("bold/g")["hemi"].values) == ["L"] * 12 + ["R"] * 9
    code, out, err = cli_main(capsys, "export", "bold/g/run-001", "bold",
                              str(tmp_path / "r1.func.gii"), "--store", store)
    assert code == 0, err
    for h in "LR":
        back = nib.load(str(tmp_path / f"r1_hemi-{h}.func.gii"))
        np.testing.assert_array_equal(np.stack([d.data for d in back.darrays]), data[1, h])
        assert back.meta["AnatomicalStructurePrimary"] == {"L": "CortexLeft",
                                                           "R": "CortexRight"}[h]
    code, out, err = cli_main(capsys, "bold", *files[:3], "--hemi", "L", "R", "--subject", "x",
                              "--store", store)
    assert code == 2 and "cannot be grouped by --hemi L R" in err
