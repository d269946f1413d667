"""voxelflow: streaming, out-of-core encoding models of fMRI BOLD from movies.

The repository root is this package (``pipeline/`` is :mod:`voxelflow.pipeline`,
``stores/`` is :mod:`voxelflow.stores`, ``cli.py`` is :mod:`voxelflow.cli`).
"""

__version__ = "0.1.0"
