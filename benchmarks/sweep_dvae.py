"""One dVAE run on the shapes set with config overrides: the probes and the side-by-side of BENCHMARKS.md.

Trains the ``shapes`` preset's dVAE (``dalle.training.dvae.train_dvae``) on the streamed
shapes training set for a wall-clock budget, on one thread by default, then measures the
exported weight average on held-out images (the shapes "val" split, never trained on):

  psnr            decode(encode(x)), dB on [0, 1] pixels, all pixels of all images pooled
  codebook_usage  share of the codebook the held-out images' tokens use (and perplexity)

Overrides are ``section.field=value`` on the preset (JSON values), e.g.::

    .venv/bin/python benchmarks/sweep_dvae.py --name paper --minutes 4 \\
        dvae.quantizer='"gumbel"' dvae.recon_loss='"logit_laplace"' dvae.kl_weight=6.6 \\
        dvae.straight_through=false train.dvae_lr=1e-4

One JSON line per run is appended to ``--results`` (default
benchmarks/results/sweep_dvae.jsonl) with the overrides, steps, seconds a step, the machine's
load average and the figures.  Run two at once to compare two settings under equal load.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from dalle.config import get_preset
from dalle.data.shapes import ShapesDataset
from dalle.dvae import DiscreteVAE
from dalle.training.dvae import evaluate_dvae, train_dvae


def apply_overrides(cfg, overrides: list[str]) -> dict:
    """Set ``section.field=json`` pairs on ``cfg``; return them as a dict."""
    done = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        section, _, name = key.partition(".")
        part = getattr(cfg, section)
        if not hasattr(part, name):
            raise SystemExit(f"unknown field {key!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare word: a string
        setattr(part, name, value)
        done[key] = value
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="section.field=value (JSON) on the preset")
    ap.add_argument("--name", required=True)
    ap.add_argument("--group", default="", help="label shared by runs made side by side (same load)")
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--preset", default="shapes")
    ap.add_argument("--train-size", type=int, default=100_000)
    ap.add_argument("--eval-n", type=int, default=256)
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/sweep_dvae.jsonl"))
    ap.add_argument("--out", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    overrides = apply_overrides(cfg, args.overrides)
    train = ShapesDataset("train", args.train_size, seed=0)
    val = ShapesDataset("val", args.eval_n, seed=0)
    out = args.out or Path(tempfile.mkdtemp(prefix=f"sweep_dvae_{args.name}_"))
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    export = train_dvae(train, out, cfg, minutes=args.minutes, steps=10**9, eval_dataset=val,
                        sample_every=10**9, log_every=100, progress=False)
    seconds = time.perf_counter() - t0
    model = DiscreteVAE.from_pretrained(export)
    stats = evaluate_dvae(model, val, n=args.eval_n)
    rows = (out / "logs" / "dvae.csv").read_text().strip().splitlines()
    steps = int(rows[-1].split(",")[0])
    result = {"name": args.name, "group": args.group, "overrides": overrides, "minutes": args.minutes, "threads": args.threads,
              "steps": steps, "train_seconds": round(seconds, 1), "s_per_step": round(seconds / steps, 3),
              "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              **{k: round(v, 4) for k, v in stats.items()}, "folder": str(out)}
    print(json.dumps(result), flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
