"""The lagged design: stimulus features paired with BOLD at hemodynamic delays, and the
train/test split of its samples (:mod:`~voxelflow.pipeline.design.lags`)."""

from voxelflow.pipeline.design.lags import (
    AGGREGATES,
    LaggedDesign,
    build_design,
    check_run_lengths,
    check_runs_match,
    durations_match,
    first_test_frame,
    frame_indices_for,
    needed_frame_indices,
    parse_lags,
    run_design_indices,
    run_length_problem,
    split_train_test,
)

__all__ = [
    "AGGREGATES", "LaggedDesign", "build_design", "check_run_lengths", "check_runs_match",
    "durations_match", "first_test_frame", "frame_indices_for", "needed_frame_indices", "parse_lags",
    "run_design_indices", "run_length_problem", "split_train_test",
]
