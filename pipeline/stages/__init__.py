"""The stages: each reads workspace groups (or input files) and writes one group.

- :mod:`~voxelflow.pipeline.stages.frames`: video files -> ``/frames/NAME`` (probing
  the files in :mod:`~voxelflow.pipeline.stages.video`);
- :mod:`~voxelflow.pipeline.stages.features`: frames -> ``/features/NAME`` (any model
  of :mod:`voxelflow.pipeline.models`);
- :mod:`~voxelflow.pipeline.stages.train`: trains the ResNet-50 autoencoder on the
  training frames (a checkpoint file);
- :mod:`~voxelflow.pipeline.stages.bold`: NIfTI runs -> ``/bold/SUBJECT`` (reading in
  :mod:`~voxelflow.pipeline.stages.nifti`, the per-block passes in ``_bold_passes``);
- :mod:`~voxelflow.pipeline.stages.feature_arrays`: any ``(time, feature)`` arrays ->
  ``/features/NAME`` (:func:`write_features`), used by
  :mod:`~voxelflow.pipeline.stages.events` (events files -> boxcars) and
  :mod:`~voxelflow.pipeline.stages.imported` (tables, arrays, Zarr/netCDF files);
- :mod:`~voxelflow.pipeline.stages.fit`: features + BOLD -> ``/fits/NAME/lags-...``;
- :mod:`~voxelflow.pipeline.stages.export`: any per-voxel result -> NIfTI.

Each stage describes its per-block work once (a work object with ``compute`` and
``write``) and runs it with :func:`voxelflow.pipeline.execution.run_blocks`.  The names
below load their module on first use (torch is imported only by the stages that need
it).
"""

from __future__ import annotations

from voxelflow.pipeline.lazy import lazy_exports

_EXPORTS = {
    "run_frames_stage": "frames", "probe_video": "video", "frames_group": "frames",
    "run_features_stage": "features", "features_group": "features",
    "train_autoencoder": "train",
    "run_bold_stage": "bold", "bold_group": "bold", "probe_run": "nifti",
    "run_fit_stage": "fit", "fit_group": "fit", "summarize_fit": "fit",
    "fit_weights": "fit",
    "write_features": "feature_arrays", "feature_labels": "feature_arrays",
    "run_events_stage": "events", "events_to_features": "events",
    "run_import_stage": "imported", "read_feature_file": "imported",
    "export_variable": "export", "describe_export": "export",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
