"""Section 3 of ``bench_gpu.py``: sampling all image tokens, the library's sampler and a bare StaticDecoder loop."""

from __future__ import annotations

import time
from typing import Any

import torch

from dalle.sampling import StaticDecoder
from dalle.transformer import DalleTransformer

from .common import PEER, Bench, layout, sync


def bench_sampling(bench: Bench, attention: str, batch: int, graphed: bool) -> dict[str, Any]:
    """Seconds an image to sample all image tokens with the key/value cache.

    ``graphed``: this file's own loop around a :class:`StaticDecoder`; else the library's
    ``generate_images_tokens`` with its default decoder, made once and reused as the
    pipeline does (on CUDA a StaticDecoder with a CUDA graph, elsewhere the cached loop).
    """
    from dalle.sampling import (
        generate_images_tokens, keep_rows_mask, prepare_for_sampling, sample_logits, static_decoder_for,
    )

    args, device = bench.args, bench.device
    config = layout(args, attention, "auto")
    torch.manual_seed(0)
    with torch.device(device):
        model = prepare_for_sampling(DalleTransformer(config).eval())
    text = torch.randint(0, config.text_vocab - config.text_len, (batch, config.text_len), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    n = config.image_len

    if graphed:
        t0 = time.perf_counter()
        decoder = StaticDecoder(model, batch)
        sync(device)
        setup_s = time.perf_counter() - t0

        @torch.inference_mode()
        def run(limit: int = n) -> torch.Tensor:
            tokens = torch.zeros(batch, n, dtype=torch.long, device=device)
            logits = decoder.prefill(text)
            for j in range(limit):
                tokens[:, j] = sample_logits(logits, generator=gen)
                if j == n - 1:
                    break
                logits = decoder.step(tokens[:, j], j)
            return tokens

        run(min(n, 2 * config.image_grid))  # warm-up: two rows
    else:
        t0 = time.perf_counter()
        library = static_decoder_for(model, batch) or "cached"
        sync(device)
        setup_s = time.perf_counter() - t0
        warm_keep = keep_rows_mask(config.image_grid, config.image_grid - 2)  # warm-up: the last two rows
        known = torch.zeros(batch, config.image_grid, config.image_grid, dtype=torch.long, device=device)

        def run(limit: int = n) -> torch.Tensor:
            if limit < n:
                return generate_images_tokens(model, text, generator=gen, known_tokens=known, keep_mask=warm_keep,
                                              decoder=library)
            return generate_images_tokens(model, text, generator=gen, decoder=library)

        run(0)
    sync(device)
    times = []
    for _ in range(args.sample_repeats):
        t0 = time.perf_counter()
        tokens = run()
        sync(device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    per_image = best / batch
    if graphed:
        sampler = "StaticDecoder+CUDA graph" if decoder.graph is not None else "StaticDecoder (eager)"
    else:
        sampler = "generate_images_tokens: " + (
            "cached loop" if library == "cached" else
            "StaticDecoder+CUDA graph" if library.graph is not None else "StaticDecoder (eager)")
    out = {"attention": attention, "batch": batch, "sampler": sampler,
           "s_per_batch": round(best, 3), "s_per_image": round(per_image, 5),
           "ms_per_token_step": round(best / n * 1e3, 3), "setup_s": round(setup_s, 2),
           "speedup_vs_peer_cached": round(PEER["sample_cached_s_per_image"] / per_image, 1),
           "tokens_in_range": bool(int(tokens.min()) >= 0 and int(tokens.max()) < config.image_vocab)}
    return out
