"""Frame blocks -> CNN feature blocks (torchvision classifiers, EfficientNet-Lite0, the
autoencoder's encoder).

``/frames/<name>/run-NNN``  frames   (time, y, x, rgb) uint8
``/features/<out>/run-NNN`` features (time, feature)  float32, same ``time``/``run``

Models, their layers, weights and preprocessing are :mod:`voxelflow.pipeline.models`
(:func:`~voxelflow.pipeline.models.registry.list_layers` gives the node names; the
default layer reproduces the study).  Outputs with more than one axis per sample are
flattened in C order (the shape is kept in the attrs as ``feature_shape``), or averaged
over space with ``pool="avg"``.  Several layers in one pass write one group each,
``/features/<out>.<layer>``.

Blocks and resume: a block is ``block_size`` time points of one run, one Zarr chunk
of every layer's array (the write unit), flagged done after its data.  Default: 1,024
time points (51 s at 20 fps; 8 MB for resnet50, 16 MB for vgg16 -- the DESIGN's
1,024 time points per feature chunk), halved (down to 16) until a block of all layers
is <= 64 MB, so flattened spatial layers keep memory bounded.  A kill loses at most
one block.  Batches never straddle blocks, so a resumed block is computed exactly as
in an uninterrupted run and the result is byte-identical.

Throughput: the per-block work is :class:`FeaturesWork`, run by
:func:`~voxelflow.pipeline.execution.blocks.run_blocks`.  Here, a reader thread
reads the block's next frames (a frames shard, 128, at a time; pinned for the GPU)
while the model runs, and a writer thread writes the previous feature block while the
next one is computed; the forward runs under ``torch.inference_mode`` in
channels_last, with optional autocast (``precision="bf16"|"fp16"``).  On a Dask
cluster each block is one task; every worker process builds the model once
(:func:`~voxelflow.pipeline.models.extractor.worker_extractor`).

Video models (``r3d_18``, ``s3d``, ``mvit_v2_s``, ``swin3d_t``, ...) get, per stored
time, the clip of ``clip_frames`` frames at ``clip_fps`` ending there
(:mod:`voxelflow.pipeline.stages.clips`): a block reads the frames its clips need,
also those before the block's start; the clip options are parameters of the group.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from voxelflow.pipeline.errors import InputError, WorkspaceConflict
from voxelflow.pipeline.execution.blocks import prefetch, run_blocks
from voxelflow.pipeline.execution.cluster import active_client, require_shared_path
from voxelflow.pipeline.execution.resources import check_request
from voxelflow.pipeline.stages.feature_arrays import (BLOCK_MAX, choose_block_size, feature_labels,
                                                      feature_template)
from voxelflow.pipeline.models.backbone import Backbone, load_backbone
from voxelflow.pipeline.models.extractor import (POOL_MODES, ClipExtractor, ExtractorSpec,
                                                 FeatureExtractor, check_device, worker_extractor)
from voxelflow.pipeline.models.registry import EFFICIENTNET_LITE0, check_layers, check_model
from voxelflow.pipeline.models.weights import weights_key
from voxelflow.pipeline.stages.clips import (DEFAULT_CLIP_BATCH, check_clip_options,
                                             plan_clip_runs, read_clips)
from voxelflow.stores.inventory import stored_bytes
from voxelflow.stores.names import check_name
from voxelflow.stores.workspace import (RunTemplate, StageWriter, Workspace,
                                        describe_param_change)

__all__ = ["FeatureBlock", "FeaturesWork", "choose_block_size", "features_group",
           "features_template", "output_names", "run_features_stage"]

DEFAULT_BATCH = {"cpu": 16, "cuda": 64}
QUEUE_BATCHES = 4  # frame batches read ahead
READ_FRAMES = 128  # frames per read from the frames store (one frames shard)
# The block being computed, the one being written and Zarr's chunk buffer (a chunk is a
# whole block, allocated in full even when a run is shorter).
FEATURES_BLOCKS_IN_MEMORY = 3


# ------------------------------------------------------------------------ layout
def features_group(name: str) -> str:
    return f"features/{name}"


def output_names(name: str, layers: Sequence[str]) -> list[str]:
    """Group name per layer: ``name`` for one layer, ``name.<layer>`` for several."""
    if len(layers) == 1:
        return [name]
    return [f"{name}.{layer}" for layer in layers]


def features_template(frames_run: xr.Dataset, run: int, n_features: int, block: int,
                      long_name: str, feature_shape: Sequence[int] | None = None
                      ) -> RunTemplate:
    """``features (time, feature) float32`` with the frames run's ``time``/``run`` coords
    and a ``feature`` coordinate naming each flattened unit (:func:`feature_labels` of
    ``feature_shape``, default ``(n_features,)``)."""
    times = frames_run["time"]
    names = feature_labels(feature_shape or (n_features,))
    if names.size != n_features:
        raise AssertionError(f"feature_shape {feature_shape} is not {n_features} features")
    return feature_template(np.asarray(times.values), run, names, block, long_name,
                            time_attrs=dict(times.attrs),
                            run_values=np.asarray(frames_run["run"].values),
                            run_attrs=dict(frames_run["run"].attrs))


# -------------------------------------------------------------- the per-block work
class FeatureBlock(NamedTuple):
    """One block to compute: time block ``block`` of ``run``, written into the groups of
    ``layers`` (indices into the pass's layers: those whose group still needs it)."""

    run: int
    block: int
    layers: tuple[int, ...]


@dataclass
class FeaturesWork:
    """Features of one block: the per-block work of the features stage.

    ``writers[i]`` writes layer ``i``'s group; ``n_features[i]`` is its width.
    :meth:`compute` reads ``frames[region]`` (time, y, x, rgb) uint8 of the block's run
    about one frames shard at a time on a reader thread, and runs the extractor in
    batches of ``batch_size`` frames counted from the block's start (so a block gives
    the same numbers wherever and whenever it is computed).  The extractor is
    ``extractor`` where the stage built one (this process), else the per-process one of
    ``spec`` (a cluster worker: built once, weights hash checked).  ``on_frames(n)``
    is called after each batch here (progress); neither travels to workers.
    ``clips`` (a video model): per run, the ``(n_times, clip_frames)`` stored positions
    of each time's clip; its inputs are then clips ``(B, clip_frames, H, W, 3)``.
    """

    writers: tuple[StageWriter, ...]
    frames_group: str
    spec: ExtractorSpec
    n_features: tuple[int, ...]
    batch_size: int
    extractor: FeatureExtractor | None = field(default=None, repr=False, compare=False)
    reuse: tuple[np.ndarray, ...] | None = None  # per run: old position per time, -1: compute
    on_frames: Callable[[int], Any] | None = field(default=None, repr=False, compare=False)
    clips: tuple[np.ndarray, ...] | None = None  # per run: clip positions (video models)

    def __getstate__(self) -> dict:
        # The model and the progress bar stay in the process that made them.
        return {**self.__dict__, "extractor": None, "on_frames": None}

    def compute(self, key: FeatureBlock) -> tuple[list[np.ndarray], float]:
        """``([float32 (n, n_features[i]) per layer], forward seconds)`` of block ``key``.

        The seconds are those spent in the forward passes and in copying their outputs
        to host memory (the rest of the stage's time is pipeline overhead).
        """
        extractor = self.extractor if self.extractor is not None else worker_extractor(self.spec)
        region = self.writers[0].block_slice(key.run, key.block)
        if self.reuse is not None:
            return self._compute_reusing(extractor, key, region)
        outs = [np.empty((region.stop - region.start, f), dtype=np.float32)
                for f in self.n_features]
        pin = extractor.device.type == "cuda"
        forward_s = 0.0
        for offset, frames in prefetch(self._batches(key.run, region, pin), QUEUE_BATCHES,
                                       name="voxelflow-features-reader"):
            t0 = time.perf_counter()
            feats = extractor(frames)
            for out, f in zip(outs, feats):
                out[offset:offset + f.shape[0]] = f.cpu().numpy()
            forward_s += time.perf_counter() - t0
            if self.on_frames is not None:
                self.on_frames(int(frames.shape[0]))
        return outs, forward_s

    def _compute_reusing(self, extractor: FeatureExtractor, key: FeatureBlock, region: slice
                         ) -> tuple[list[np.ndarray], float]:
        """An extension's block: features of the times the complete groups being
        replaced hold (as readers see them) copied, the others computed from their frames
        (batches of ``batch_size`` missing frames)."""
        import torch

        workspace = self.writers[0].workspace
        published = workspace.published()
        run, pos = key.run, self.reuse[key.run][region]
        held, missing = np.flatnonzero(pos >= 0), np.flatnonzero(pos < 0)
        outs = [np.empty((pos.size, f), dtype=np.float32) for f in self.n_features]
        if held.size:
            first, last = int(pos[held].min()), int(pos[held].max()) + 1
            for i in key.layers:  # the groups that still need this block
                out, writer = outs[i], self.writers[i]
                old = published.read_array(writer.run_path(run), "features",
                                           slice(first, last))
                out[held] = old[pos[held] - first]
        forward_s = 0.0
        if missing.size:
            frames = self._inputs(run, region, missing)
            for start in range(0, missing.size, self.batch_size):
                rows = missing[start:start + self.batch_size]
                t0 = time.perf_counter()
                feats = extractor(torch.from_numpy(frames[start:start + rows.size]))
                for out, f in zip(outs, feats):
                    out[rows] = f.cpu().numpy()
                forward_s += time.perf_counter() - t0
                if self.on_frames is not None:
                    self.on_frames(int(rows.size))
        return outs, forward_s

    def _inputs(self, run: int, region: slice, rows: np.ndarray) -> np.ndarray:
        """The model's uint8 inputs of ``region``'s ``rows`` (offsets in the block): frames
        ``(n, H, W, 3)``, or clips ``(n, clip_frames, H, W, 3)``."""
        workspace = self.writers[0].workspace
        node = Workspace.run_path(self.frames_group, run)
        if self.clips is not None:
            return read_clips(workspace, node, self.clips[run][region][rows])
        return workspace.read_array(node, "frames", slice(region.start, region.stop))[rows]

    def _batches(self, run: int, region: slice, pin: bool) -> Iterator[tuple[int, Any]]:
        """``(offset in the block, uint8 (B, H, W, 3) tensor)`` of every batch of ``region``
        (clips ``(B, clip_frames, H, W, 3)`` for a video model).

        Reads about one frames shard (128 frames, a whole number of batches) at a time,
        so per-read overhead is a small fraction; pinned for a CUDA device.  A block of
        clips reads the frames its clips need, also those before its start.
        """
        import torch

        workspace = self.writers[0].workspace
        node = Workspace.run_path(self.frames_group, run)
        size = self.batch_size
        per_input = 1 if self.clips is None else int(self.clips[run].shape[1])
        piece = size * max(1, READ_FRAMES // (size * per_input))
        for first in range(region.start, region.stop, piece):
            last = min(first + piece, region.stop)
            if self.clips is None:
                frames = workspace.read_array(node, "frames", slice(first, last))
            else:
                frames = read_clips(workspace, node, self.clips[run][first:last])
            for start in range(first, last, size):
                t = torch.from_numpy(frames[start - first:min(start + size, last) - first])
                yield start - region.start, (t.pin_memory() if pin else t)

    def write(self, key: FeatureBlock, result: tuple[list[np.ndarray], float]
              ) -> tuple[int, float]:
        """Write the block into each layer's group that needs it (data only); returns
        ``(frames, forward seconds)``."""
        outs, forward_s = result
        for i in key.layers:
            self.writers[i].write_block_data(key.run, key.block, {"features": outs[i]})
        return int(outs[0].shape[0]), forward_s


# ------------------------------------------------------------------------- the stage
def run_features_stage(workspace: Workspace, frames_name: str, model: str,
                       layers: Sequence[str] | None = None, weights: str | None = None,
                       device: str = "cpu", batch_size: int | None = None,
                       name: str | None = None, pool: str | None = None,
                       precision: str = "fp32", overwrite: bool = False,
                       progress: bool = True, block_size: int | None = None,
                       clip_frames: int | None = None, clip_fps: float | None = None) -> dict:
    """Extract ``model`` features of ``/frames/<frames_name>`` into ``/features/<name>``.

    ``name`` defaults to the model name; several ``layers`` write one group each,
    ``<name>.<layer>``.  Resumes an interrupted run (same parameters); other
    parameters are refused unless ``overwrite``.  Every input is checked before
    anything is written.  Returns a summary dict (groups, runs, frames, n_features,
    blocks written/skipped, compute seconds and frames per second).  ``weights``
    defaults to ``imagenet`` (``kinetics`` for a video model).  A video model gets
    clips of ``clip_frames`` (16) frames at ``clip_fps`` (15) ending at each time.
    """
    # ---- validate everything before writing anything
    clip = check_clip_options(model, clip_frames, clip_fps)
    if clip is not None and batch_size is None:
        batch_size = DEFAULT_CLIP_BATCH["cuda" if str(device).startswith("cuda") else "cpu"]
    device, batch_size, layers, name = _check_args(model, layers, device, batch_size, name,
                                                   pool, precision, block_size)
    frames_group = f"frames/{check_name(frames_name, '--frames')}"
    frames_attrs = workspace.require_complete(
        frames_group, f"voxelflow frames VIDEO --name {frames_name}")
    frames_runs = workspace.open_runs(frames_group)
    height, width = (int(frames_runs[0].sizes["y"]), int(frames_runs[0].sizes["x"]))
    if model == EFFICIENTNET_LITE0 and (height, width) != (224, 224):
        raise InputError(
            f"/{frames_group}: frames are {height}x{width} but {model} takes 224x224; "
            f"remake them with: voxelflow frames ... --name {frames_name} --size 224"
        )
    clips = None
    if clip is not None:  # the times whose clips are stored, and their clips' frames
        frames_runs, clips = plan_clip_runs(frames_group, frames_runs, clip,
                                            workspace.params(frames_group))
    backbone = load_backbone(model, weights)
    extractor = (FeatureExtractor(backbone, layers, device=device, pool=pool, precision=precision)
                 if clip is None else ClipExtractor(backbone, layers, clip[0], device=device,
                                                    pool=pool, precision=precision))
    shapes = extractor.probe(height, width, model)
    n_features = [int(math.prod(s)) for s in shapes]
    block = int(block_size) if block_size is not None else choose_block_size(n_features)
    groups = [features_group(n) for n in output_names(name, layers)]
    _check_request(workspace, groups, block, n_features,
                   sum(int(ds.sizes["time"]) for ds in frames_runs))
    base = {
        "stage": "features",
        "frames": {"group": frames_group, "params": workspace.params(frames_group)},
        "model": model, "weights": weights_key(backbone.weights),
        "weights_sha256": backbone.weights_sha256, "pool": pool, "precision": precision,
        "device": device, "batch_size": batch_size, "block_size": block,
        "preprocessing": backbone.preprocessing,
        **({} if clip is None else {"clip_frames": clip[0], "clip_fps": clip[1]}),
    }
    params = [{**base, "layer": layer} for layer in layers]
    reuse = _reuse_plan(workspace, groups, params, frames_runs)
    if reuse is None:
        _check_no_conflict(workspace, groups, params, overwrite)

    # An extension is a replacement of each group: built in staging with the held times
    # copied, then swapped in by finish() (journalled, stores/replace.py).
    writers = []
    for i, (group, layer) in enumerate(zip(groups, layers)):
        templates = [
            features_template(ds, run, n_features[i], block, f"{model} {layer} output",
                              feature_shape=shapes[i])
            for run, ds in enumerate(frames_runs)
        ]
        attrs = _group_attrs(base, backbone, layers, i, shapes[i], frames_attrs,
                             (height, width))
        writers.append(workspace.start_stage(group, params[i], templates,
                                             overwrite=overwrite or reuse is not None,
                                             group_attrs=attrs))

    spec = ExtractorSpec(model, base["weights"], tuple(layers), device, pool, precision,
                         backbone.weights_sha256, clip[0] if clip else 0)
    work = FeaturesWork(tuple(writers), frames_group, spec, tuple(n_features), batch_size,
                        extractor=extractor, reuse=reuse, clips=clips)
    summary = _run(workspace, work, frames_runs, progress,
                   desc="/" + (groups[0] if len(groups) == 1 else f"features/{name}.*"))
    for w in writers:
        w.finish()
    if reuse is not None:
        summary["reused_frames"] = int(sum((p >= 0).sum() for p in reuse))
        summary["frames_computed"] -= summary["reused_frames"]
    return {"groups": groups, "runs": len(frames_runs),
            "frames": [int(ds.sizes["time"]) for ds in frames_runs],
            "n_features": n_features, "layers": layers, "block_size": block,
            "batch_size": batch_size, **summary}


def _check_args(model: str, layers: Sequence[str] | None, device: str,
                batch_size: int | None, name: str | None, pool: str | None, precision: str,
                block_size: int | None) -> tuple[str, int, list[str], str]:
    """Checked ``(device, batch_size, layers, name)``; one-line :class:`InputError` else."""
    device = check_device(device, precision)
    if pool not in POOL_MODES:
        raise InputError(f"--pool must be avg or absent (got {pool!r})")
    if batch_size is None:
        batch_size = DEFAULT_BATCH["cuda" if device.startswith("cuda") else "cpu"]
    if int(batch_size) < 1:
        raise InputError(f"--batch-size must be a positive number of frames (got {batch_size})")
    if block_size is not None and int(block_size) < 1:
        raise InputError(
            f"--block-size must be a positive number of time points (got {block_size})")
    check_model(model)
    layers = check_layers(model, layers)
    name = check_name(name or model, "--name")
    for out in output_names(name, layers):
        check_name(out, "--name" if len(layers) == 1 else "--name/--layer")
    return device, int(batch_size), layers, name


def _check_request(workspace: Workspace, groups: Sequence[str], block: int,
                   n_features: Sequence[int], n_frames: int) -> None:
    """Refuse a block that cannot fit in memory or features that cannot fit on disk
    (float32, counted uncompressed)."""
    per_frame = 4 * sum(n_features)
    check_request(
        f"features --block-size {block} ({sum(n_features):,} features per frame)",
        block_bytes=FEATURES_BLOCKS_IN_MEMORY * block * per_frame,
        block_option=f"lower --block-size (default: {BLOCK_MAX}, halved for big layers)",
        output_bytes=n_frames * per_frame, store=workspace.path,
        disk_option="choose a smaller --layer or --pool avg",
        already_written=sum(stored_bytes(workspace, g) for g in groups))


def _group_attrs(base: dict, backbone: Backbone, layers: Sequence[str], i: int,
                 shape: Sequence[int], frames_attrs: dict, size: tuple[int, int]) -> dict:
    """The attrs of layer ``i``'s group (``base``: the params every layer shares)."""
    import torch

    return {
        "model": base["model"], "layer": layers[i], "layers_in_pass": list(layers),
        "weights": base["weights"], "weights_name": backbone.weights_name,
        "weights_file": backbone.weights_file, "weights_sha256": backbone.weights_sha256,
        "preprocessing": backbone.preprocessing,
        "preprocessing_mean": list(backbone.mean), "preprocessing_std": list(backbone.std),
        "pool": base["pool"] or "none (flattened, C order)", "feature_shape": list(shape),
        "n_features": int(math.prod(shape)), "precision": base["precision"],
        "device": base["device"], "batch_size": base["batch_size"],
        "block_size": base["block_size"], "frames_group": base["frames"]["group"],
        "frames_fps": frames_attrs.get("fps"), "frames_size": list(size),
        "torch_version": torch.__version__,
        **{k: base[k] for k in ("clip_frames", "clip_fps") if k in base},
    }


def _json_roundtrip(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def _check_no_conflict(workspace: Workspace, groups: Sequence[str], params: Sequence[dict],
                       overwrite: bool) -> None:
    """Refuse before writing anything when any target group holds other parameters."""
    for group, p in zip(groups, params):
        old = workspace.params(group)
        if old is not None and old != _json_roundtrip(p) and not overwrite:
            raise WorkspaceConflict(
                f"{workspace.path}: /{group} was made with other parameters "
                f"({describe_param_change(old, _json_roundtrip(p))}); rerun with --overwrite "
                f"to replace it, or choose another --name"
            )


def _reuse_plan(workspace: Workspace, groups: Sequence[str], params: Sequence[dict],
                frames_runs: list[xr.Dataset]) -> tuple[np.ndarray, ...] | None:
    """An extension: every group is complete and differs from ``params`` only in the
    frames' time selection (``frames.params.times``), at least one differs, and its
    times are all among the new frames' times.  Returns per run the old position of each new time (-1: compute
    it), else ``None``."""
    def strip(p: dict) -> dict:
        frames = dict(p["frames"], params={k: v for k, v in (p["frames"]["params"] or {}
                                                              ).items() if k != "times"})
        return {**p, "frames": frames}

    extended = []  # groups still to extend (a killed multi-layer run may have swapped some)
    for group, p in zip(groups, params):
        old, new = workspace.params(group), _json_roundtrip(p)
        if workspace.state(group) != "complete" or old is None or strip(old) != strip(new):
            return None
        if old != new:
            extended.append(group)
    if not extended:
        return None
    from voxelflow.pipeline.stages.needed_frames import reuse_positions

    positions = []
    for run, ds in enumerate(frames_runs):
        old_times = workspace.open_run(extended[0], run)["time"].values
        pos = reuse_positions(old_times, np.asarray(ds["time"].values, dtype=np.float64))
        if int((pos >= 0).sum()) != old_times.size:
            return None  # the new frames drop some of the old times: not an extension
        positions.append(pos)
    return tuple(positions)


def _pending_blocks(writers: Sequence[StageWriter]) -> list[FeatureBlock]:
    """Every block that some layer's group still needs, run by run, in time order."""
    blocks = []
    for run, template in enumerate(writers[0].templates):
        pending = [set(w.pending_blocks(run)) for w in writers]
        for b in range(template.n_blocks):
            need = tuple(i for i, p in enumerate(pending) if b in p)
            if need:
                blocks.append(FeatureBlock(run, b, need))
    return blocks


def _run(workspace: Workspace, work: FeaturesWork, frames_runs: list[xr.Dataset],
         progress: bool, desc: str) -> dict:
    """Compute and write every pending block (threads here, or the active cluster)."""
    writers = work.writers
    blocks = _pending_blocks(writers)
    n_blocks = sum(t.n_blocks for t in writers[0].templates)
    total = sum(int(ds.sizes["time"]) for ds in frames_runs)
    regions = [writers[0].block_slice(b.run, b.block) for b in blocks]
    todo = sum(r.stop - r.start for r in regions)
    bar = tqdm(total=total, initial=total - todo, unit="frame", desc=desc,
               disable=not progress, dynamic_ncols=True)
    client = active_client()
    if client is None:
        work = dataclasses.replace(work, on_frames=bar.update)  # progress per batch
    else:
        require_shared_path(client, workspace.path)
        if Path(work.spec.weights).is_absolute():  # a weights file (the param is resolved)
            require_shared_path(client, work.spec.weights)
        work = dataclasses.replace(work, writers=tuple(w.for_workers() for w in writers),
                                   extractor=None)
    forward = [0.0]

    def on_block(key: FeatureBlock, summary: tuple[int, float]) -> None:
        forward[0] += summary[1]
        if client is not None:
            bar.update(summary[0])

    def mark_done(key: FeatureBlock) -> None:
        for i in key.layers:  # this process's writers
            writers[i].mark_done(key.run, key.block)

    started = time.perf_counter()
    run_blocks(work, blocks, client=client, mark_done=mark_done, on_block=on_block)
    elapsed = time.perf_counter() - started
    bar.close()
    return {"blocks_written": len(blocks), "blocks_skipped": n_blocks - len(blocks),
            "frames_computed": todo, "compute_s": elapsed, "forward_s": forward[0],
            "frames_per_s": todo / elapsed if todo and elapsed > 0 else 0.0}
