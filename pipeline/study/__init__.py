"""A whole study from one experiment file: plan, run, report, and the offline demo.

- :mod:`~voxelflow.pipeline.study.config`: the experiment file -> :class:`Experiment`;
- :mod:`~voxelflow.pipeline.study.plan`: the stages it needs and what to do about
  each (skip, run, resume, rerun), nothing run;
- :mod:`~voxelflow.pipeline.study.run`: run the plan, then the report;
- :mod:`~voxelflow.pipeline.study.report`: tables, plots, maps and an HTML page from
  stored fits;
- :mod:`~voxelflow.pipeline.study.demo`: the generated movie with planted BOLD behind
  ``voxelflow demo``.

The names below load their module on first use: the CLI imports ``config`` while it
builds its parser, and should not pay for SciPy, Matplotlib or NiBabel there.
"""

from __future__ import annotations

from voxelflow.pipeline.lazy import lazy_exports

_EXPORTS = {
    "Experiment": "config", "ModelSpec": "config", "STUDY_ALPHAS": "config",
    "load_experiment": "config",
    "PlannedStage": "plan", "build_plan": "plan", "training_split": "plan",
    "run_experiment": "run", "execute_plan": "run", "collect_results": "run",
    "make_report": "run",
    "FitResult": "report", "summary_table": "report", "roi_table": "report",
    "ranking": "report", "table_markdown": "report", "write_report": "report",
    "n_significant": "report",
    "run_demo": "demo",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
