"""Transformer training throughput and sampling speed, against the peer's figures.

The peer is lucidrains' DALLE-pytorch 1.6.6, measured on this project's 2-core CPU at
d_model 256, 4 layers, 4 heads of 64, 32 text + 8x8 image tokens, 512 image codes:
training 4,000 tokens/s (full attention, batch 32) and 2,990 (row/column/conv);
sampling 0.27 s an image (batch 8, full) and 0.44 (sparse); 6.83 s an image at 16x16
(4.99 with its cache).  Targets: training >= 1.5x, sampling >= 10x at 8x8 and >= 50x at
16x16, and sampling cost about linear in the number of image tokens.

    .venv/bin/python benchmarks/bench_transformer.py            # table
    .venv/bin/python benchmarks/bench_transformer.py --json     # one JSON object

Sampling runs on a :func:`prepare_for_sampling` copy (weights pre-packed for the CPU's
matrix library, in bf16 where the CPU has bf16 instructions; activations, attention
and cache in fp32); the ``fp32 weights`` and ``unprepared`` (plain fp32 model) rows
show what each part buys.  Each figure is the best of ``--repeats`` timed runs after a
warm-up (the best run is the one least disturbed by other processes).  ``cpu`` columns
are per CPU-second of this process, which a busy shared machine inflates less than
wall time.  The load average is printed: with other jobs on the two cores, wall
figures are pessimistic.  OpenMP keeps PyTorch's default (threads spin while waiting),
what a user gets; on an idle machine that is ~2.5x faster for sampling than
``OMP_WAIT_POLICY=PASSIVE``, which in turn is far better on an oversubscribed one
(spinning threads made 2-thread steps up to tens of times slower there).  Set the
variable to compare.
"""

from __future__ import annotations

import os


import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import torch  # noqa: E402

from dalle.config import TransformerConfig  # noqa: E402
from dalle.sampling import generate_images_tokens, native_bf16, prepare_for_sampling  # noqa: E402
from dalle.training.transformer import make_optimizer  # noqa: E402
from dalle.transformer import DalleTransformer  # noqa: E402

PEER = {
    "train_full_tok_s": 4000.0,
    "train_sparse_tok_s": 2990.0,
    "sample_full_8_s_per_image": 0.27,
    "sample_sparse_8_s_per_image": 0.44,
    "sample_full_16_s_per_image": 4.99,  # with its cache (6.83 without)
}


PEER_SAMPLE_S_PER_IMAGE = {8: PEER["sample_full_8_s_per_image"], 16: PEER["sample_full_16_s_per_image"]}


def bench_preset(name: str, repeats: int, batch: int = 8) -> dict[str, float | str]:
    """Sampling seconds an image with a preset's own transformer, against the peer at its token count.

    The peer's figures are at d_model 256, 4 layers (shared/ANCHORS.md); a preset with a
    wider or deeper transformer is compared at a disadvantage, never an advantage.
    """
    from dalle.config import get_preset

    config = get_preset(name).transformer
    torch.manual_seed(0)
    model = prepare_for_sampling(DalleTransformer(config).eval())
    text = torch.randint(0, config.text_vocab, (batch, config.text_len))
    g = torch.Generator().manual_seed(0)
    wall, cpu = timed(lambda: generate_images_tokens(model, text, generator=g), repeats)
    out: dict[str, float | str] = {"preset": name, "image_tokens": config.image_len, "d_model": config.d_model,
                                   "layers": config.n_layers, "attention": config.attention,
                                   "s_per_image": wall / batch, "cpu_s_per_image": cpu / batch}
    peer = PEER_SAMPLE_S_PER_IMAGE.get(config.image_grid)
    if peer is not None:
        out["peer_s_per_image"] = peer
        out["speedup_vs_peer"] = peer / (wall / batch)
    return out


