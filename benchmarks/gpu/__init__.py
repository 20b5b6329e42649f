"""The sections of ``benchmarks/bench_gpu.py``, one module per thing measured (its entry point is that script)."""
