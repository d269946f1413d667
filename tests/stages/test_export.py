"""Export of per-voxel results to NIfTI: a bold group's mean against nibabel and nilearn,
an (alpha, voxel) result through a bold_group attr, a real fit's r_test through the
CLI, and bad requests."""

from __future__ import annotations

import dask.array as da
import nibabel as nib
import numpy as np
import pytest
import xarray as xr

from bold_inputs import cli_main, haxby_runs, make_synthetic, mask_of, write_nifti
from conftest import cli_here
from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.stages.bold import run_bold_stage
from voxelflow.pipeline.stages.export import export_variable
from voxelflow.stores import RunTemplate, Workspace


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    return make_synthetic(tmp_path_factory.mktemp("synthetic"))


def test_export_mean_round_trip_cli(tmp_path, haxby_dir, capsys):
    # Three of the twelve runs: a mean over runs all the same (the ingest of all twelve
    # is checked against NumPy in test_bold.py).
    runs = haxby_runs(haxby_dir)[:3]
    mask_path = haxby_dir / "masks" / "brain.nii.gz"
    store = tmp_path / "ws.zarr"
    code, out, err = cli_main(capsys, "bold", *map(str, runs), "--subject", "sub1", "--mask",
                              str(mask_path), "--store", str(store), "--no-progress")
    assert code == 0, err
    assert "3 run(s), 3 x 121 volumes, 129 voxels, TR 2.5 s" in out
    assert "invalid voxels: 0 of 129" in out
    out = tmp_path / "mean.nii.gz"
    res = cli_here("export", "bold/sub1", "mean", str(out), "--store", str(store))
    assert res.returncode == 0, res.stderr
    assert str(out) in res.stdout

    mask = mask_of(mask_path)
    means = np.concatenate([nib.load(str(p)).get_fdata()[mask] for p in runs], axis=1).mean(1)
    img = nib.load(str(out))
    source = nib.load(str(runs[0]))
    assert img.shape == (6, 10, 10) and img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(img.affine, source.affine)
    np.testing.assert_array_equal(img.header.get_zooms(), source.header.get_zooms()[:3])
    data = img.get_fdata()
    np.testing.assert_allclose(data[mask], means, rtol=1e-6)
    assert (data[~mask] == 0).all()
    # nilearn reads it too, on the same grid as the mask
    from nilearn.masking import apply_mask

    np.testing.assert_allclose(apply_mask(str(out), str(mask_path)), means, rtol=1e-6)



def test_export_alpha_by_voxel_result_through_bold_group_attr(tmp_path, synthetic):
    ws = Workspace(tmp_path / "ws.zarr")
    run_bold_stage(ws, synthetic["runs"], "s", mask=synthetic["mask"], chunk_voxels=64,
                   progress=False)
    n_vox = int(synthetic["mask_bool"].sum())
    alphas = np.array([0.1, 10.0, 1000.0])
    rng = np.random.default_rng(0)
    r_test = rng.uniform(-1, 1, (alphas.size, n_vox)).astype(np.float32)
    fit = xr.Dataset({"r_test": (("alpha", "voxel"), r_test),
                      "best_alpha": ("voxel", alphas[rng.integers(0, 3, n_vox)]),
                      "note": ("alpha", np.arange(3))},
                     coords={"alpha": alphas}, attrs={"bold_group": "bold/s"})
    ws.write_dataset("fits/e/m/lags", fit, {"test": 1})

    summary = export_variable(ws, "fits/e/m/lags", "r_test", tmp_path / "r.nii")
    img = nib.load(str(tmp_path / "r.nii"))
    assert img.shape == (10, 8, 6, 3) and summary["dim"] == "alpha"
    np.testing.assert_allclose(img.affine, synthetic["affine"])
    data = img.get_fdata()
    for a in range(3):
        np.testing.assert_allclose(data[..., a][synthetic["mask_bool"]], r_test[a], rtol=1e-7)
        assert (data[..., a][~synthetic["mask_bool"]] == 0).all()
    export_variable(ws, "fits/e/m/lags", "best_alpha", tmp_path / "best.nii.gz")
    best = nib.load(str(tmp_path / "best.nii.gz")).get_fdata()
    np.testing.assert_allclose(best[synthetic["mask_bool"]], fit["best_alpha"].values)
    # per-run statistics of the bold group itself: one volume per run
    export_variable(ws, "bold/s", "raw_std", tmp_path / "std.nii.gz")
    assert nib.load(str(tmp_path / "std.nii.gz")).shape == (10, 8, 6, 2)
    # the saved mask is already a volume on the grid: written as is
    export_variable(ws, "bold/s", "mask", tmp_path / "mask.nii.gz")
    mask_img = nib.load(str(tmp_path / "mask.nii.gz"))
    assert mask_img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(mask_img.dataobj) != 0, synthetic["mask_bool"])

    with pytest.raises(InputError, match="no 'voxel'"):
        export_variable(ws, "fits/e/m/lags", "note", tmp_path / "x.nii.gz")
    with pytest.raises(InputError, match="has no variable 'nope'.*r_test"):
        export_variable(ws, "fits/e/m/lags", "nope", tmp_path / "x.nii.gz")
    ws.write_dataset("fits/e/m/orphan", fit.drop_attrs(), {"test": 1})
    with pytest.raises(InputError, match="bold_group"):
        export_variable(ws, "fits/e/m/orphan", "r_test", tmp_path / "x.nii.gz")
    with pytest.raises(InputError, match=r"\.nii or \.nii\.gz"):
        export_variable(ws, "bold/s", "mean", tmp_path / "x.png")