def bench_config(attention: str, grid: int = 8) -> TransformerConfig:
    return TransformerConfig(n_layers=4, n_heads=4, head_dim=64, text_vocab=512 + 32, text_len=32, image_vocab=512,
                             image_grid=grid, attention=attention, conv_kernel=11)


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds of this process) over ``repeats`` calls."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def bench_training(attention: str, bf16: bool, repeats: int, batch: int = 32) -> dict[str, float]:
    torch.manual_seed(0)
    config = bench_config(attention)
    model = DalleTransformer(config).train()
    optimizer = make_optimizer(model, 1e-4)
    text = torch.randint(0, config.text_vocab, (batch, config.text_len))
    images = torch.randint(0, config.image_vocab, (batch, config.image_grid, config.image_grid))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        with amp:
            loss, _ = model.loss(text, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
        optimizer.step()

    wall, cpu = timed(step, repeats, warmup=2)
    tokens = batch * config.seq_len  # the peer's convention: text + image tokens per sequence
    return {"tok_s": tokens / wall, "cpu_tok_s": tokens / cpu}


def bench_sampling(attention: str, grid: int, weights: torch.dtype | None, repeats: int, batch: int = 8,
                   shared_prompt: bool = False) -> dict[str, float]:
    """Seconds an image of a :func:`prepare_for_sampling` copy with ``weights``; None: the plain fp32 model."""
    torch.manual_seed(0)
    config = bench_config(attention, grid)
    model = DalleTransformer(config).eval()
    if weights is not None:
        model = prepare_for_sampling(model, weights)
    if shared_prompt:  # candidates of one prompt: the text is prefilled once
        text = torch.randint(0, config.text_vocab, (1, config.text_len)).expand(batch, -1).contiguous()
    else:
        text = torch.randint(0, config.text_vocab, (batch, config.text_len))
    g = torch.Generator().manual_seed(0)
    wall, cpu = timed(lambda: generate_images_tokens(model, text, generator=g), repeats)
    return {"s_per_image": wall / batch, "cpu_s_per_image": cpu / batch,
            "ms_per_token_step": wall / config.image_len * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the best is kept")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--no-32", action="store_true", help="skip the 32x32 sampling point (the slowest)")
    parser.add_argument("--preset", help="only time sampling with this preset's transformer against the peer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.preset:
        load = os.getloadavg()[0]
        r = bench_preset(args.preset, args.repeats)
        r["threads"], r["load_average"] = args.threads, f"{load:.2f} -> {os.getloadavg()[0]:.2f}"
        print(json.dumps(r) if args.json else "\n".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in r.items()))
        return
    bf16_ok = native_bf16("cpu")
    load_before = os.getloadavg()[0]

    results: dict[str, dict[str, float]] = {}
    for attention in ("full", "sparse"):
        results[f"train_{attention}_fp32"] = bench_training(attention, False, args.repeats)
        if bf16_ok:
            results[f"train_{attention}_bf16"] = bench_training(attention, True, args.repeats)
    grids = (8, 16) if args.no_32 else (8, 16, 32)
    fast = torch.bfloat16 if bf16_ok else torch.float32  # prepare_for_sampling's default
    for grid in grids:
        for attention in ("full", "sparse"):
            reps = args.repeats if grid < 32 else 1
            results[f"sample_{attention}_{grid}"] = bench_sampling(attention, grid, fast, reps)
    results["sample_full_8_shared_prompt"] = bench_sampling("full", 8, fast, args.repeats, shared_prompt=True)
    results["sample_full_8_fp32_weights"] = bench_sampling("full", 8, torch.float32, args.repeats)
    results["sample_full_8_unprepared"] = bench_sampling("full", 8, None, args.repeats)
    # Linearity: cost per image token relative to 8x8 (1.0 = exactly linear in image tokens).
    base = results["sample_full_8"]["s_per_image"] / 64
    for grid in grids:
        r = results[f"sample_full_{grid}"]
        r["per_token_vs_8x8"] = r["s_per_image"] / grid**2 / base

    meta = {"threads": args.threads, "torch": torch.__version__, "bf16_native": bf16_ok,
            "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    speedups = {
        "train_full": results[f"train_full_{'bf16' if bf16_ok else 'fp32'}"]["tok_s"] / PEER["train_full_tok_s"],
        "train_full_fp32": results["train_full_fp32"]["tok_s"] / PEER["train_full_tok_s"],
        "train_sparse": results[f"train_sparse_{'bf16' if bf16_ok else 'fp32'}"]["tok_s"] / PEER["train_sparse_tok_s"],
        "sample_full_8": PEER["sample_full_8_s_per_image"] / results["sample_full_8"]["s_per_image"],
        "sample_sparse_8": PEER["sample_sparse_8_s_per_image"] / results["sample_sparse_8"]["s_per_image"],
        "sample_full_16": PEER["sample_full_16_s_per_image"] / results["sample_full_16"]["s_per_image"],
    }
    if args.json:
        print(json.dumps({"meta": meta, "peer": PEER, "results": results, "speedup_vs_peer": speedups}, indent=2))
        return

    print(f"threads={args.threads} torch={torch.__version__} bf16_native={bf16_ok} "
          f"load average {meta['load_average_before']} -> {meta['load_average_after']} (2 cores)")
    print(f"{'training (batch 32, 96 tokens)':<36}{'tok/s':>10}{'cpu tok/s':>12}{'vs peer':>10}")
    for attention in ("full", "sparse"):
        for prec in ("fp32", "bf16"):
            key = f"train_{attention}_{prec}"
            if key in results:
                r = results[key]
                print(f"  {attention:<7}{prec:<27}{r['tok_s']:>10.0f}{r['cpu_tok_s']:>12.0f}"
                      f"{r['tok_s'] / PEER[f'train_{attention}_tok_s']:>9.2f}x")
    print(f"{'sampling (batch 8)':<36}{'s/image':>10}{'cpu s/img':>12}{'ms/step':>10}{'per-token':>11}")
    for key, r in results.items():
        if key.startswith("sample_"):
            label = key[len("sample_"):].replace("_", " ")
            per_token = f"{r['per_token_vs_8x8']:>10.2f}x" if "per_token_vs_8x8" in r else ""
            print(f"  {label:<34}{r['s_per_image']:>10.4f}{r['cpu_s_per_image']:>12.4f}"
                  f"{r['ms_per_token_step']:>10.2f}{per_token}")
    print("speed-up vs peer: " + ", ".join(f"{k} {v:.1f}x" for k, v in speedups.items()))


if __name__ == "__main__":
    main()
