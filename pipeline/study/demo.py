"""The embedded demo behind ``make demo`` / ``voxelflow demo``: a whole study, offline.

1. Generate a synthetic movie (scenes of drifting textures and moving shapes, with
   hard cuts) as a real H.264 file.
2. Frames at ``fps``, 224 x 224; features from the offline ImageNet-pretrained
   EfficientNet-Lite0 and from a random-weight ResNet-50.
3. Simulate BOLD for ~2,000 voxels from EfficientNet-Lite0's features at the lag set
   4, 5, 6, 7 s through a canonical HRF plus noise (:mod:`voxelflow.pipeline.synthetic.simulate`), write it
   as a NIfTI run with its mask: the planted answer.
4. Run the experiment (both models x four lag sets x 12 alphas, last 20 % of samples
   held out, 5-fold CV) and write the report; the planted model and lag set should
   rank first.

Everything goes into ``demo_workspace/`` (an ``experiment.toml`` there can be rerun
with ``voxelflow run demo_workspace/experiment.toml``: nothing is recomputed).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from voxelflow.pipeline.study.config import Experiment, ModelSpec, load_experiment

PLANTED_MODEL = "efficientnet_lite0"
PLANTED_LAGS = [4.0, 5.0, 6.0, 7.0]
DEMO_LAG_SETS = [[4.0], [4.0, 5.0, 6.0, 7.0], [4.0, 5.0, 6.0], [4.0, 4.5, 5.0, 5.5]]
DISTRACTOR = "resnet50"  # random weights: the model that should rank below the planted one
DEMO_ALPHAS = [0.5, 1, 5, 10, 1e2, 1e3, 1e4, 2.5e4, 5e4, 1e5, 1e6, 1e7]


def experiment_toml(movie: Path, bold: Path, mask: Path, *, fps: float, test_samples: int,
                    seconds_tr: float, distractor: str = DISTRACTOR,
                    lag_sets: list[list[float]] = DEMO_LAG_SETS) -> str:
    """The demo's experiment file (paths relative to the demo folder); ``distractor``:
    the torchvision model with random weights that competes with the planted one."""
    lag_text = ", ".join("[" + ", ".join(f"{l:g}" for l in ls) + "]" for ls in lag_sets)
    alphas = ", ".join(f"{a:g}" for a in DEMO_ALPHAS)
    return f"""# The voxelflow demo: a generated movie and simulated BOLD with a planted answer
# ({PLANTED_MODEL} features at lags {','.join(f'{l:g}' for l in PLANTED_LAGS)} s).
[experiment]
name = "demo"
store = "voxelflow.zarr"
reports = "reports"

[stimulus]
name = "movie"
videos = ["{movie.name}"]
fps = {fps:g}
size = 224
frames = "all"  # the BOLD is simulated from the features of every frame

[bold]
subject = "simulated"
runs = ["{bold.name}"]
mask = "{mask.name}"
tr = {seconds_tr:g}

[[models]]
name = "{PLANTED_MODEL}"
model = "efficientnet_lite0"
weights = "imagenet"

[[models]]
name = "{distractor}_random"
model = "{distractor}"
weights = "random:0"

