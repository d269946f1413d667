"""One torch intra-op thread for a test module (import ``one_torch_thread`` into it).

With two pytest workers on two cores, each torch op's default two OpenMP threads wait
for each other at every barrier while the other worker holds a core: a ResNet-50
forward at 64 px was measured at 8x the CPU seconds (and the wall time) of one thread
on the loaded test machine.  The modules that use this compare stored results only
with references computed in the same process under the same setting (or in Dask
workers, which the nanny starts with ``OMP_NUM_THREADS=1``), so bitwise checks hold.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch on one intra-op thread for the module; the previous count restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
