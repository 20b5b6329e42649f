"""The image tokenizer on the shapes set: Gumbel dVAE (the paper's) against a VQ-VAE.

Each variant is trained with the ``shapes`` preset by ``dalle.training.dvae.train_dvae``
for the same budget, then its EMA weights are measured on held-out (val) images:

  psnr       - of decode(encode(x)), dB on [0, 1] pixels
  codes      - fraction of the codebook the held-out images use, and the perplexity
  judge      - fraction of reconstructions that the shapes judge passes with the
               image's own caption (every object kept, with its colour and shape)
  s/step     - training seconds a step (budget spent / steps), batch of the preset

    .venv/bin/python benchmarks/bench_dvae.py [--minutes 20 | --steps N] [--variants gumbel vq]
                                              [--threads 2] [--out DIR]

Before the numbers, it times one training step of the preset with 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from dalle.config import get_preset
from dalle.data.shapes import ShapesDataset
from dalle.dvae import DiscreteVAE
from dalle.training.dvae import batch_for_step, evaluate_dvae, fixed_images, reconstruct, train_dvae


def time_step(config, threads: int, repeats: int = 5) -> float:
    """Median seconds of one forward/backward/update of the preset's dVAE."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = DiscreteVAE(config.dvae).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = batch_for_step(ShapesDataset("train", 1000), 0, 0, config.train.dvae_batch, config.dvae.image_size)
    x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        out = model(x, temperature=1.0, kl_weight=1.0)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(before)
    return sorted(times[1:])[repeats // 2]


def judge_rate(model: DiscreteVAE, dataset, n: int) -> float | None:
    try:
        from dalle.evaluation.shapes_judge import judge
    except ImportError:
        return None
    images = fixed_images(dataset, n, model.config.image_size)
    recon, _ = reconstruct(model, images)
    passed = 0
    for i in range(len(images)):
        pil = Image.fromarray((recon[i].permute(1, 2, 0) * 255).round().byte().numpy())
        passed += bool(judge(pil, dataset[i].captions[0]))
    return passed / len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None, help="training budget a variant (default 20)")
    budget.add_argument("--steps", type=int, default=None, help="train a fixed number of steps instead")
    ap.add_argument("--variants", nargs="+", default=["gumbel", "vq"], choices=["gumbel", "vq"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-size", type=int, default=100_000)
    ap.add_argument("--eval-n", type=int, default=256)
    ap.add_argument("--preset", default="shapes")
    ap.add_argument("--out", type=Path, default=None, help="keep runs here (default: a temporary folder)")
    args = ap.parse_args()
    if args.minutes is None and args.steps is None:
        args.minutes = 20.0

    base = get_preset(args.preset)
    print(f"step time, batch {base.train.dvae_batch}: "
          f"1 thread {time_step(base, 1):.3f} s, 2 threads {time_step(base, 2):.3f} s")
    torch.set_num_threads(args.threads)
    train = ShapesDataset("train", args.train_size, seed=0)
    val = ShapesDataset("val", args.eval_n, seed=0)
    out_root = args.out or Path(tempfile.mkdtemp(prefix="bench_dvae_"))
    results = []
    for variant in args.variants:
        cfg = get_preset(args.preset)
        cfg.dvae.quantizer = variant
        out = out_root / variant
        t0 = time.perf_counter()
        export = train_dvae(train, out, cfg, steps=args.steps, minutes=args.minutes, eval_dataset=val,
                            sample_every=1000, progress=False)
        seconds = time.perf_counter() - t0
        model = DiscreteVAE.from_pretrained(export)
        stats = evaluate_dvae(model, val, n=args.eval_n)
        rows = (out / "logs" / "dvae.csv").read_text().strip().splitlines()
        steps = int(rows[-1].split(",")[0])
        result = {"variant": variant, "steps": steps, "train_seconds": round(seconds, 1),
                  "s_per_step": round(seconds / steps, 3), **{k: round(v, 4) for k, v in stats.items()},
                  "judge_pass": judge_rate(model, val, args.eval_n), "folder": str(out)}
        results.append(result)
        print(json.dumps(result), flush=True)

    print(f"\n{'variant':8} {'steps':>6} {'minutes':>8} {'PSNR dB':>8} {'codes':>6} {'perplex':>8} {'judge':>6}")
    for r in results:
        judge = "n/a" if r["judge_pass"] is None else f"{r['judge_pass']:.3f}"
        print(f"{r['variant']:8} {r['steps']:6d} {r['train_seconds'] / 60:8.1f} {r['psnr']:8.2f} "
              f"{r['codebook_usage']:6.3f} {r['perplexity']:8.1f} {judge:>6}")


if __name__ == "__main__":
    main()
