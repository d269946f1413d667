"""voxelflow: streaming, out-of-core encoding models of fMRI BOLD from what people watched.

The public Python API, for what users call outside the command line::

    import voxelflow
    ws = voxelflow.Workspace("voxelflow.zarr")            # open (or name) a workspace
    voxelflow.run_frames_stage(ws, ["movie.mp4"], "movie", fps=20, size=224)
    voxelflow.run_features_stage(ws, "movie", "resnet50", weights="random:0")
    voxelflow.write_features(ws, "words", runs=[run0, run1])  # your own (time, feature) arrays
    tree = ws.open_tree()                                  # an xarray.DataTree
    exp = voxelflow.load_experiment("study.toml")
    voxelflow.run_experiment(exp)                          # the whole study, like `voxelflow run`

Each name loads its module on first use, so ``import voxelflow`` stays light.  The
repository root is this package: ``pipeline/`` is :mod:`voxelflow.pipeline` (the
computation, by role), ``stores/`` is :mod:`voxelflow.stores` (the workspace on disk)
and ``cli.py`` is :mod:`voxelflow.cli` (the ``voxelflow`` command).
"""

from __future__ import annotations

from voxelflow.pipeline.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "Workspace": "voxelflow.stores",
    "run_frames_stage": "voxelflow.pipeline.stages",
    "run_features_stage": "voxelflow.pipeline.stages",
    "train_autoencoder": "voxelflow.pipeline.stages",
    "run_bold_stage": "voxelflow.pipeline.stages",
    "run_fit_stage": "voxelflow.pipeline.stages",
    "write_features": "voxelflow.pipeline.stages",
    "run_events_stage": "voxelflow.pipeline.stages",
    "run_import_stage": "voxelflow.pipeline.stages",
    "fit_weights": "voxelflow.pipeline.stages",
    "export_variable": "voxelflow.pipeline.stages",
    "load_experiment": "voxelflow.pipeline.study",
    "run_experiment": "voxelflow.pipeline.study",
    "InputError": "voxelflow.pipeline.errors",
    "VoxelflowError": "voxelflow.pipeline.errors",
}

__all__ = ["__version__", *_EXPORTS]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
