import os

# Before torch is imported anywhere.  Tests share the CPU with subprocesses (torchrun,
# the CLI, the browser): with OpenMP's default busy-waiting, torch's threads spin against
# them, measured up to 40x slower on 2 busy cores.  The package keeps PyTorch's default,
# which is ~2.5x faster for sampling on an idle machine (BENCHMARKS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
