"""``[[models]] train_frames``: which frames an experiment's autoencoder trains on.

* ``"all"`` (the default, what experiment files without the key do): the frames stage
  keeps every sample at ``fps`` while an autoencoder is trained, and the training
  reads every frame of its training split.
* ``"needed"``: the frames stage stays sparse (``[stimulus] frames = "needed"``: only
  the frames the lag sets read, about 2 a second out of 20), and the autoencoder trains
  on the stored frames of its training split
  (:func:`voxelflow.pipeline.study.plan.training_split`).  At the same number of
  epochs that is ~10x fewer optimiser steps; neighbouring frames at 20 fps are
  near-duplicates, so the training still sees every shot of the movie.

The key is refused (``FILE:LINE: models.train_frames: ...``) on a model that is not a
trained autoencoder, with a value other than ``"all"`` / ``"needed"``, with
``"needed"`` and ``[stimulus] frames = "all"`` (a group of every frame has no needed
subset to train on: the two keys would contradict each other), and when two trained
autoencoders of one experiment ask for different frames (they share one frames group).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from voxelflow.pipeline.study.config import ModelSpec
    from voxelflow.pipeline.study.toml_checks import _Checker

TRAIN_FRAMES = ("all", "needed")


def check_train_frames(check: "_Checker", models: list["ModelSpec"], raw_models: list,
                       frames: str) -> None:
    """Refuse (one ``FILE:LINE`` line) a ``train_frames`` key the experiment cannot
    honour; ``frames`` is ``[stimulus] frames`` ("needed" | "all")."""
    chosen: dict[str, int] = {}
    for i, (spec, raw) in enumerate(zip(models, raw_models)):
        if "train_frames" not in raw:
            if spec.is_autoencoder and spec.train:
                chosen.setdefault(spec.train_frames, i)
            continue
        value = raw["train_frames"]
        if not spec.is_autoencoder:
            check.fail("models", "train_frames", f"only for model = \"autoencoder\" with "
                       f"train = true (this model is {spec.model!r}); remove it", i)
        if value not in TRAIN_FRAMES:
            check.fail("models", "train_frames", f"must be \"all\" or \"needed\", got "
                       f"{value!r}", i)
        if not spec.train:
            check.fail("models", "train_frames", "only with train = true (it chooses the "
                       "frames the run trains on; train = false uses the checkpoint as "
                       "it is); remove it or set train = true", i)
        if value == "needed" and frames == "all":
            check.fail("models", "train_frames", "\"needed\" trains on the needed frames "
                       "that [stimulus] frames = \"needed\" stores, but frames = \"all\"; "
                       "set frames = \"needed\" or train_frames = \"all\"", i)
        chosen.setdefault(value, i)
    if len(chosen) > 1:
        check.fail("models", "train_frames", "the trained autoencoders ask for different "
                   "frames (\"all\" and \"needed\") but share one frames group; give them "
                   "the same train_frames", chosen["needed"])
