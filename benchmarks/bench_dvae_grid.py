"""Which token grid and codebook size serve 64 px real images: equal-wall-clock dVAE runs.

Each variant starts from the ``shapes`` preset's dVAE (VQ, MSE) and changes the fields
given on its line below (as ``dalle train --set`` would); it trains with ``dalle.training.dvae.train_dvae`` on a folder set
(``--data``) for ``--minutes`` of wall clock, holding out the data set's validation split
(the last items in file-name order, the split every ``dalle train`` stage uses).  Then its
exported weights are measured on those held-out images:

  psnr     - dB of decode(encode(x)) on [0, 1] pixels, all held-out pixels pooled
  used     - codes the held-out images use, of the codebook
  ppl      - perplexity of their code histogram (K when every code is used equally)
  steps    - training steps done in the budget (batch of the preset)

One variant a process with ``--threads`` each, so two can run side by side::

    .venv/bin/python benchmarks/bench_dvae_grid.py --data /work/realdata --minutes 9 \\
        --threads 1 --variants g16_k1024_w32 &
    .venv/bin/python benchmarks/bench_dvae_grid.py --data /work/realdata --minutes 9 \\
        --threads 1 --variants g8_k1024_w32 &
    .venv/bin/python benchmarks/bench_dvae_grid.py --table     # markdown table of every result

Results: ``benchmarks/results/dvae_grid/<variant>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from dalle.config import apply_overrides, get_preset
from dalle.data import FolderDataset
from dalle.dvae import DiscreteVAE
from dalle.training.dvae import evaluate_dvae, train_dvae
from dalle.training.state import holdout

RESULTS = Path(__file__).parent / "results" / "dvae_grid"

# name -> ``--set`` overrides of the shapes preset (copies such as the transformer's image grid
# follow, as with ``dalle train --set``).  g = token grid side at 64 px (8: 8x down-sampling,
# num_groups 4; 16: 4x, num_groups 3), k = codebook size, w = hidden width (the full-resolution
# group's channels), b2 = 2 residual blocks a group.  decoder_init_width=0: the dVAE layout the
# saved figures were measured with (before the decoder's 128-channel input convolution).
_BASE = ["dvae.decoder_init_width=0"]
VARIANTS: dict[str, list[str]] = {
    "g8_k512_w16": _BASE + ["dvae.num_groups=4", "dvae.codebook_size=512", "dvae.hidden_width=16"],
    "g8_k1024_w32": _BASE + ["dvae.num_groups=4", "dvae.codebook_size=1024", "dvae.hidden_width=32"],
    "g16_k512_w32": _BASE + ["dvae.num_groups=3", "dvae.codebook_size=512", "dvae.hidden_width=32"],
    "g16_k1024_w32": _BASE + ["dvae.num_groups=3", "dvae.codebook_size=1024", "dvae.hidden_width=32"],
    "g16_k2048_w32": _BASE + ["dvae.num_groups=3", "dvae.codebook_size=2048", "dvae.hidden_width=32"],
    "g16_k1024_w48": _BASE + ["dvae.num_groups=3", "dvae.codebook_size=1024", "dvae.hidden_width=48"],
    "g16_k1024_w32_b2": _BASE + ["dvae.num_groups=3", "dvae.codebook_size=1024", "dvae.hidden_width=32",
                                 "dvae.blocks_per_group=2"],
}


def variant_config(name: str):
    config, _ = apply_overrides(get_preset("shapes"), VARIANTS[name])
    return config


def run(name: str, data: str, minutes: float | None, threads: int, steps: int | None = None) -> dict:
    torch.set_num_threads(threads)
    cfg = variant_config(name)
    dataset = FolderDataset(data)
    n_train, val = holdout(len(dataset), cfg.train, stage="dvae")
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.time(), time.process_time()
        folder = train_dvae(dataset, Path(tmp), cfg, minutes=minutes, steps=steps, progress=False)
        wall, cpu = time.time() - t0, time.process_time() - c0
        model = DiscreteVAE.from_pretrained(folder)
        done = _last_step(Path(tmp))
    held_out = torch.utils.data.Subset(dataset, list(val))
    figures = evaluate_dvae(model, held_out, n=len(val))
    params = sum(p.numel() for p in model.parameters())
    return {
        "variant": name, "grid": cfg.dvae.grid_size, "codebook": cfg.dvae.codebook_size,
        "hidden_width": cfg.dvae.hidden_width, "blocks_per_group": cfg.dvae.blocks_per_group,
        "params": params, "minutes": minutes, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "threads": threads,
        "steps": done, "budget": f"{minutes} minutes" if minutes else f"{steps} steps",
        "held_out": f"last {len(val)} of {len(dataset)} items (file-name order) of {data}",
        "psnr": round(figures["psnr"], 2), "codes_used": round(figures["codebook_usage"] * cfg.dvae.codebook_size),
        "perplexity": round(figures["perplexity"], 1), "load_avg": os.getloadavg()[0],
    }


def _last_step(out: Path) -> int | None:
    log = out / "logs" / "dvae.csv"
    if not log.exists():
        return None
    rows = [line.split(",") for line in log.read_text().splitlines()]
    col = rows[0].index("step") if rows and "step" in rows[0] else 0
    return int(rows[-1][col]) if len(rows) > 1 else None


def table() -> str:
    lines = ["| variant | token grid | codes | hidden width | params | budget | steps | CPU s a step | load avg | "
             "held-out PSNR | codes used | perplexity |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f in sorted(RESULTS.glob("*.json")):
        r = json.loads(f.read_text())
        budget = r["budget"] if "budget" in r else f"{r['minutes']:g} minutes"
        cpu = f"{r['cpu_s'] / r['steps']:.2f}" if "cpu_s" in r else "n/a"
        lines.append(f"| {r['variant']} | {r['grid']}x{r['grid']} | {r['codebook']} | {r['hidden_width']} | "
                     f"{r['params'] / 1e6:.2f}M | {budget} | {r['steps']} | {cpu} | {r['load_avg']:.1f} | "
                     f"{r['psnr']:.2f} dB | {r['codes_used']} of {r['codebook']} | {r['perplexity']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="folder set (image + same-named .txt)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None, help="wall-clock budget of each variant (default 9)")
    budget.add_argument("--steps", type=int, default=None, help="a fixed step count instead (equal compute)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=[], choices=sorted(VARIANTS))
    p.add_argument("--table", action="store_true", help="print the markdown table of saved results")
    args = p.parse_args()
    if args.table:
        print(table())
        return
    if not args.data or not args.variants:
        p.error("--data and --variants are needed (or --table)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        minutes = args.minutes if args.minutes or args.steps else 9.0
        result = run(name, args.data, minutes, args.threads, args.steps)
        tag = f"{args.steps}steps" if args.steps else f"{minutes:g}min"
        (RESULTS / f"{name}_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
