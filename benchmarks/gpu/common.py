"""What every section of ``bench_gpu.py`` shares: the layout, the peer's figures, timing under a deadline."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dalle.config import TransformerConfig

PEER = {
    "train_full_tok_s": 46_000.0,
    "train_full_mfu": 0.079,
    "train_sparse_tok_s": 51_700.0,
    "sample_s_per_image": 3.43,
    "sample_cached_s_per_image": 3.20,
}
TARGETS = {"mfu": 0.40, "sample_speedup_vs_peer": 30.0, "sparse_attention_speedup": 2.0}
# Dense bf16 peak (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0)]
SCHEDULE_12 = ["column" if (i - 2) % 4 == 0 else "row" for i in range(12)][:-1] + ["conv"]


class SectionTimeout(Exception):
    pass


@contextmanager
def time_box(seconds: float) -> Iterator[None]:
    """Raise :class:`SectionTimeout` in this (main) thread after ``seconds`` (SIGALRM; no-op where missing)."""
    if seconds <= 0:
        raise SectionTimeout("no time left in the budget")
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"section exceeded its {seconds:.0f} s time box")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Bench:
    """Runs sections under a global deadline, records results, rewrites the JSON after each."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        self.start = time.perf_counter()
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.meta: dict[str, Any] = {}

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def run(self, name: str, fn: Callable[[], Any], box: float, min_left: float = 5.0) -> Any:
        """Run section ``fn`` within ``min(box, time left)`` seconds; record its result or its error."""
        seconds = min(box, self.left() - 2.0)
        if seconds < min_left:
            self.errors[name] = f"skipped: {self.left():.0f} s left of the {self.args.budget:.0f} s budget"
            print(f"[{name}] {self.errors[name]}", flush=True)
            self.save()
            return None
        t0 = time.perf_counter()
        try:
            with time_box(seconds):
                out = fn()
            if out is not None:
                self.results[name] = out
                print(f"[{name}] {json.dumps(out, default=str)}  ({time.perf_counter() - t0:.1f} s)", flush=True)
            return out
        except BaseException as e:  # noqa: BLE001 - a benchmark section never stops the others
            if isinstance(e, KeyboardInterrupt):
                raise
            self.errors[name] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"[{name}] FAILED after {time.perf_counter() - t0:.1f} s: {self.errors[name]}", flush=True)
            if not isinstance(e, SectionTimeout):
                traceback.print_exc(limit=6)
            return None
        finally:
            self.cleanup()
            self.save()

    def cleanup(self) -> None:
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - a failed kernel may leave an error to report here
                traceback.print_exc(limit=2)
            torch.cuda.empty_cache()

    def save(self) -> None:
        if not self.args.json:
            return
        payload = {"meta": self.meta, "peer": PEER, "targets": TARGETS, "results": self.results,
                   "errors": self.errors, "elapsed_s": round(time.perf_counter() - self.start, 1)}
        path = Path(self.args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        os.replace(tmp, path)


# --- configuration ------------------------------------------------------------------------------


def layout(args: argparse.Namespace, attention: str, impl: str) -> TransformerConfig:
    if args.smoke:  # tiny, CPU-sized; same code paths
        return TransformerConfig(n_layers=4, n_heads=2, head_dim=16, text_vocab=64 + 16, text_len=16,
                                 image_vocab=64, image_grid=6, attention=attention, conv_kernel=3,
                                 attention_impl=impl)
    return TransformerConfig(n_layers=args.layers, n_heads=args.heads, head_dim=64, text_vocab=16384 + 256,
                             text_len=256, image_vocab=8192, image_grid=32, attention=attention, conv_kernel=11,
                             attention_impl=impl)


def peak_tflops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return name, peak
    return name, None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(config: TransformerConfig, params: int, batch: int) -> float:
    """The peer's formula (module docstring): FLOPs of one training step."""
    seq = config.seq_len
    tokens = batch * seq
    return 6.0 * params * tokens + 12.0 * config.n_layers * tokens * seq * config.d_model
