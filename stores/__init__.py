"""Storage: the only package that touches Zarr paths, templates and resume state."""

from stores.workspace import (
    DEFAULT_STORE,
    RunTemplate,
    StageWriter,
    Workspace,
    iter_run_blocks,
    run_node_name,
)

__all__ = [
    "DEFAULT_STORE",
    "RunTemplate",
    "StageWriter",
    "Workspace",
    "iter_run_blocks",
    "run_node_name",
]
