"""Throughput of the text tokenizer's batch encoding (the data loaders' hot path).

Trains a tokenizer on shapes-like captions made up combinatorially here (the
vocabulary of shared/SHAPES.md), then times ``encode_batch`` on ``--count``
captions drawn from them: inference (no dropout) with the caption cache (the
shapes set repeats captions) and without it (every caption through the library,
as for a corpus of distinct captions), training with the library's BPE dropout,
and training with seeded (reproducible, pure-Python) dropout.

    .venv/bin/python benchmarks/bench_tokenizer.py            # plain lines for BENCHMARKS.md
    .venv/bin/python benchmarks/bench_tokenizer.py --json     # one JSON object

``RAYON_NUM_THREADS`` limits the library's threads (it uses every core by default).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import time

import torch

from dalle.config import TokenizerConfig
from dalle.tokenizer import TextTokenizer

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "cyan"]
SHAPES = ["circle", "square", "triangle"]
SIZES = ["", "small ", "large "]
REGIONS = ["in the top left corner", "at the top", "in the top right corner", "on the left", "in the center",
           "on the right", "in the bottom left corner", "at the bottom", "in the bottom right corner"]
RELATIONS = ["to the left of", "to the right of", "above", "below", "and"]


def _object(size: str, colour: str, shape: str) -> str:
    words = f"{size}{colour} {shape}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def shapes_captions() -> list[str]:
    """Every one-object caption (with and without region) and every two-object caption."""
    objects = [_object(s, c, h) for s, c, h in itertools.product(SIZES, COLOURS, SHAPES)]
    plain = [_object("", c, h) for c, h in itertools.product(COLOURS, SHAPES)]
    captions = list(objects)
    captions += [f"{o} {r}" for o, r in itertools.product(objects, REGIONS)]
    captions += [f"{a} {rel} {b}" for a, rel, b in itertools.product(plain, RELATIONS, plain) if a != b]
    return captions


def throughput(fn, captions: list[str], batch: int, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` captions per wall-clock second and per CPU second (all threads)
    of ``fn`` over ``captions`` in chunks of ``batch``.  The CPU figure does not depend on
    what else the machine runs; on idle cores the wall figure is at least as high."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(captions), batch):
            fn(captions[i : i + batch])
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return len(captions) / best_wall, len(captions) / max(best_cpu, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000, help="captions to encode (default 100000)")
    parser.add_argument("--batch", type=int, default=100_000, help="captions per encode_batch call")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    parser.add_argument("--seeded-count", type=int, default=5_000, help="captions for the (slow) seeded-dropout path")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of plain lines")
    args = parser.parse_args()
    torch.set_num_threads(1)

    corpus = shapes_captions()
    config = TokenizerConfig(vocab_size=512, text_len=32)
    start = time.perf_counter()
    tokenizer = TextTokenizer.train(corpus, config)
    train_s = time.perf_counter() - start

    rng = random.Random(0)
    captions = [rng.choice(corpus) for _ in range(args.count)]
    tokens = tokenizer.encode_batch(captions[:10_000])
    mean_tokens = float((tokens < config.vocab_size).sum(dim=1).float().mean())

    infer = throughput(lambda b: tokenizer.encode_batch(b), captions, args.batch, args.repeats)
    tokenizer.cache_size = 0  # every caption through the library, as for a corpus of distinct captions
    tokenizer.clear_cache()
    uncached = throughput(lambda b: tokenizer.encode_batch(b), captions, args.batch, args.repeats)
    train = throughput(lambda b: tokenizer.encode_batch(b, training=True), captions, args.batch, args.repeats)
    seeded_caps = captions[: args.seeded_count]
    seeded = throughput(lambda b: tokenizer.encode_batch(b, training=True, seed=0), seeded_caps, 256, 1)

    result = {
        "corpus_captions": len(corpus),
        "trained_vocab": len(tokenizer._tokenizer.get_vocab()),
        "train_seconds": round(train_s, 3),
        "mean_tokens_per_caption": round(mean_tokens, 2),
        "captions": args.count,
        "batch": args.batch,
        "encode_batch_captions_per_s": round(infer[0]),
        "encode_batch_captions_per_cpu_s": round(infer[1]),
        "encode_batch_uncached_captions_per_s": round(uncached[0]),
        "encode_batch_uncached_captions_per_cpu_s": round(uncached[1]),
        "encode_batch_dropout_captions_per_s": round(train[0]),
        "encode_batch_dropout_captions_per_cpu_s": round(train[1]),
        "encode_batch_seeded_dropout_captions_per_s": round(seeded[0]),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
        "rayon_threads": os.environ.get("RAYON_NUM_THREADS", "all"),
        "python": platform.python_version(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"tokenizer {key} {value}")


if __name__ == "__main__":
    main()
