"""Where a model's features come from, in an experiment file: ``[[models]] source``.

- ``source = "cnn"`` (default): a network over the stimulus frames (``model``,
  ``layer``, ``weights``, ``pool``, ``batch_size``, autoencoder keys; ``clip_frames``,
  ``clip_fps`` for video models), as ``voxelflow features``; needs ``[stimulus]``;
- ``source = "events"``: one BIDS events file per BOLD run (``events = [...]``),
  turned into boxcars at ``rate`` Hz with ``columns`` / ``amplitude`` /
  ``duration_from`` / ``categories``, as ``voxelflow events --bold SUBJECT``;
- ``source = "import"``: one feature file per BOLD run (``files = [...]``) with
  ``rate`` or ``times_column`` (``variable`` for Zarr/netCDF), as ``voxelflow
  import-features``.

Every key is checked against its source before any work, errors as
``FILE:LINE: models.KEY: ...`` (the checker of :mod:`voxelflow.pipeline.study.config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from voxelflow.pipeline.errors import InputError

if TYPE_CHECKING:
    from voxelflow.pipeline.study.config import ModelSpec
    from voxelflow.pipeline.study.toml_checks import _Checker

SOURCES = ("cnn", "events", "import")
SOURCE_KEYS = {
    "cnn": ("model", "layer", "weights", "pool", "batch_size", "checkpoint", "train",
            "epochs", "train_steps", "train_batch_size", "lr", "freeze_encoder",
            "train_frames", "clip_frames", "clip_fps"),
    "events": ("events", "rate", "columns", "amplitude", "duration_from", "categories"),
    "import": ("files", "rate", "times_column", "variable"),
}
COMMON_KEYS = ("name", "source")


def check_source_keys(check: "_Checker", spec: "ModelSpec", raw: dict, index: int) -> str:
    """The model's source, after checking that every key belongs to it."""
    if spec.source not in SOURCES:
        check.fail("models", "source", f"must be one of {', '.join(SOURCES)}, got "
                   f"{spec.source!r}", index)
    allowed = set(SOURCE_KEYS[spec.source]) | set(COMMON_KEYS)
    for key in raw:
        if key not in allowed:
            owner = next(s for s in SOURCES if key in SOURCE_KEYS[s])
            check.fail("models", key, f"only for source = \"{owner}\" (this model's source "
                       f"is \"{spec.source}\")", index)
    required = {"cnn": "model", "events": "events", "import": "files"}[spec.source]
    if required not in raw:
        check.fail("models", None, f"missing required key '{required}' (source = "
                   f"\"{spec.source}\")", index)
    return spec.source


def check_sources(check: "_Checker", models: list["ModelSpec"], raw_models: list[dict],
                  base: Path, n_runs: int) -> None:
    """Resolve and check the events / import keys of every model (files exist, one per
    BOLD run; options valid); paths become absolute :class:`Path` objects."""
    for i, (spec, raw) in enumerate(zip(models, raw_models)):
        if spec.source == "events":
            spec.events = _files(check, raw, "events", i, base, n_runs)
            _check_events(check, spec, raw, i)
        elif spec.source == "import":
            spec.files = _files(check, raw, "files", i, base, n_runs)
            _check_import(check, spec, raw, i)
        else:
            _check_clip_keys(check, spec, raw, i)
    clips = {(m.clip_frames, m.clip_fps) for m in models if m.clip_frames is not None}
    if len(clips) > 1:  # the needed frames are chosen once, for every model
        i = next(i for i, m in enumerate(models) if m.clip_frames is not None)
        check.fail("models", "clip_frames", f"the video models differ in clip_frames/"
                   f"clip_fps ({sorted(clips)}); give them the same clips, or one "
                   f"experiment per clip setting", i)


