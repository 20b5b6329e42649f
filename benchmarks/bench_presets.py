"""Seconds per training step of each preset's dVAE, transformer and CLIP on this CPU.

What ``dalle info --presets`` prints as a rough time per step comes from this script's
output, ``dalle/preset_timings.json``, with the conditions it was measured under.

A step here is what each training loop repeats: forward, loss, backward and an AdamW
update, in fp32 on random inputs of the preset's shapes (the data pipeline, the weight
average and the evaluations are left out, so a real run is somewhat slower).  Presets
too large to step at their own batch size on a CPU in reasonable time are measured at a
smaller batch and scaled linearly to the preset's batch: those figures are marked
``"scaled_from_batch"`` and printed as estimates.

    .venv/bin/python benchmarks/bench_presets.py                 # all presets, 1 thread
    .venv/bin/python benchmarks/bench_presets.py --presets small-64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from dalle.clip import CLIP
from dalle.config import PRESETS, DalleConfig, get_preset
from dalle.dvae import DiscreteVAE
from dalle.transformer import DalleTransformer

TIMINGS_FILE = Path(__file__).resolve().parent.parent / "dalle" / "preset_timings.json"
# The GPU presets: each component is stepped at this batch on the CPU and scaled to its own.
MEASURED_BATCH = {"base-128": {"dvae": 4, "transformer": 2, "clip": 8},
                  "base-256": {"dvae": 2, "transformer": 1, "clip": 4}}
SKIP = {"paper"}  # 12 billion parameters: no CPU can step it


def _time(step, repeats: int) -> tuple[float, float]:
    """Median (wall seconds, CPU seconds of this process) of ``repeats`` calls after a warm-up.

    On a machine shared with other jobs the wall time grows with their load while the CPU time
    stays close to what the step costs: with one thread it is the wall time of an idle core.
    """
    step()  # warm-up: allocations, first-call dispatch
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def _stepper(model: torch.nn.Module, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


def time_component(config: DalleConfig, component: str, batch: int, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    if component == "dvae":
        model = DiscreteVAE(config.dvae).train()
        size = config.dvae.image_size
        images = torch.rand(batch, config.dvae.channels, size, size)
        return _time(_stepper(model, lambda: model(images).loss), repeats)
    if component == "transformer":
        t = config.transformer
        t.attention_impl = "dense"  # what a CPU runs
        model = DalleTransformer(t).train()
        text = torch.randint(0, t.text_vocab - t.text_len, (batch, t.text_len))
        images = torch.randint(0, t.image_vocab, (batch, t.image_grid, t.image_grid))
        return _time(_stepper(model, lambda: model.loss(text, images)[0]), repeats)
    c = config.clip
    model = CLIP(c).train()
    text = torch.randint(0, c.text_vocab - c.text_len, (batch, c.text_len))
    images = torch.rand(batch, 3, c.image_size, c.image_size)
    return _time(_stepper(model, lambda: model(text, images)), repeats)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="*", default=[p for p in PRESETS if p not in SKIP])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per component (median)")
    parser.add_argument("--out", type=Path, default=TIMINGS_FILE)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    presets = old.get("presets", {}) if old.get("threads") == args.threads else {}
    load_start = load_average()
    for name in args.presets:
        config = get_preset(name)
        batches = {"dvae": config.train.dvae_batch, "transformer": config.train.transformer_batch,
                   "clip": config.train.clip_batch}
        row = {}
        for component, batch in batches.items():
            measured = min(batch, MEASURED_BATCH.get(name, {}).get(component, batch))
            wall, cpu = time_component(get_preset(name), component, measured, args.repeats)
            wall, cpu = wall * batch / measured, cpu * batch / measured
            row[component] = {"cpu_seconds_per_step": round(cpu, 4), "wall_seconds_per_step": round(wall, 4),
                              "batch": batch}
            if measured != batch:
                row[component]["scaled_from_batch"] = measured
            print(f"{name:10s} {component:12s} batch {batch:3d}: {cpu:8.3f} CPU s/step, {wall:8.3f} wall s/step"
                  + (f" (estimate: timed at batch {measured}, scaled)" if measured != batch else ""), flush=True)
        presets[name] = row
    result = {
        "what": ("seconds per training step (forward, backward, AdamW) in fp32 on random inputs, no data loading: "
                 "CPU seconds of the process (with 1 thread: an idle core's wall time) and wall seconds (which "
                 "grow with other jobs' load)"),
        "command": "benchmarks/bench_presets.py --threads %d --repeats %d" % (args.threads, args.repeats),
        "threads": args.threads,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        # Other processes on the machine slow every figure down: the 1-minute load average
        # (runnable processes) before and after says how busy it was.
        "load_average_1min": [load_start, load_average()],
        "torch": torch.__version__,
        "date": date.today().isoformat(),
        "presets": presets,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
