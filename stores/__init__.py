"""Storage: the only package that touches Zarr paths, templates and resume state."""

from voxelflow.stores.workspace import (
    DEFAULT_STORE,
    RunTemplate,
    StageWriter,
    Workspace,
    run_node_name,
)

__all__ = [
    "DEFAULT_STORE",
    "RunTemplate",
    "StageWriter",
    "Workspace",
    "run_node_name",
]
