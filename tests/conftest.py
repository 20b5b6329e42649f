import os

import pytest

# Before torch is imported anywhere.  Tests share the CPU with subprocesses (torchrun,
# the CLI, the browser): with OpenMP's default busy-waiting, torch's threads spin against
# them, measured up to 40x slower on 2 busy cores.  The package keeps PyTorch's default,
# which is ~2.5x faster for sampling on an idle machine (BENCHMARKS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")



@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster on a busy machine (modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
