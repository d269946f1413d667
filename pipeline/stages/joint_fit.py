"""The joint fit: several features groups, one lagged design, banded ridge per voxel.

``voxelflow fit --features A B C ...`` lags each features group as the fit stage
does (:func:`voxelflow.pipeline.design.lags.build_design`), checks that every group
keeps the same BOLD samples (same runs, same times), and fits banded ridge
(:mod:`voxelflow.pipeline.ridge._banded`): space ``i`` is penalised by ``alpha /
gamma_i``, the per-voxel (weighting ``gamma``, ``alpha``) chosen by CV over the
alpha grid times the candidate weightings (seeded simplex draws or a user list).
Every weighting is factorised once before the voxel loop (in the dual regime one
eigendecomposition per fold and weighting, kept compact: fold operators, test
operator, eigenbasis; memory and disk checked up front,
:func:`~voxelflow.pipeline.ridge.banded_factor_bytes`); voxel blocks then go
through the fit stage's write protocol (:class:`~voxelflow.pipeline.stages.fit.FitWork`, done
flags, resume).

Writes ``/fits/<name>/lags-...`` with a single fit's variables plus, per voxel,
``best_weighting (voxel)`` (row of the weightings, -1 where undefined),
``space_alpha (space, voxel)`` (``alpha / gamma_i``), ``r2_split (space, voxel)``
(product-measure split of test R^2, ``docs/statistics.md``), with ``--partition``
``partition (part, voxel)`` (unique and shared parts from the joint model and every
sub-model), and with ``--save-weights`` ``weights (column, voxel)`` whose columns
carry ``column_space``/``column_lag``/``column_feature`` coordinates
(:func:`joint_weights` gives one space's ``(lag, feature, voxel)``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Sequence

import dask.array as da
import numpy as np
import xarray as xr

from voxelflow.pipeline import ridge
from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.execution.cluster import active_client, require_shared_path
from voxelflow.pipeline.ridge.partition import subsets, variance_partition
from voxelflow.pipeline.stages import _fit_stats
from voxelflow.pipeline.stages.feature_arrays import feature_labels
from voxelflow.pipeline.stages._fit_work import BoldBlockReader, FitWork, stored_outputs
from voxelflow.pipeline.stages._joint_request import _check_joint_request
from voxelflow.pipeline.stages.fit import (
    VOXEL_BLOCK, FitSummary, _check_fit_options, _fit_template, bold_validity, finish_fit,
    fit_group, make_folds, open_bold, open_design, run_fit_blocks)
from voxelflow.pipeline.stats.per_block import StatisticsOptions, TestStatistics
from voxelflow.stores.names import check_name
from voxelflow.stores.workspace import RunTemplate, Workspace

DEFAULT_WEIGHTINGS = 20
PARTITION_SPACES = (2, 3)


def load_weightings(spec: int | str | Path | np.ndarray, n_spaces: int, seed: int = 0
                    ) -> np.ndarray:
    """float64 (candidate, space) weightings from ``--weightings``: a count N (seeded
    simplex draws, :func:`ridge.simplex_weightings`), a ``.npy`` file or a ``.tsv``
    file (one row per candidate, one column per space, an optional header line),
    or an array. One-line :class:`InputError` naming ``--weightings`` otherwise."""
    if isinstance(spec, (int, np.integer)) or (isinstance(spec, str) and spec.isdigit()):
        count = int(spec)
        if count < 1:
            raise InputError(f"--weightings must be a count >= 1 or a .tsv/.npy file "
                             f"(got {spec})")
        return ridge.simplex_weightings(n_spaces, count, seed)
    values = spec
    if not isinstance(spec, np.ndarray):
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"--weightings {spec}: not a count and no such file; give "
                             f"a number of random weightings or a .tsv/.npy file")
        values = _read_table(path)
    try:
        return ridge.check_weightings(values, n_spaces)
    except ValueError as exc:
        raise InputError(f"--weightings {spec if not isinstance(spec, np.ndarray) else ''}"
                         f": {exc}") from None


def _read_table(path: Path) -> np.ndarray:
    """Rows of a .npy or tab-separated file (a non-numeric first line is a header)."""
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        lines = [l for l in path.read_text().splitlines() if l.strip()]
        try:
            float(lines[0].split("\t")[0]) if lines else None
        except ValueError:
            lines = lines[1:]
        return np.asarray([[float(v) for v in l.split("\t")] for l in lines],
                          dtype=np.float64).reshape(len(lines), -1)
    except (ValueError, OSError) as exc:
        raise InputError(f"--weightings {path}: cannot read it as a .npy array or "
                         f"tab-separated numbers ({exc})") from None


def sub_weightings(gammas: np.ndarray, columns: Sequence[int]) -> np.ndarray:
    """The weightings of a sub-model on ``columns``: each row restricted and
    rescaled to sum 1, all-zero rows dropped, repeats removed (first kept)."""
    rows = gammas[:, list(columns)]
    rows = rows[rows.sum(axis=1) > 0]
    rows = rows / rows.sum(axis=1, keepdims=True)
    _, first = np.unique(rows, axis=0, return_index=True)
    return rows[np.sort(first)]


def part_name(names: Sequence[str], group: frozenset[str]) -> str:
    """``{"b", "a"}`` -> ``"a&b"`` in the order of ``names``."""
    return "&".join(n for n in names if n in group)


@dataclass(frozen=True)
class JointFactors:
    """The joint model's factors and, with ``--partition``, each proper sub-model's:
    ``submodels`` = ((space indices), factors) pairs (picklable; arrays mapped to a
    worker's device by the fit stage)."""

    joint: ridge.BandedFactors
    submodels: tuple = ()

    @property
    def device(self) -> str:
        return self.joint.factors[0].device


def joint_block_outputs(factors: JointFactors, block: np.ndarray, ok: np.ndarray,
                        train: np.ndarray, test: np.ndarray, names: Sequence[str],
                        save_weights: bool, save_predictions: bool,
                        stats: TestStatistics | None, repeat_data: np.ndarray | None
                        ) -> dict[str, np.ndarray]:
    """The stored outputs of one voxel block (``block`` (sample, voxel) float32,
    modified): a single fit's (:func:`stored_outputs`) plus ``best_weighting``
    int32 (voxel,), ``space_alpha``/``r2_split`` (space, voxel) and, with
    sub-models, ``partition`` (part, voxel), NaN (-1) where not ``ok``."""
    block[:, ~ok] = 0.0
    y_test = block[test] if repeat_data is None else repeat_data.mean(axis=0, dtype=np.float32)
    out = ridge.banded_chunk(factors.joint, block[train], y_test,
                             return_weights=save_weights, return_split=True,
                             return_predictions=save_predictions or stats is not None)
    arrays = stored_outputs(out, ok, y_test, save_weights, save_predictions, stats,
                            repeat_data)
    arrays["best_weighting"] = np.where(ok, out["best_weighting"], -1).astype(np.int32)
    for key in ("space_alpha", "r2_split"):
        arrays[key] = np.where(ok[None, :], out[key], np.nan).astype(np.float32)
    if factors.submodels:
        r2 = {frozenset(names): out["r2_test_cv"]}
        for columns, sub in factors.submodels:
            sub_out = ridge.banded_chunk(sub, block[train], y_test, return_split=False)
            r2[frozenset(names[c] for c in columns)] = sub_out["r2_test_cv"]
        parts = variance_partition(r2, names)
        arrays["partition"] = np.where(ok[None, :], np.stack(list(parts.values())),
                                       np.nan).astype(np.float32)
    return arrays


@dataclass
class JointFitWork(FitWork):
    """One voxel block of a joint fit (``factors``: :class:`JointFactors`)."""

    names: tuple[str, ...] = ()

    def outputs(self, factors: Any, data: np.ndarray, ok: np.ndarray,
                repeat_data: np.ndarray | None) -> dict[str, np.ndarray]:
        return joint_block_outputs(factors, data, ok, self.train, self.test, self.names,
                                   self.save_weights, self.save_predictions, self.stats,
                                   repeat_data)


def _joint_template(template: RunTemplate, names: Sequence[str], n_voxels: int,
                    weight_columns: tuple[list, list, list] | None,
                    parts: list[str]) -> RunTemplate:
    """The single fit's template plus the joint variables (see the module doc)."""
    block = template.block_size
    ds, encoding = template.dataset, dict(template.encoding)
    extra: dict[str, tuple] = {
        "best_weighting": (("voxel",), da.empty(n_voxels, np.int32, chunks=block)),
        "space_alpha": (("space", "voxel"),
                        da.empty((len(names), n_voxels), np.float32, chunks=(len(names), block))),
        "r2_split": (("space", "voxel"),
                     da.empty((len(names), n_voxels), np.float32, chunks=(len(names), block))),
    }
    coords: dict[str, Any] = {"space": ("space", np.asarray(list(names), dtype=object))}
    encoding["space"] = {"chunks": (len(names),)}
    if parts:
        extra["partition"] = (("part", "voxel"), da.empty((len(parts), n_voxels), np.float32,
                                                          chunks=(len(parts), block)))
        coords["part"] = ("part", np.asarray(parts, dtype=object))
        encoding["part"] = {"chunks": (len(parts),)}
    if weight_columns is not None:
        n = len(weight_columns[0])
        extra["weights"] = (("column", "voxel"),
                            da.empty((n, n_voxels), np.float32, chunks=(n, block)))
        for key, values in zip(("column_space", "column_lag", "column_feature"),
                               weight_columns):
            coords[key] = ("column", np.asarray(values, dtype=object if key != "column_lag"
                                                else np.float64))
            encoding[key] = {"chunks": (n,)}
    for key, (dims, array) in extra.items():
        encoding[key] = {"chunks": array.chunksize}
    ds = ds.assign_coords(coords).assign(
        {key: value for key, value in extra.items()})
    ds["best_weighting"].attrs["long_name"] = "row of the weightings chosen per voxel by CV"
    ds["space_alpha"].attrs["long_name"] = "regularisation of each space: alpha / weighting"
    ds["r2_split"].attrs["long_name"] = "test R^2 split between spaces (product measure)"
    if parts:
        ds["partition"].attrs["long_name"] = "test R^2 unique to / shared by the spaces"
    return dataclasses.replace(template, dataset=ds, encoding=encoding)


def _joint_designs(workspace: Workspace, features: Sequence[str], bgroup: str,
                   lags: Sequence[float], tr: float, aggregate: str) -> list[tuple]:
    """``(features group, design)`` per space, refusing a repeated name and groups
    whose lagged designs keep different BOLD samples (one line naming both)."""
    seen = [f for i, f in enumerate(features) if f in features[:i]]
    if seen:
        raise InputError(f"--features names {seen[0]!r} twice; give each features group "
                         f"once")
    opened = [open_design(workspace, f, bgroup, lags, tr, aggregate) for f in features]
    first = opened[0][1]
    for name, (_, design) in zip(features[1:], opened[1:]):
        same = (design.run.size == first.run.size and np.array_equal(design.run, first.run)
                and np.allclose(design.time, first.time))
        if not same:
            raise InputError(
                f"--features {features[0]} and {name} do not pair with /{bgroup} the same "
                f"way ({first.n_samples} vs {design.n_samples} lagged samples, dropped per "
                f"run {first.dropped} vs {design.dropped}); give features groups "
                f"extracted from the same runs of the same clips")
    return opened


def _space_arrays(opened: list[tuple]) -> list[Any]:
    """Each space's design (sample, lag_feature) float32 as a Dask array over its
    Zarr features (the kernels read it one feature chunk at a time, never whole),
    refusing non-finite values (one streamed pass)."""
    arrays = []
    for fgroup, design in opened:
        X = design.X.astype(np.float32)
        if not bool(da.isfinite(X).all().compute()):
            raise InputError(f"/{fgroup}: features contain NaN or infinite values; check "
                             f"them with: voxelflow verify {fgroup}")
        arrays.append(X)
    return arrays


def _weight_columns(opened: list[tuple], names: Sequence[str], lags: Sequence[float]
                    ) -> tuple[list, list, list]:
    """Per design column: its space, lag (s) and feature name (lag-major per space)."""
    spaces, column_lags, features = [], [], []
    for name, (_, design) in zip(names, opened):
        labels = (design.feature_names if design.feature_names is not None
                  else feature_labels((design.n_features,)))
        for lag in lags:
            spaces += [name] * len(labels)
            column_lags += [float(lag)] * len(labels)
            features += [str(f) for f in labels]
    return spaces, column_lags, features


def run_joint_fit_stage(workspace: Workspace, features: Sequence[str], bold: str,
                        lags: Sequence[float], alphas: Sequence[float], *,
                        weightings: int | str | np.ndarray = DEFAULT_WEIGHTINGS,
                        seed: int = 0, partition: bool = False,
                        test_samples: int | None = None,
                        test_runs: Sequence[int] | None = None,
                        test_repeats: Sequence[Sequence[int]] | None = None,
                        cv: int | str = 5, aggregate: str = "last", device: str = "cpu",
                        name: str | None = None, save_weights: bool = False,
                        save_predictions: bool = False,
                        statistics: StatisticsOptions | None = None,
                        voxel_block: int = VOXEL_BLOCK, overwrite: bool = False,
                        progress: bool = True) -> FitSummary:
    """Banded ridge of ``features`` (several groups) onto every voxel of
    ``/bold/<bold>`` at ``lags`` (s); writes ``/fits/<name>/lags-...`` (default name
    ``A+B+...__<bold>``). Options as :func:`~voxelflow.pipeline.stages.fit.
    run_fit_stage` plus ``weightings`` (count, file or array, see
    :func:`load_weightings`; ``seed`` for the draws) and ``partition`` (2 or 3
    spaces: every sub-model too, and the variance partition)."""
    names = [check_name(f, "--features") for f in features]
    alphas_arr, stats_options = _check_joint_options(names, alphas, lags, device,
                                                     voxel_block, statistics, partition)
    gammas = load_weightings(weightings, len(names), seed)
    bgroup, tr = open_bold(workspace, bold)
    opened = _joint_designs(workspace, names, bgroup, lags, tr, aggregate)
    design = opened[0][1]
    group = fit_group(check_name(name or f"{'+'.join(names)}__{bold}", "--name",
                                 nested=True), lags)
    train, test, groups = _fit_stats.split_samples(design, test_samples, test_runs,
                                                     test_repeats)
    folds = make_folds(cv, design.run[train])
    n_voxels = int(design.Y.shape[1])
    bold_node, valid = bold_validity(workspace, bgroup, n_voxels)
    plan = TestStatistics.plan(stats_options, test.size)
    sub_columns, sub_gammas, parts = _submodels(names, gammas, partition)
    template = _joint_template(
        _fit_template(alphas_arr, bold_node, n_voxels, voxel_block, None, test.size,
                      save_predictions, plan, repeats=groups is not None),
        names, n_voxels, _weight_columns(opened, names, lags) if save_weights else None,
        parts)
    spill = _check_joint_request(workspace, group, [int(d.X.shape[1]) for _, d in opened],
                                 train.size, test.size, alphas_arr.size, folds,
                                 min(voxel_block, n_voxels),
                                 [len(gammas), *(len(g) for g in sub_gammas)], n_voxels,
                                 len(parts), save_weights, save_predictions)
    params = _joint_params(workspace, names, bgroup, lags, alphas_arr, gammas, partition,
                           test_samples, test_runs, groups, cv, aggregate, stats_options,
                           save_weights, save_predictions, voxel_block)
    writer = workspace.start_stage(
        group, params, [template], overwrite=overwrite, per_run=False,
        group_attrs=_joint_group_attrs(names, bgroup, lags, tr, design, train, test, folds,
                                       groups, cv, aggregate, device, stats_options))
    pending = writer.pending_blocks(0)
    if pending:
        client = active_client()
        require_shared_path(client, workspace.path)
        spaces = _space_arrays(opened)
        folder = workspace.scratch_folder(group, "factors") if spill else None
        factors = _factorize_joint(spaces, train, test, alphas_arr, folds, gammas,
                                   sub_columns, sub_gammas, device, names, bgroup,
                                   save_weights, folder)
        repeats = (BoldBlockReader.for_repeats(workspace, bgroup, design, groups)
                   if groups else ())
        work = JointFitWork(factors, BoldBlockReader.from_design(workspace, bgroup, design),
                            writer, train, test, valid, save_weights, save_predictions,
                            stats=plan, repeats=repeats, names=tuple(names))
        run_fit_blocks(work, writer, pending, client, n_voxels, lags, progress)
        if spill:
            workspace.remove_scratch(group)
    summary = finish_fit(workspace, group, writer, len(pending),
                         template.n_blocks - len(pending))
    summary.statistics.append(_split_line(workspace.open_node(group)))
    return summary


def _check_joint_options(names: Sequence[str], alphas: Sequence[float],
                         lags: Sequence[float], device: str, voxel_block: int,
                         statistics: StatisticsOptions | None, partition: bool
                         ) -> tuple[np.ndarray, StatisticsOptions]:
    """The checked alphas (float64 (alpha,)) and statistics options; one-line
    :class:`InputError` on bad lags or ``--partition`` with other than 2 or 3 spaces."""
    alphas_arr = _check_fit_options(alphas, device, voxel_block)
    stats_options = (statistics or StatisticsOptions()).checked()
    if not lags or not all(np.isfinite(l) and l >= 0 for l in lags):
        raise InputError(f"--lags must be seconds >= 0 (got {list(lags)})")
    if partition and len(names) not in PARTITION_SPACES:
        raise InputError(f"--partition needs 2 or 3 --features (got {len(names)})")
    return alphas_arr, stats_options


def _submodels(names: Sequence[str], gammas: np.ndarray, partition: bool
               ) -> tuple[list[tuple[int, ...]], list[np.ndarray], list[str]]:
    """With ``partition``: each proper sub-model's space indices and weightings
    (:func:`sub_weightings`) and the names of the partition's parts (``a``, ``a&b``,
    ...); empty lists without."""
    if not partition:
        return [], [], []
    columns = [c for size in range(1, len(names))
               for c in combinations(range(len(names)), size)]
    return (columns, [sub_weightings(gammas, c) for c in columns],
            [part_name(names, g) for g in subsets(names)])


def _joint_params(workspace: Workspace, names: Sequence[str], bgroup: str,
                  lags: Sequence[float], alphas: np.ndarray, gammas: np.ndarray,
                  partition: bool, test_samples: int | None,
                  test_runs: Sequence[int] | None, groups, cv: int | str, aggregate: str,
                  stats_options: StatisticsOptions, save_weights: bool,
                  save_predictions: bool, voxel_block: int) -> dict:
    """The parameters that made the group (a rerun with others needs --overwrite)."""
    return {
        "stage": "fit", "features": [f"features/{n}" for n in names], "bold": bgroup,
        "lags": [float(l) for l in lags], "alphas": alphas.tolist(),
        "weightings": gammas.tolist(), "partition": bool(partition),
        "test_samples": test_samples, "test_runs": list(test_runs) if test_runs else None,
        "test_repeats": groups, "cv": cv, "aggregate": aggregate,
        "statistics": stats_options.as_params(), "weights": bool(save_weights),
        "predictions": bool(save_predictions), "voxel_block": int(voxel_block),
        "features_params": [workspace.params(f"features/{n}") for n in names],
        "bold_params": workspace.params(bgroup),
    }


def _joint_group_attrs(names: Sequence[str], bgroup: str, lags: Sequence[float], tr: float,
                       design, train: np.ndarray, test: np.ndarray,
                       folds: list[np.ndarray], groups, cv: int | str, aggregate: str,
                       device: str, stats_options: StatisticsOptions) -> dict:
    """The group attrs the report and the statistics read (a single fit's, with
    ``features_groups`` for the spaces)."""
    return {"bold_group": bgroup, "features_groups": [f"features/{n}" for n in names],
            "lags": [float(l) for l in lags], "n_train": int(train.size),
            "n_test": int(test.size), "dropped_per_run": design.dropped,
            "tr": tr, "cv": str(cv), "aggregate": aggregate, "device": device,
            "min_train_per_fold": int(min(train.size - f.size for f in folds)),
            "test_repeats": groups, "statistics": stats_options.as_params(),
            "test_key": _fit_stats.test_key(bgroup, design, test, groups)}


def _split_line(fit: xr.Dataset) -> str:
    """Mean ``r2_split`` per space over voxels with a finite split (one line)."""
    split = fit["r2_split"].values.astype(np.float64)
    defined = np.isfinite(split).all(axis=0)
    means = split[:, defined].mean(axis=1) if defined.any() else [np.nan] * len(split)
    return "test R^2 split between spaces (mean over voxels): " + ", ".join(
        f"{name} {value:.4f}" for name, value in zip(fit["space"].values, means))


def _factorize_joint(spaces: list[np.ndarray], train: np.ndarray, test: np.ndarray,
                     alphas: np.ndarray, folds: list[np.ndarray], gammas: np.ndarray,
                     sub_columns: list[tuple[int, ...]], sub_gammas: list[np.ndarray],
                     device: str, names: Sequence[str], bgroup: str,
                     save_weights: bool = True, folder: Path | None = None
                     ) -> JointFactors:
    """Every weighting's factors of the joint model and of each sub-model (the
    joint model's centred designs only with ``save_weights``); with ``folder`` they
    are spilled there, one file per weighting (:class:`ridge.SpilledFactors`)."""
    if folder is not None:
        (folder / "joint").mkdir()
    try:
        joint = ridge.banded_factors([x[train] for x in spaces], [x[test] for x in spaces],
                                     alphas, gammas, folds, device=device,
                                     keep_weight_factors=True, keep_designs=save_weights,
                                     spill_folder=None if folder is None
                                     else folder / "joint")
        subs = []
        for c, g in zip(sub_columns, sub_gammas):
            sub_folder = None if folder is None else folder / "-".join(map(str, c))
            if sub_folder is not None:
                sub_folder.mkdir()
            subs.append((c, ridge.banded_factors(
                [spaces[i][train] for i in c], [spaces[i][test] for i in c], alphas, g,
                folds, device=device, spill_folder=sub_folder)))
        subs = tuple(subs)
    except ValueError as exc:
        raise InputError(f"--features {' '.join(names)} x /{bgroup}: {exc}") from None
    return JointFactors(joint, subs)


def joint_weights(fit: xr.Dataset, space: str) -> xr.DataArray:
    """One space's weights of a joint fit as ``(lag, feature, voxel)``."""
    if "weights" not in fit or "column_space" not in fit.coords:
        raise InputError("this is not a joint fit with weights; rerun voxelflow fit "
                         "--features A B ... with --save-weights")
    mask = np.asarray(fit["column_space"].values == space)
    if not mask.any():
        raise InputError(f"no space {space!r} in this fit (spaces: "
                         f"{sorted(set(fit['column_space'].values.tolist()))})")
    order = list(dict.fromkeys(fit["column_lag"].values[mask].tolist()))
    features = fit["column_feature"].values[mask][: mask.sum() // len(order)]
    data = fit["weights"].values[mask].reshape(len(order), len(features), -1)
    coords = {k: c for k, c in fit["weights"].coords.items() if c.dims == ("voxel",)}
    return xr.DataArray(data, dims=("lag", "feature", "voxel"), name="weights",
                        coords={**coords, "lag": np.asarray(order, np.float64),
                                "feature": features})
