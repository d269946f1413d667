"""Experiment files: one TOML file -> a validated :class:`Experiment`.

Every problem is reported as ``FILE:LINE: section.key: what is wrong`` before any heavy
work starts.  :func:`load_experiment` checks what the file alone says (unknown keys,
wrong types, names that would become paths outside the workspace, numbers out of
range, missing files, ``test_runs`` that are not runs); the checks that need cheap
probes of the input files (video durations, NIfTI lengths and TR) run when the plan is
built (:mod:`voxelflow.pipeline.study.inputs`), with the same ``FILE:LINE`` form
(:meth:`Experiment.fail`).  Relative paths are relative to the experiment file's folder.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.study._fit_table import STUDY_ALPHAS, check_mean_window, fit_options
from voxelflow.pipeline.study.sources import check_source_keys, check_sources
from voxelflow.pipeline.study.toml_checks import _Checker
from voxelflow.pipeline.study.train_frames import check_train_frames

__all__ = ["AUTOENCODER_KEYS", "Experiment", "ModelSpec", "SCHEMA", "STUDY_ALPHAS",
           "check_mean_window", "load_experiment"]


@dataclass
class ModelSpec:
    """One feature space: a backbone, its layer and weights (see ``voxelflow features``),
    or (``source``) events files (``voxelflow events``) or imported feature files
    (``voxelflow import-features``)."""

    name: str
    model: str = ""
    layer: str | None = None
    weights: str = "imagenet"
    pool: str | None = None
    batch_size: int = 16
    # The autoencoder only (model = "autoencoder"): where its checkpoint is (trained by
    # the experiment unless train = false), and the training settings.  ``weights`` is
    # then the initial ResNet-50 trunk (imagenet | PATH | random:SEED).
    checkpoint: Path | None = None
    train: bool = True
    epochs: int | None = None
    train_steps: int | None = None
    train_batch_size: int | None = None
    lr: float | None = None
    freeze_encoder: bool = False
    train_frames: str = "all"  # or "needed": train on the stored needed frames (train_frames.py)
    # source = "events" | "import" (default "cnn": the keys above); their keys are
    # checked and resolved by voxelflow.pipeline.study.sources.
    source: str = "cnn"
    events: list[Path] | None = None
    files: list[Path] | None = None
    rate: float | None = None
    columns: list[str] | None = None
    amplitude: str | None = None
    duration_from: str = "column"
    categories: list[str] | None = None
    times_column: str | None = None
    variable: str | None = None
    clip_frames: int | None = None  # video models: their clips (sources.py fills defaults)
    clip_fps: float | None = None

    @property
    def needs_frames(self) -> bool:
        return self.source == "cnn"

    @property
    def is_categorical_events(self) -> bool:
        return self.source == "events" and not self.amplitude

    @property
    def is_autoencoder(self) -> bool:
        return self.model == "autoencoder"

    def train_options(self) -> dict:
        """Keyword arguments of :func:`voxelflow.pipeline.stages.train.train_autoencoder`."""
        opts = {"weights": self.weights, "freeze_encoder": self.freeze_encoder}
        for key, name in (("epochs", "epochs"), ("steps", "train_steps"),
                          ("batch_size", "train_batch_size"), ("lr", "lr")):
            if getattr(self, name) is not None:
                opts[key] = getattr(self, name)
        return opts


@dataclass
class Experiment:
    name: str
    source: Path
    store: Path
    reports: Path
    stimulus_name: str | None          # None: no [stimulus] (no model needs frames)
    videos: list[Path]
    fps: float
    size: int
    resize: str
    subject: str
    bold_runs: list[Path]
    mask: Path | None
    tr: float | None
    zscore: bool
    detrend: str
    models: list[ModelSpec]
    lag_sets: list[list[float]]
    alphas: list[float]
    test_samples: int | None
    test_runs: list[int] | None
    cv: int | str
    aggregate: str
    device: str
    atlas: Path | None = None
    atlas_labels: Path | None = None
    frames: str = "needed"  # "needed": only the frames the fits read; "all": every sample
    extra: dict = field(default_factory=dict)
    checker: "_Checker | None" = field(default=None, repr=False, compare=False)

    def fail(self, section: str, key: str | None, message: str, index: int = 0) -> None:
        """Raise :class:`InputError` ``FILE:LINE: section.key: message`` (the line of
        ``key`` in the ``index``-th ``[section]`` of the file)."""
        if self.checker is None:
            where = f"{section}.{key}" if key else f"[{section}]"
            raise InputError(f"{self.source}: {where}: {message}")
        self.checker.fail(section, key, message, index)

    # Repeated test presentations (BOLD runs showing the same clip) and the test-set
    # statistics (docs/statistics.md); defaults as on ``voxelflow fit``.
    test_repeats: list[list[int]] | None = None
    permutations: int = 1000
    bootstrap: int = 1000
    block_length: int = 10
    null: str = "blocks"
    seed: int = 0
    # run_bold_stage's other options: confounds, high_pass, hemis, structures, and from
    # BIDS input tr_source / run_attrs (bold_runs then holds the runs pybids found)
    bold_options: dict = field(default_factory=dict)
    # [[fit.joint]] tables (:class:`~voxelflow.pipeline.study.joint.JointSpec`)
    joint: list = field(default_factory=list)

    def statistics(self):
        """The :class:`~voxelflow.pipeline.stats.per_block.StatisticsOptions` of the fits."""
        from voxelflow.pipeline.stats.per_block import StatisticsOptions

        return StatisticsOptions(permutations=self.permutations, bootstrap=self.bootstrap,
                                 block_length=self.block_length, null=self.null,
                                 seed=self.seed)


SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], bool]]] = {
    # section -> key -> (type(s), required)
    "experiment": {"name": (str, True), "store": (str, False), "reports": (str, False),
                   "device": (str, False)},
    "stimulus": {"name": (str, True), "videos": (list, True), "fps": ((int, float), False),
                 "size": (int, False), "resize": (str, False), "frames": (str, False)},
    "bold": {"subject": (str, True), "runs": (list, False), "mask": (str, False),
             "tr": ((int, float), False), "zscore": (bool, False), "detrend": (str, False),
             # BIDS / fMRIPrep input, confound cleaning, surfaces (docs/fmri-data.md)
             "bids": (str, False), "task": (str, False), "session": (str, False),
             "space": (str, False), "desc": (str, False), "confounds": (str, False),
             "high_pass": ((int, float), False), "hemi": (list, False),
             "structures": (list, False)},
    "models": {"name": (str, True), "model": (str, False), "layer": (str, False),
               "weights": (str, False), "pool": (str, False), "batch_size": (int, False),
               "checkpoint": (str, False), "train": (bool, False), "epochs": (int, False),
               "train_steps": (int, False), "train_batch_size": (int, False),
               "lr": ((int, float), False), "freeze_encoder": (bool, False),
               "train_frames": (str, False),
               "source": (str, False), "events": (list, False), "files": (list, False),
               "rate": ((int, float), False), "columns": ((list, str), False),
               "amplitude": (str, False), "duration_from": (str, False),
               "categories": (list, False), "times_column": (str, False),
               "variable": (str, False), "clip_frames": (int, False),
               "clip_fps": ((int, float), False)},
    "fit": {"lag_sets": (list, True), "alphas": (list, False), "test_samples": (int, False),
            "test_runs": (list, False), "test_repeats": (list, False),
            "cv": ((int, str), False), "aggregate": (str, False),
            "permutations": (int, False), "bootstrap": (int, False),
            "block_length": (int, False), "null": (str, False), "seed": (int, False),
            "joint": (list, False)},
    "report": {"atlas": (str, False), "atlas_labels": (str, False)},
    # [[fit.joint]]: several models fitted as one banded ridge model (study/joint.py)
    "fit.joint": {"features": (list, True), "weightings": ((int, list), False),
                  "partition": (bool, False)},
}


def load_experiment(path: str | Path) -> Experiment:
    """Parse and validate an experiment file; raise :class:`InputError` naming key and line."""
    path = Path(path)
    data, check = _read_toml(path)
    base = path.parent
    exp = check.table(data["experiment"], "experiment")
    stim = check.table(data["stimulus"], "stimulus") if "stimulus" in data else None
    bold = check.table(data["bold"], "bold")
    fit = check.table(data["fit"], "fit")
    report = check.table(data.get("report", {}), "report")
    store = base / exp.get("store", "voxelflow.zarr")
    check.name(exp["name"], "experiment", "name")
    models = _models(check, data.get("models"), base, exp_name=exp["name"], store=store)
    _require_stimulus(check, models, stim)
    stim = stim or {}
    videos, runs, mask = _input_files(check, stim, bold, base)
    if stim:
        check.name(stim["name"], "stimulus", "name")
    check.name(bold["subject"], "bold", "subject")
    check_sources(check, models, data["models"], base, len(runs))
    # checked in this order: the first error is reported
    fitted = fit_options(check, fit, n_runs=len(runs))
    resize = check.choice(stim, "stimulus", "resize", ("squash", "crop"))
    frames = check.choice(stim, "stimulus", "frames", ("needed", "all"))
    check_train_frames(check, models, data["models"], frames)
    fps, size = _fps(check, stim), _size(check, stim)
    tr = _tr(check, bold)
    if stim and tr is not None and fitted["aggregate"] == "mean":
        check_mean_window(check.fail, fps, tr)
    detrend = check.choice(bold, "bold", "detrend", ("none", "linear"))
    bids_tr, bold_options = _bold_options(check, bold, base)
    tr = tr if tr is not None else bids_tr
    device = check.choice(exp, "experiment", "device", ("cpu", "cuda"))
    from voxelflow.pipeline.study.joint import parse_joint

    joint = parse_joint(check, fit.get("joint", []), [m.name for m in models])
    return Experiment(
        name=exp["name"], source=path, store=store,
        reports=(base / exp.get("reports", "reports")), stimulus_name=stim.get("name"),
        videos=videos, fps=fps, size=size, resize=resize,
        frames=frames, subject=bold["subject"], bold_runs=runs, mask=mask,
        tr=tr, zscore=bool(bold.get("zscore", True)), bold_options=bold_options,
        detrend=detrend, models=models, device=device, joint=joint, **fitted,
        atlas=check.existing("report", "atlas", base, report["atlas"]) if "atlas" in report else None,
        atlas_labels=(check.existing("report", "atlas_labels", base, report["atlas_labels"])
                      if "atlas_labels" in report else None),
        checker=check,
    )


def _read_toml(path: Path) -> tuple[dict, _Checker]:
    """The parsed file (known sections only, the required ones present) and its checker."""
    if not path.exists():
        raise InputError(f"{path}: no such experiment file")
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    check = _Checker(path, text, SCHEMA)
    for section in data:
        if section not in SCHEMA:
            check.fail(section, None, f"unknown section (known: {', '.join(SCHEMA)})")
    for section in ("experiment", "bold", "fit"):  # [stimulus]: _require_stimulus
        if section not in data:
            raise InputError(f"{path}:1: missing section [{section}]")
    return data, check


def _models(check: _Checker, models_raw: Any, base: Path, *, exp_name: str,
            store: Path) -> list[ModelSpec]:
    """The ``[[models]]`` tables: known models, autoencoder keys, unique names."""
    if not isinstance(models_raw, list) or not models_raw:
        raise InputError(f"{check.path}:1: [[models]]: give at least one [[models]] table")
    models = [ModelSpec(**check.table(m, "models", i)) for i, m in enumerate(models_raw)]
    from voxelflow.pipeline.models.registry import check_model

    for i, spec in enumerate(models):
        check.name(spec.name, "models", "name", i)
        if check_source_keys(check, spec, models_raw[i], i) != "cnn":
            continue
        try:
            check_model(spec.model)
        except InputError as exc:
            check.fail("models", "model", str(exc), i)
        if spec.batch_size < 1:
            check.fail("models", "batch_size", f"must be a positive number of frames, got "
                       f"{spec.batch_size}", i)
        if spec.pool not in (None, "avg"):
            check.fail("models", "pool", f"must be \"avg\" or absent, got {spec.pool!r}", i)
        _check_autoencoder_keys(check, spec, models_raw[i], i, base, exp_name=exp_name,
                                store=store)
    names = [m.name for m in models]
    for i, name in enumerate(names):
        if names.count(name) > 1:
            check.fail("models", "name", f"duplicate model name {name!r}", i)
    return models


def _input_files(check: _Checker, stim: dict, bold: dict, base: Path
                 ) -> tuple[list[Path], list[Path], Path | None]:
    """Videos and BOLD runs (existing, paired by index) and the optional mask."""
    videos = [check.existing("stimulus", "videos", base, v)
              for v in _strings(check, "stimulus", "videos", stim["videos"])] if stim else []
    if "bids" in bold:
        runs = _bids_runs(check, bold, base)
    elif "runs" not in bold:
        check.fail("bold", "runs", "give runs = [...] or bids = \"DATASET\" (with task)")
    else:
        runs = [check.existing("bold", "runs", base, v)
                for v in _strings(check, "bold", "runs", bold["runs"])]
    if stim and len(videos) != len(runs):
        check.fail("bold", "runs", f"{len(runs)} BOLD run(s) but {len(videos)} video(s) in "
                   f"stimulus.videos; runs are paired by index")
    mask = check.existing("bold", "mask", base, bold["mask"]) if "mask" in bold else None
    return videos, runs, mask


def _bids_runs(check: _Checker, bold: dict, base: Path) -> list:
    """The runs pybids finds for ``[bold] bids``/``subject``/``task`` (and session,
    space, desc); their TR and attrs are kept for :func:`_bold_options`."""
    from voxelflow.pipeline.stages.bold import bold_inputs

    if "runs" in bold:
        check.fail("bold", "runs", "give either runs or bids, not both")
    try:
        runs, tr, source, attrs = bold_inputs(
            [], bids=check.existing("bold", "bids", base, bold["bids"]),
            subject=bold["subject"], task=bold.get("task"), session=bold.get("session"),
            space=bold.get("space"), desc=bold.get("desc"),
            tr=float(bold["tr"]) if "tr" in bold else None)
    except InputError as exc:
        check.fail("bold", "bids", str(exc))
    bold["_bids"] = {"tr": tr, "tr_source": source, "run_attrs": attrs}
    return runs


def _bold_options(check: _Checker, bold: dict, base: Path) -> tuple[float | None, dict]:
    """``tr`` and the other keyword arguments of ``run_bold_stage``."""
    found = bold.pop("_bids", {})
    tr = float(bold["tr"]) if "tr" in bold else found.get("tr")
    options = {"confounds": bold.get("confounds"),
               "high_pass": float(bold["high_pass"]) if "high_pass" in bold else None,
               "hemis": bold.get("hemi"), "structures": bold.get("structures"),
               "tr_source": found.get("tr_source"), "run_attrs": found.get("run_attrs")}
    if options["confounds"]:
        from voxelflow.pipeline.stages.confounds import parse_strategy

        try:
            parse_strategy(options["confounds"])
        except InputError as exc:
            check.fail("bold", "confounds", str(exc))
    return tr, options


def _require_stimulus(check: _Checker, models: list[ModelSpec], stim: dict | None) -> None:
    """``[stimulus]`` is needed exactly when a model is computed from frames."""
    needing = [m.name for m in models if m.needs_frames]
    if needing and stim is None:
        raise InputError(f"{check.path}:1: missing section [stimulus] (the videos), needed "
                         f"by model(s) {', '.join(needing)}; or give them source = "
                         f"\"events\" or \"import\"")


def _fps(check: _Checker, stim: dict) -> float:
    fps = float(stim.get("fps", 20))
    check.number(fps, "stimulus", "fps")
    return fps


def _size(check: _Checker, stim: dict) -> int:
    size = int(stim.get("size", 224))
    if size < 1:
        check.fail("stimulus", "size", f"must be a positive number of pixels, got {size}")
    return size


def _tr(check: _Checker, bold: dict) -> float | None:
    if "tr" not in bold:
        return None
    tr = float(bold["tr"])
    check.number(tr, "bold", "tr")
    return tr


AUTOENCODER_KEYS = ("checkpoint", "train", "epochs", "train_steps", "train_batch_size", "lr",
                    "freeze_encoder")


def _check_autoencoder_keys(check: _Checker, spec: ModelSpec, raw: dict, index: int,
                            base: Path, *, exp_name: str, store: Path) -> None:
    """Training keys belong to autoencoder models; resolve and check the checkpoint path.

    Default checkpoint: ``<store folder>/autoencoders/<experiment>-<model name>.pt``.
    """
    if not spec.is_autoencoder:
        for key in AUTOENCODER_KEYS:
            if key in raw:
                check.fail("models", key, f"only for model = \"autoencoder\" (this model "
                           f"is {spec.model!r})", index)
        return
    for key in ("epochs", "train_steps", "train_batch_size"):
        if key in raw and raw[key] < 1:
            check.fail("models", key, f"must be a positive integer, got {raw[key]}", index)
    if "lr" in raw and not raw["lr"] > 0:
        check.fail("models", "lr", f"must be positive, got {raw['lr']}", index)
    if "checkpoint" in raw:
        spec.checkpoint = (base / raw["checkpoint"]).expanduser()
    else:
        spec.checkpoint = store.parent / "autoencoders" / f"{exp_name}-{spec.name}.pt"
    if not spec.train and not spec.checkpoint.is_file():
        check.fail("models", "checkpoint" if "checkpoint" in raw else "train",
                   f"train = false needs an existing checkpoint, not found: {spec.checkpoint} "
                   f"(make it with voxelflow train-autoencoder, or set train = true)", index)


def _strings(check: _Checker, section: str, key: str, values: list) -> list[str]:
    if not values or not all(isinstance(v, str) for v in values):
        check.fail(section, key, f"expected a non-empty list of file names, got {values!r}")
    return values