[fit]
lag_sets = [{lag_text}]
alphas = [{alphas}]
test_samples = {test_samples}
cv = 5
"""


def simulate_bold_files(features: np.ndarray, frame_times: np.ndarray, n_volumes: int,
                        tr: float, out_bold: Path, out_mask: Path, *, n_voxels_target: int,
                        snr: float, seed: int) -> int:
    """Write the simulated run and its mask as NIfTI; return the number of voxels."""
    from voxelflow.pipeline.synthetic.simulate import planted_response

    side = int(np.ceil((n_voxels_target * 6 / np.pi) ** (1 / 3))) + 2
    g = (np.mgrid[0:side, 0:side, 0:side] - (side - 1) / 2) / ((side - 1) / 2)
    r2 = (g ** 2).sum(0)
    order = np.argsort(r2, axis=None, kind="stable")[:n_voxels_target]
    mask = np.zeros(side ** 3, dtype=np.uint8)
    mask[order] = 1
    mask = mask.reshape(side, side, side)
    bold_times = np.arange(n_volumes) * tr
    bold, _ = planted_response(features, frame_times, bold_times, PLANTED_LAGS,
                               int(mask.sum()), snr=snr, seed=seed)
    vol = np.zeros((side, side, side, n_volumes), dtype=np.float32)
    vol[mask.astype(bool)] = bold.T
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = -1.5 * side
    img = nib.Nifti1Image(vol, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = tr
    nib.save(img, str(out_bold))
    nib.save(nib.Nifti1Image(mask, affine), str(out_mask))
    return int(mask.sum())


def run_demo(workdir: Path, *, seconds: float = 300.0, fps: float = 4.0, tr: float = 1.0,
             n_voxels: int = 2000, snr: float = 1.0, seed: int = 0, progress: bool = True,
             log=print, report: bool = True, movie_rate: int = 24,
             distractor: str = DISTRACTOR,
             lag_sets: list[list[float]] = DEMO_LAG_SETS) -> dict:
    """Generate, simulate, run the experiment; return the experiment result dict.

    ``report=False`` stops after the stages (no report: ``result["report"]`` is None),
    for callers that compare the stored arrays only.  ``movie_rate``: frames per second
    of the generated movie (the frames stage samples it at ``fps``; a lower rate is
    cheaper to generate); ``distractor``: the torchvision model with random weights
    fitted next to the planted one (a smaller one is cheaper; ``make demo``: resnet50);
    ``lag_sets``: the lag sets fitted (s; ``make demo``: the study's four)."""
    from voxelflow.pipeline.study.plan import build_plan
    from voxelflow.pipeline.study.run import execute_plan, make_report
    from voxelflow.pipeline.synthetic.movies import write_scene_movie
    from voxelflow.stores.workspace import Workspace

    t_start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    movie = workdir / "movie.mp4"
    bold = workdir / "simulated_bold.nii.gz"
    mask = workdir / "simulated_mask.nii.gz"
    if not movie.exists():
        log(f"generating a {seconds:g} s synthetic movie -> {movie}")
        write_scene_movie(movie, seconds, rate=movie_rate, seed=seed, scene_seconds=1.0)
    n_volumes = int(seconds // tr)
    test_samples = int(round(0.2 * (n_volumes - PLANTED_LAGS[-1] / tr)))
    toml = workdir / "experiment.toml"
    toml.write_text(experiment_toml(movie, bold, mask, fps=fps, test_samples=test_samples,
                                    seconds_tr=tr, distractor=distractor,
                                    lag_sets=lag_sets))
    exp = _experiment_before_bold(toml, workdir, movie, bold, mask, fps, tr, test_samples,
                                  distractor, lag_sets)
    ws = Workspace(exp.store)

    # Stimulus stages first: the simulated BOLD is made from the planted model's features
    # (the BOLD file does not exist yet: the full plan below checks every input).
    plan = build_plan(exp, ws, progress=progress, check=False)
    first = [s for s in plan if s.kind == "frames" or s.group == f"features/{PLANTED_MODEL}"]
    execute_plan(ws, first, log)
    if not bold.exists():
        feats = ws.open_run(f"features/{PLANTED_MODEL}", 0)
        n = simulate_bold_files(feats["features"].values, feats["time"].values, n_volumes, tr,
                                bold, mask, n_voxels_target=n_voxels, snr=snr, seed=seed)
        log(f"simulated BOLD: {n} voxels x {n_volumes} volumes (TR {tr:g} s) -> {bold}")
    exp = load_experiment(toml)
    plan = build_plan(exp, ws, progress=progress)
    ran = execute_plan(ws, plan, log)
    made = make_report(exp, ws) if report else None
    return {"experiment": exp, "plan": plan, "ran": ran, "report": made,
            "seconds": time.perf_counter() - t_start}


def _experiment_before_bold(toml: Path, workdir: Path, movie: Path, bold: Path, mask: Path,
                            fps: float, tr: float, test_samples: int,
                            distractor: str = DISTRACTOR,
                            lag_sets: list[list[float]] = DEMO_LAG_SETS) -> Experiment:
    """The demo experiment before its BOLD file exists (the file check comes later)."""
    if bold.exists() and mask.exists():
        return load_experiment(toml)
    return Experiment(
        name="demo", source=toml, store=workdir / "voxelflow.zarr", reports=workdir / "reports",
        stimulus_name="movie", videos=[movie], fps=fps, size=224, resize="squash",
        subject="simulated", bold_runs=[bold], mask=mask, tr=tr, zscore=True, detrend="none",
        models=[ModelSpec(PLANTED_MODEL, "efficientnet_lite0", weights="imagenet"),
                ModelSpec(f"{distractor}_random", distractor, weights="random:0")],
        lag_sets=lag_sets, alphas=[float(a) for a in DEMO_ALPHAS],
        test_samples=test_samples, test_runs=None, cv=5, aggregate="last", device="cpu",
        frames="all")


def print_summary(out: dict, log=print) -> None:
    from voxelflow.pipeline.study.report import ranking, table_markdown

    table = out["report"]["table"]
    log("")
    log(table_markdown(table))
    top = ranking(table).iloc[0]
    log(f"best (mean r at CV-selected alphas): {top['model']}, lags {top['lags']} "
        f"(planted: {PLANTED_MODEL}, lags {','.join(f'{l:g}' for l in PLANTED_LAGS)})")
    for line in out["report"].get("comparisons", [])[1:]:
        log(line)
    log(f"report: {out['report']['files']['html']}")
    log(f"finished in {out['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voxelflow demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("demo_workspace"))
    parser.add_argument("--seconds", type=float, default=300.0, help="movie length (300)")
    parser.add_argument("--fps", type=float, default=4.0, help="frames per second (4)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    out = run_demo(args.workdir, seconds=args.seconds, fps=args.fps, progress=args.progress)
    print_summary(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
