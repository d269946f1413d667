"""The study's report: Table 2, figures, interactive brain viewers and an HTML page.

- :mod:`~voxelflow.pipeline.study.report.tables`: the numbers (Table 2, ROI means,
  comparisons, winner maps) and how they are written (``1e3``);
- :mod:`~voxelflow.pipeline.study.report.figures`: static figures, PNG + SVG;
- :mod:`~voxelflow.pipeline.study.report.viewers`: nilearn ``view_img`` /
  ``view_surf`` pages, chosen by the fit's geometry, thresholded at the FDR level;
- :mod:`~voxelflow.pipeline.study.report.spaces`: joint fits' per-space pieces (the
  which-space map, the R^2 split and variance partition per ROI);
- :mod:`~voxelflow.pipeline.study.report.page`: ``index.html``;
- :mod:`~voxelflow.pipeline.study.report.build`: :func:`write_report`, the folder.
"""

from __future__ import annotations

from voxelflow.pipeline.study.report.tables import (FDR_Q, SIGNIFICANCE_METHOD, FitResult,
                                                    comparison_sentences, format_alpha,
                                                    format_number, lag_label, model_winners,
                                                    n_significant, ranking, roi_table,
                                                    summary_table, table_markdown)
from voxelflow.pipeline.study.report.build import write_report
from voxelflow.pipeline.study.report.spaces import split_roi_table, which_space
from voxelflow.pipeline.study.report.viewers import displayed_values, map_geometry

__all__ = ["FDR_Q", "SIGNIFICANCE_METHOD", "FitResult", "comparison_sentences",
           "format_alpha", "format_number", "lag_label", "model_winners", "n_significant",
           "ranking", "roi_table", "summary_table", "table_markdown", "write_report",
           "displayed_values", "map_geometry", "split_roi_table", "which_space"]
