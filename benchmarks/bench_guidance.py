"""Fidelity and sampling cost against the classifier-free guidance scale S.

For each S, the same held-out prompts as ``dalle eval`` (test-split scenes whose captions
describe held-out descriptions or pairs, dalle.evaluation.suite), the same seeds and
``--candidates`` candidates a prompt; the judge scores the CLIP top-1 (guidance together
with reranking) and a random pick of the same candidates (guidance alone).  Seconds are
the generation time of all prompts (sampling, decoding and reranking; a guided step runs
twice the rows).

    .venv/bin/python benchmarks/bench_guidance.py --model MODEL --scales 0 1 2 3 5 \
        --prompts-per-category 40 --json benchmarks/results/guidance.json

MODEL must have been trained with null captions (transformer.null_caption_fraction > 0,
every preset since issue 15); the bundled model shipped before that is refused.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dalle.evaluation.shapes_judge import CATEGORIES
from dalle.evaluation.suite import HELD_OUT_SPLIT, _held_out, evaluate_generation, pick_prompts
from dalle.pipeline import DallePipeline
from dalle.sampling import check_guidance


def measure(pipe: DallePipeline, scales: list[float], per_category: int, candidates: int, seed: int) -> list[dict]:
    prompts = pick_prompts(_held_out(seed, 100_000), per_category)
    rows = []
    for scale in scales:
        started = time.perf_counter()
        shapes = evaluate_generation(pipe, prompts, candidates, seed, progress=False, guidance=scale)
        seconds = time.perf_counter() - started
        rows.append({"guidance": scale, "seconds": round(seconds, 1), **shapes})
        print(f"S={scale:g}: top-1 {shapes['reranked_top1']['overall']:.1%}, random pick "
              f"{shapes['random_pick']['overall']:.1%}, {seconds:.1f} s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = "| S | " + " | ".join(f"{c} top-1 / random" for c in (*CATEGORIES, "overall")) + " | seconds |"
    lines = [head, "|" + "---|" * (len(CATEGORIES) + 3)]
    for row in rows:
        cells = [f"{row['reranked_top1'].get(c, float('nan')):.1%} / {row['random_pick'].get(c, float('nan')):.1%}"
                 for c in (*CATEGORIES, "overall")]
        lines.append(f"| {row['guidance']:g} | " + " | ".join(cells) + f" | {row['seconds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a model trained with null captions")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--prompts-per-category", type=int, default=40)
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = DallePipeline.from_pretrained(args.model, device=args.device)
    for scale in args.scales:
        check_guidance(pipe.transformer, scale)
    rows = measure(pipe, args.scales, args.prompts_per_category, args.candidates, args.seed)
    print(table(rows))
    if args.json:
        meta = {"model": str(args.model), "split": HELD_OUT_SPLIT, "prompts_per_category": args.prompts_per_category,
                "candidates": args.candidates, "seed": args.seed, "device": str(pipe.device),
                "threads": torch.get_num_threads(), "machine": platform.machine()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
