"""Finding a subject's BOLD runs in a BIDS dataset or fMRIPrep derivatives (pybids).

:func:`find_bids_runs` indexes ``root`` with :class:`bids.BIDSLayout` (raw BIDS, with
``derivatives/`` indexed too when present, or a derivative dataset itself, recognised
by ``"DatasetType": "derivative"`` in its ``dataset_description.json``) and returns the
runs of one subject and task in acquisition order (session, then the ``run`` entity,
then the file name), each with:

* ``files``: the run's file, or its two hemisphere files (``hemi-L``, ``hemi-R``) for
  GIFTI ``*.func.gii`` runs;
* ``tr``: ``RepetitionTime`` of its JSON sidecar (with BIDS inheritance), or None;
* ``events``: the raw dataset's ``*_events.tsv`` of the same subject, session, task,
  acquisition and run, or None;
* ``entities``: the BIDS entities of the run (stored in its node attrs).

Raw files are searched unless ``space`` or ``desc`` is given (or ``root`` is a
derivative dataset); then the derivatives.  A subject, task, session, space or desc
that matches nothing raises a one-line error naming what is there.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from voxelflow.pipeline.errors import InputError, exception_reason

__all__ = ["BIDS_EXTENSIONS", "BidsRun", "bids_stage_inputs", "find_bids_runs"]

BIDS_EXTENSIONS = [".nii.gz", ".nii", ".dtseries.nii", ".func.gii"]
_MATCH = ("subject", "session", "task", "acquisition", "run")  # entities events share


@dataclass(frozen=True)
class BidsRun:
    """One run found in the dataset."""

    files: tuple[str, ...]
    tr: float | None
    events: str | None
    entities: dict


def _layout(root: Path):
    from bids import BIDSLayout

    description = root / "dataset_description.json"
    if not description.is_file():
        raise InputError(f"{root}: not a BIDS dataset (no dataset_description.json); give "
                         f"the dataset root or its derivatives/fmriprep folder to --bids")
    try:
        derivative = json.loads(description.read_text()).get("DatasetType") == "derivative"
    except ValueError as exc:
        raise InputError(f"{description}: not valid JSON ({exc}); fix the file") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if derivative:
                return BIDSLayout(root, validate=False, is_derivative=True), True
            return BIDSLayout(root, validate=True,
                              derivatives=(root / "derivatives").is_dir()), False
    except Exception as exc:  # pybids raises BIDSValidationError, ValueError, ...
        raise InputError(f"{root}: pybids cannot index this dataset "
                         f"({exception_reason(exc)}); check it with the BIDS validator"
                         ) from None


def _explain_empty(layout, scope: str, query: dict, root: Path) -> InputError:
    """Which of subject / session / task / space / desc matched nothing, and what is there."""
    narrowed = {"suffix": "bold", "extension": BIDS_EXTENSIONS}
    for entity, option in (("subject", "--subject"), ("session", "--session"),
                           ("task", "--task"), ("space", "--space"), ("desc", "--desc")):
        if entity not in query:
            continue
        there = sorted({str(v) for v in layout.get(return_type="id", target=entity,
                                                   scope=scope, **narrowed)})
        if query[entity] not in there:
            what = ", ".join(there) or "none"
            return InputError(f"{root}: no BOLD runs with {option} {query[entity]} ({entity}s "
                              f"there: {what})")
        narrowed[entity] = query[entity]
    return InputError(f"{root}: no BOLD runs match {query} in the {scope} files")


def _check_one_value(files: list, entity: str, option: str, root: Path) -> None:
    values = sorted({str(f.entities.get(entity)) for f in files})
    if len(values) > 1:
        raise InputError(f"{root}: the runs come in several {entity}s ({', '.join(values)}); "
                         f"choose one with {option}")


def _sort_key(entities: dict) -> tuple:
    run = entities.get("run")
    return (str(entities.get("session", "")), int(run) if run is not None else -1)


def find_bids_runs(root: str | Path, subject: str, task: str, *, session: str | None = None,
                   space: str | None = None, desc: str | None = None) -> list[BidsRun]:
    """The runs of ``subject`` / ``task`` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: --bids must be a BIDS dataset folder")
    layout, derivative = _layout(root)
    scope = "derivatives" if (space or desc) and not derivative else "all"
    if not derivative and scope == "all":
        scope = "raw"
    query = {"subject": subject, "task": task}
    query |= {k: v for k, v in (("session", session), ("space", space), ("desc", desc)) if v}
    files = layout.get(scope=scope, suffix="bold", extension=BIDS_EXTENSIONS, **query)
    if not files:
        raise _explain_empty(layout, scope, query, root)
    for entity, option in (("space", "--space"), ("desc", "--desc"), ("extension", "--space")):
        _check_one_value(files, entity, option, root)
    grouped: dict[tuple, list] = {}
    for f in files:
        key = tuple(sorted((k, str(v)) for k, v in f.get_entities(metadata=False).items()
                           if k != "hemi"))
        grouped.setdefault(key, []).append(f)
    runs = []
    for members in sorted(grouped.values(), key=lambda m: (_sort_key(m[0].entities),
                                                          m[0].filename)):
        members.sort(key=lambda f: str(f.entities.get("hemi", "")))  # L before R
        runs.append(_bids_run(layout, members))
    hemis = {tuple(r.entities.get("hemi", ())) for r in runs}
    if len(hemis) > 1:
        raise InputError(f"{root}: some runs have other hemisphere files than others "
                         f"({sorted(hemis)}); every GIFTI run needs the same hemi-L/hemi-R set")
    return runs


def _bids_run(layout, members: list) -> BidsRun:
    from bids.layout import Query

    first = members[0]
    entities = {k: (v if isinstance(v, (int, float)) else str(v))
                for k, v in first.get_entities(metadata=False).items()
                if k not in ("hemi", "extension")}
    if len(members) > 1 or "hemi" in first.entities:
        entities["hemi"] = [str(f.entities["hemi"]) for f in members]
    tr = first.get_metadata().get("RepetitionTime")
    match = {k: first.entities[k] if k in first.entities else Query.NONE for k in _MATCH}
    events = layout.get(scope="raw", suffix="events", extension=".tsv", **match)
    return BidsRun(tuple(f.path for f in members), float(tr) if tr is not None else None,
                   events[0].path if events else None, entities)


def bids_stage_inputs(runs: list[BidsRun], root: str | Path
                      ) -> tuple[list, float | None, list[dict]]:
    """What :func:`~voxelflow.pipeline.stages.bold.run_bold_stage` takes: the runs (a
    file, or a hemisphere tuple), the sidecars' TR (None when a sidecar gives none: the
    file headers are used) and each run's attrs (``bids`` entities, ``events`` file)."""
    trs = {r.tr for r in runs}
    if len(trs - {None}) > 1:
        raise InputError(f"{root}: the runs' sidecars give different RepetitionTime values "
                         f"({sorted(trs - {None})}); ingest them as separate subjects")
    tr = None if None in trs else trs.pop()
    files = [r.files if len(r.files) > 1 or r.files[0].endswith(".func.gii") else r.files[0]
             for r in runs]
    attrs = [{"bids": r.entities, "events_file": r.events or ""} for r in runs]
    return files, tr, attrs