def _check_clip_keys(check: "_Checker", spec: "ModelSpec", raw: dict, index: int) -> None:
    """A video model's clips (defaults 16 frames at 15 fps) and weights (``kinetics``
    unless given); clip keys on an image model are refused."""
    from voxelflow.pipeline.models.video import KINETICS
    from voxelflow.pipeline.stages.clips import check_clip_options

    try:
        clip = check_clip_options(spec.model, spec.clip_frames, spec.clip_fps)
    except InputError as exc:
        key = "clip_frames" if "clip_frames" in raw else "clip_fps"
        check.fail("models", key, str(exc).replace("--clip-", "clip_"), index)
    if clip is not None:
        spec.clip_frames, spec.clip_fps = clip
        if "weights" not in raw:
            spec.weights = KINETICS
        if "batch_size" not in raw:
            spec.batch_size = None  # the stage's clip default (4 on CPU, 16 on CUDA)


def _files(check: "_Checker", raw: dict, key: str, index: int, base: Path,
           n_runs: int) -> list[Path]:
    values = raw[key]
    if not values or not all(isinstance(v, str) for v in values):
        check.fail("models", key, f"expected a non-empty list of file names, got {values!r}",
                   index)
    paths = [check.existing("models", key, base, v, index) for v in values]
    if len(paths) != n_runs:
        check.fail("models", key, f"{len(paths)} file(s) but {n_runs} BOLD run(s) in "
                   f"bold.runs; give one per run, in the same order", index)
    return paths


def _strings(check: "_Checker", raw: dict, key: str, index: int) -> list[str] | None:
    value = raw.get(key)
    if value is None:
        return None
    values = [value] if isinstance(value, str) else value
    if not values or not all(isinstance(v, str) and v for v in values):
        check.fail("models", key, f"expected a list of names, got {value!r}", index)
    return list(values)


def _check_rate(check: "_Checker", raw: dict, index: int, required: bool) -> None:
    rate = raw.get("rate")
    if rate is None:
        if required:
            check.fail("models", None, "missing required key 'rate' (samples per second)",
                       index)
        return
    if not rate > 0:
        check.fail("models", "rate", f"must be > 0 samples per second, got {rate}", index)


def _check_events(check: "_Checker", spec: "ModelSpec", raw: dict, index: int) -> None:
    from voxelflow.pipeline.stages.events import check_events_options

    _check_rate(check, raw, index, required=True)
    spec.columns = _strings(check, raw, "columns", index)
    spec.categories = _strings(check, raw, "categories", index)
    if spec.amplitude and spec.columns:
        check.fail("models", "amplitude", "give columns (categories) or amplitude (one "
                   "numeric feature), not both", index)
    if spec.amplitude and spec.categories:
        check.fail("models", "categories", "categories are for columns, not amplitude", index)
    for key, values in (("columns", spec.columns), ("categories", spec.categories)):
        if values and len(set(values)) != len(values):
            check.fail("models", key, f"names must be distinct, got {values!r}", index)
    try:
        check_events_options(spec.rate, spec.columns, spec.amplitude, spec.duration_from,
                             spec.categories)
    except InputError:
        check.fail("models", "duration_from", f"must be \"column\" or \"fixed:S\" with S > 0 "
                   f"seconds, got {spec.duration_from!r}", index)


def _check_import(check: "_Checker", spec: "ModelSpec", raw: dict, index: int) -> None:
    _check_rate(check, raw, index, required=False)
    if "rate" in raw and "times_column" in raw:
        check.fail("models", "times_column", "give rate or times_column, not both", index)


def events_options(spec: "ModelSpec") -> dict[str, Any]:
    """Keyword arguments of :func:`~voxelflow.pipeline.stages.events.run_events_stage`."""
    return {"columns": spec.columns, "amplitude": spec.amplitude,
            "duration_from": spec.duration_from, "categories": spec.categories}


def import_options(spec: "ModelSpec") -> dict[str, Any]:
    """Keyword arguments of :func:`~voxelflow.pipeline.stages.imported.run_import_stage`."""
    return {"rate": spec.rate, "times_column": spec.times_column, "variable": spec.variable}