def test_bad_export_requests(tmp_path, synthetic, capsys):
    store = tmp_path / "ws.zarr"
    code, out, err = cli_main(capsys, "export", "bold/none", "mean", str(tmp_path / "o.nii"),
                              "--store", str(store))
    assert code == 2 and "no workspace" in err
    run_bold_stage(Workspace(store), synthetic["runs"][:1], "s", mask=synthetic["mask"],
                   progress=False)
    code, out, err = cli_main(capsys, "export", "bold/other", "mean", str(tmp_path / "o.nii"),
                              "--store", str(store))
    assert code == 2 and "no group /bold/other" in err and "complete bold groups: s" in err
    code, out, err = cli_main(capsys, "export", "bold/s", "bold", str(tmp_path / "o.nii"),
                              "--store", str(store))
    assert code == 2 and "no variable 'bold'" in err and "mean" in err
    code, out, err = cli_main(capsys, "export", "bold/s", "mean",
                              str(tmp_path / "nodir" / "o.nii"), "--store", str(store))
    assert code == 2 and "does not exist" in err


# ------------------------------------------------------------ a real fit's r_test
def _features_group(ws: Workspace, name: str, runs: list[np.ndarray], fps: float) -> None:
    """A complete ``/features/<name>``: per run one ``(time, feature)`` float32 block."""

    def template(f: np.ndarray) -> RunTemplate:
        var = da.empty(f.shape, np.float32, chunks=f.shape)
        ds = xr.Dataset({"features": (("time", "feature"), var)},
                        coords={"time": ("time", np.arange(len(f)) / fps, {"units": "s"})})
        return RunTemplate(ds, {"features": {"chunks": f.shape}}, "time", len(f))

    writer = ws.start_stage(f"features/{name}", {"stage": "test"}, [template(f) for f in runs])
    for run, f in enumerate(runs):
        writer.write_block(run, 0, {"features": f.astype(np.float32)})
    writer.finish()


def test_export_of_a_fit_r_test_through_the_cli(tmp_path, capsys):
    """`voxelflow export fits/NAME/lags-L r_test OUT`: a 4D map, one volume per alpha."""
    rng = np.random.default_rng(11)
    shape, n_vol, fps, lag = (5, 4, 3), 60, 2.0, 2.0
    affine = np.array([[2.0, 0, 0, -10], [0, 2.5, 0, -8], [0, 0, 3.0, -9], [0, 0, 0, 1]])
    mask = rng.random(shape) < 0.5
    write_nifti(tmp_path / "mask.nii.gz", mask.astype(np.uint8), affine)
    feats, runs = [], []
    for r in range(2):
        f = np.repeat(rng.normal(size=(n_vol, 4)), int(fps), axis=0)  # (time at fps, feature)
        shifted = np.roll(f[:: int(fps)], int(lag), axis=0)  # the response at t is f(t - lag)
        signal = shifted @ rng.normal(size=(4, mask.sum())) + rng.normal(size=(n_vol, mask.sum()))
        vol = np.zeros(shape + (n_vol,), np.float32)
        vol[mask] = 100 + signal.T
        runs.append(write_nifti(tmp_path / f"run{r}.nii.gz", vol, affine, tr=1.0))
        feats.append(f)
    store = tmp_path / "ws.zarr"
    code, _, err = cli_main(capsys, "bold", *map(str, runs), "--subject", "s", "--mask",
                            str(tmp_path / "mask.nii.gz"), "--store", str(store),
                            "--no-progress")
    assert code == 0, err
    _features_group(Workspace(store), "f", feats, fps)
    code, _, err = cli_main(capsys, "fit", "--features", "f", "--bold", "s", "--lags", "2",
                            "--alphas", "1,10,100", "--test-samples", "20", "--cv", "3",
                            "--store", str(store), "--no-progress")
    assert code == 0, err

    out = tmp_path / "r_test.nii.gz"
    res = cli_here("export", "fits/f__s/lags-2", "r_test", str(out), "--store", str(store))
    assert res.returncode == 0, res.stderr
    assert "4D NIfTI 5x4x3x3" in res.stdout and "alpha[n] (1, 10, 100)" in res.stdout
    r_test = Workspace(store).open_node("fits/f__s/lags-2")["r_test"].values  # (alpha, voxel)
    assert r_test.shape == (3, mask.sum()) and np.isfinite(r_test).all()
    img = nib.load(str(out))
    assert img.shape == shape + (3,) and img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(img.affine, nib.load(str(runs[0])).affine)
    np.testing.assert_array_equal(img.affine, affine)
    data = np.asarray(img.dataobj)
    i, j, k = np.nonzero(mask)  # the stored voxel order: C order of the mask
    for a in range(3):
        np.testing.assert_array_equal(data[i, j, k, a], r_test[a])
        assert (data[..., a][~mask] == 0).all()
