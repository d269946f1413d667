"""Generated stimuli and simulated BOLD for the demo, tests and benchmarks:
movies written with PyAV (:mod:`~voxelflow.pipeline.synthetic.movies`) and BOLD with a
planted answer (:mod:`~voxelflow.pipeline.synthetic.simulate`)."""

from voxelflow.pipeline.synthetic.movies import (
    index_frame,
    read_index,
    write_index_video,
    write_moving_video,
    write_scene_movie,
)
from voxelflow.pipeline.synthetic.simulate import canonical_hrf, planted_response

__all__ = [
    "canonical_hrf", "index_frame", "planted_response", "read_index", "write_index_video",
    "write_moving_video", "write_scene_movie",
]
