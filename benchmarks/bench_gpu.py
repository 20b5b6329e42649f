"""GPU speed of the transformer at the paper's sequence layout: training MFU, sparse attention, sampling.

Layout: 256 text + 32x32 = 1024 image tokens (1280 a sequence), 16384 + 256 text ids,
8192 image codes; width of the peer's reference run: 12 layers, d_model 1024 (16 heads
of 64), batch 8, bf16 autocast.  Peer (lucidrains DALLE-pytorch, 253M parameters, on an
H200): training 46,000 tokens/s, MFU 7.9% (full attention), 51,700 tokens/s with
row/column/conv attention; sampling 3.43 s an image (3.20 with its cache).

MFU is the peer's formula, per training step::

    FLOPs = 6 * parameters * tokens + 12 * layers * tokens * seq_len * d_model
    tokens = batch * seq_len (text + image tokens), parameters = all (embeddings included)

divided by the step time and the card's dense bf16 peak (H100 SXM / H200: 989 TFLOP/s).
The formula counts dense attention, so for sparse layers it gives an "effective" MFU.

Sections (each one time-boxed, each failure printed and skipped, never fatal):

1. training steps: full attention (SDPA causal), sparse with dense masked attention,
   sparse with FlexAttention block masks; eager, then with ``torch.compile`` per block;
2. the attention op alone (forward + backward, 16 heads, batch 8, 1279 tokens): dense
   masked SDPA vs FlexAttention per layer kind, and the paper schedule's weighted mean;
   for column layers "flex+reorder" adds the cost of the model's token permutations,
   measured on the model's own layer (:func:`reorder_cost`);
3. sampling 1024 image tokens with the key/value cache: the library sampler
   (``generate_images_tokens`` with its default decoder, which is the CUDA-graph
   :class:`StaticDecoder` on a GPU) and this file's own loop around a StaticDecoder;
4. ``--sweep-flex`` (alone): FlexAttention mask tiles and kernel options for each sparse
   kind against dense masked SDPA, PyTorch's autotuner included; prints the table for
   ``dalle.attention_masks.FLEX_TUNING`` and writes it next to ``--json`` (``*_table.json``).

    python benchmarks/bench_gpu.py --json gpu.json            # on a GPU, ~3 minutes
    python benchmarks/bench_gpu.py --sweep-flex --budget 480 --json sweep.json  # on a GPU, ~8 minutes
    python benchmarks/bench_gpu.py --smoke --json /tmp/s.json  # tiny sizes, runs on the CPU
    python benchmarks/bench_gpu.py --smoke --sweep-flex --json /tmp/s.json  # the sweep's code on the CPU

Everything is printed as it is measured, then as one markdown table; ``--json`` is
rewritten after every section, so a run cut short still leaves its figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dalle.config import TransformerConfig  # noqa: E402
from dalle.sampling import StaticDecoder  # noqa: E402
from dalle.transformer import DalleTransformer  # noqa: E402

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


# --- 1. training steps --------------------------------------------------------------------------


def bench_training(bench: Bench, attention: str, impl: str, compiled: bool) -> dict[str, Any]:
    """Tokens/s, TFLOP/s and MFU of whole training steps (forward, backward, clipping, fused AdamW)."""
    from dalle.training.transformer import GRAD_CLIP, _compile_blocks, autocast_context, make_optimizer

    args, device = bench.args, bench.device
    config = layout(args, attention, impl)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device (250M normal draws are slow on the host)
        model = DalleTransformer(config).train()
    if compiled:
        _compile_blocks(model)
    optimizer = make_optimizer(model, 1e-4)
    batch = args.batch
    text = torch.randint(0, config.text_vocab - config.text_len, (batch, config.text_len), device=device)
    images = torch.randint(0, config.image_vocab, (batch, config.image_grid, config.image_grid), device=device)
    amp = autocast_context(device, None if device.type == "cuda" else False)

    def step() -> torch.Tensor:
        with amp:
            loss, _ = model.loss(text, images)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup_steps):
        loss = step()
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    per_step = (time.perf_counter() - t0) / args.steps
    flex_used = model.use_flex(device)  # after the steps: False if FlexAttention failed and fell back
    params = model.count_parameters()
    flops = step_flops(config, params, batch)
    name, peak = peak_tflops(device)
    out: dict[str, Any] = {
        "attention": attention, "impl": "flex" if flex_used else "dense", "compiled": compiled, "batch": batch,
        "params": params, "non_embedding_params": model.count_parameters(non_embedding=True),
        "step_ms": round(per_step * 1e3, 2), "tok_s": round(batch * config.seq_len / per_step),
        "tflops": round(flops / per_step / 1e12, 1), "warmup_s": round(warm_s, 1), "final_loss": round(float(loss.detach()), 3),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    if peak:
        out["mfu"] = round(flops / per_step / 1e12 / peak, 4)
    if not math.isfinite(float(loss.detach())):
        out["warning"] = "non-finite loss"
    from dalle.transformer import _FLEX_BROKEN

    if impl == "flex" and _FLEX_BROKEN:
        out["flex_error"] = _FLEX_BROKEN[0][:300]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return out


# --- 2. the attention op ------------------------------------------------------------------------


def bench_attention_op(bench: Bench, kinds: list[str]) -> dict[str, Any]:
    """Forward+backward of the attention alone at the training layout: dense masked SDPA vs FlexAttention."""
    import torch.nn.functional as F

    from dalle.attention_masks import build_mask, flex_mask, flex_tuning, tile_fraction

    args, device = bench.args, bench.device
    config = layout(args, "sparse", "dense")
    length = config.seq_len - 1
    b, h, d = args.batch, config.n_heads, config.head_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, device=device, dtype=dtype, generator=gen).requires_grad_()
               for _ in range(3))
    grad = torch.randn(b, h, length, d, device=device, dtype=dtype, generator=gen)
    can_flex = device.type == "cuda"  # FlexAttention has no CPU backward
    repeats = args.op_repeats

    # Under bf16 autocast as in training (the inputs are bf16 already): the compiled FlexAttention
    # kernels are then the ones the whole-model step reuses (autocast is part of their guards).
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def timed(fn: Callable[[], torch.Tensor], grad: torch.Tensor = grad) -> float:
        with amp:
            for _ in range(2):
                torch.autograd.backward(fn(), grad)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                torch.autograd.backward(fn(), grad)
            sync(device)
        return (time.perf_counter() - t0) / repeats * 1e3

    out: dict[str, Any] = {"tokens": length, "batch": b, "heads": h, "head_dim": d, "dtype": str(dtype)}
    out["dense_causal_ms"] = round(timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), 3)
    for kind in kinds:
        mask = build_mask(kind, config.text_len, config.image_grid, config.conv_kernel, device)[:length, :length]
        block = flex_tuning(kind, device)[0]  # the model's mask tile (FLEX_TUNING, else 128 x 128)
        row: dict[str, Any] = {"tiles_computed": round(tile_fraction(kind, config.text_len, config.image_grid,
                                                                     config.conv_kernel, block), 3)}
        if block != (128, 128):
            row["mask_tile"] = list(block)
        row["dense_masked_ms"] = round(timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)), 3)
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def efficient() -> torch.Tensor:
                with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

            row["dense_masked_efficient_ms"] = round(timed(efficient), 3)
        except Exception as e:  # noqa: BLE001 - the forced kernel may not take this mask
            row["dense_masked_efficient_ms"] = None
            row["efficient_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        if can_flex:
            from dalle.transformer import flex_attend

            fm = flex_mask(kind, config.text_len, config.image_grid, config.conv_kernel, length, device)
            row["flex_ms"] = round(timed(lambda: flex_attend(q, k, v, fm.block_mask, fm.kernel_options)), 3)
            if fm.kernel_options:
                row["kernel_options"] = fm.kernel_options
            if fm.order is not None:  # the reordering the layer adds around the kernel
                row.update(reorder_cost(config, kind, fm, timed, b, dtype, gen, device))
                row["flex_with_reorder_ms"] = round(row["flex_ms"] + row["reorder_ms"], 3)
            best_dense = min(x for x in (row["dense_masked_ms"], row["dense_masked_efficient_ms"]) if x)
            row["speedup_vs_dense_masked"] = round(best_dense / row.get("flex_with_reorder_ms", row["flex_ms"]), 2)
        out[kind] = row
    if can_flex and all(kind in out and "flex_ms" in out[kind] for kind in set(SCHEDULE_12)):
        dense = sum(min(x for x in (out[k]["dense_masked_ms"], out[k]["dense_masked_efficient_ms"]) if x)
                    for k in SCHEDULE_12)
        flex = sum(out[k].get("flex_with_reorder_ms", out[k]["flex_ms"]) for k in SCHEDULE_12)
        out["schedule_12_layers"] = {"dense_masked_ms": round(dense, 2), "flex_ms": round(flex, 2),
                                     "speedup": round(dense / flex, 2)}
    elif not can_flex:
        out["flex"] = "skipped: FlexAttention has no backward on the CPU"
    return out


def reorder_cost(config: TransformerConfig, kind: str, fm: Any, timed: Callable[..., float], batch: int,
                 dtype: torch.dtype, gen: torch.Generator, device: torch.device) -> dict[str, float]:
    """What a reordered (column) layer pays for its permutations, measured on the model's own layer.

    ``Attention._forward_flex`` permutes the layer input ``[B, L, d]`` before the qkv
    projection and the output back while merging the heads (``permute_tokens``; the backward
    pass gathers too).  The layer, projections included, is timed with the permutations and
    with the same block mask applied in raster order instead (the same tiles computed, a wrong
    pattern: timing only); the difference is the permutations' cost.
    """
    from dalle.transformer import Attention

    layer = Attention(config, kind).to(device)
    x = torch.randn(batch, fm.order.numel(), config.d_model, device=device, dtype=dtype, generator=gen,
                    requires_grad=True)
    grad = torch.randn(x.shape, device=device, dtype=dtype, generator=gen)
    with_reorder = timed(lambda: layer._forward_flex(x, fm), grad)
    without = timed(lambda: layer._forward_flex(x, fm._replace(order=None, inverse=None)), grad)
    return {"flex_layer_ms": round(with_reorder, 3), "flex_layer_no_reorder_ms": round(without, 3),
            "reorder_ms": round(with_reorder - without, 3)}


# --- 3. sampling --------------------------------------------------------------------------------


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


# --- 4. FlexAttention kernel sweep --------------------------------------------------------------
#
# Which FlexAttention settings make the sparse layers fastest at the paper layout?  A candidate
# is a mask tile ("block", query x key) and ``kernel_options``; each is timed forward and
# forward+backward on the attention op alone (the model's ``flex_attend``, column layers in
# their column-major order) and its output and gradients are checked against an fp32 dense
# reference.  A candidate that fails to compile is recorded as failed, never fatal.  Steps, most
# useful first, each within the budget (``--sweep-flex``, run alone):
#
# 1. references: dense masked SDPA per kind (the model's dense path, measured the same way),
#    dense causal SDPA, the column layers' token permutations, PyTorch's defaults (128 x 128);
# 2. PyTorch's autotuner (max_autotune) on row layers, per mask tile: its winning forward and
#    backward configs become explicit candidates, tried on every kind;
# 3. a hand grid on row layers (SWEEP_GRID): one change at a time, forward or backward;
# 4. per kind and mask tile, the best forward part with the best backward part (the two
#    kernels are independent, so their best settings combine);
# 5. the autotuner on the other kinds and tiles as time allows, and step 4 again;
# 6. the defaults and the best of each kind re-timed back to back, the 12-layer schedule's
#    speed-up with each, and the table for ``dalle.attention_masks.FLEX_TUNING``.
#
# Excluded on purpose: PRESCALE_QK (changes rounding), ROWS_GUARANTEED_SAFE and
# BLOCKS_ARE_CONTIGUOUS (false for these masks: NaNs or wrong results), see FLEX_UNSAFE_OPTIONS.


def _fwd(m: int, n: int, warps: int, stages: int) -> dict[str, Any]:
    return {"fwd_BLOCK_M": m, "fwd_BLOCK_N": n, "fwd_num_warps": warps, "fwd_num_stages": stages}


def _bwd(m1: int, n1: int, m2: int, n2: int, warps: int, stages: int) -> dict[str, Any]:
    return {"bwd_BLOCK_M1": m1, "bwd_BLOCK_N1": n1, "bwd_BLOCK_M2": m2, "bwd_BLOCK_N2": n2,
            "bwd_num_warps": warps, "bwd_num_stages": stages}


# Per mask tile: (base forward, base backward, forward variants, backward variants), most promising
# first.  PyTorch 2.13's defaults on sm90 at head_dim 64, bf16: forward 128x128 tiles, 4 warps,
# 3 stages; backward (M1, N1, M2, N2) = (64, 128, 128, 64), 8 warps, 3 stages; its autotuner tries
# forward (128|64) x (128|64) and backward (32|64) x (32|64) tiles.  Tiles under 128 need every
# tile explicit (dalle.attention_masks.check_kernel_options).
SWEEP_GRID: dict[tuple[int, int], tuple[dict, dict, list[dict], list[dict]]] = {
    (128, 128): ({}, {},
                 [_fwd(128, 64, 4, 3), _fwd(128, 128, 8, 2), _fwd(64, 128, 4, 3), _fwd(128, 128, 4, 4),
                  {"fwd_USE_TMA": True}],
                 [_bwd(64, 64, 64, 64, 4, 3), _bwd(64, 128, 128, 64, 8, 2), _bwd(32, 64, 64, 32, 4, 3),
                  _bwd(64, 128, 128, 64, 4, 3), _bwd(32, 128, 128, 32, 4, 3), {"bwd_USE_TMA": True}]),
    (64, 64): (_fwd(64, 64, 4, 3), _bwd(64, 64, 64, 64, 4, 3),
               [_fwd(64, 64, 4, 2), _fwd(64, 64, 4, 4), _fwd(64, 32, 4, 3), _fwd(32, 64, 4, 3),
                {**_fwd(64, 64, 4, 3), "fwd_USE_TMA": True}],
               [_bwd(32, 64, 64, 32, 4, 3), _bwd(64, 64, 64, 64, 4, 2), _bwd(64, 64, 64, 64, 8, 3),
                _bwd(32, 64, 64, 32, 4, 4), _bwd(32, 32, 32, 32, 4, 3)]),
    (128, 64): (_fwd(128, 64, 4, 3), _bwd(64, 64, 64, 64, 4, 3),
                [_fwd(128, 64, 8, 3), _fwd(64, 64, 4, 3)],
                [_bwd(32, 64, 128, 32, 4, 3), _bwd(64, 64, 128, 64, 8, 3)]),
}
SWEEP_CANDIDATE_S = 75.0  # most seconds for one candidate (compile + check + timing)
SWEEP_AUTOTUNE_S = 150.0  # most seconds for one autotuning
SWEEP_MIN_GAIN = 0.03  # a config enters the table only if it beats the defaults by this much (noise)
# Kept for the end: re-timing the defaults and the winners (~45 s), training steps with each (~70 s).
SWEEP_CONFIRM_RESERVE_S = 115.0
# A CUDA error that poisons the context: the process must end (the parent relaunches it with --resume).
_STICKY_CUDA = ("illegal memory access", "unspecified launch failure", "device-side assert", "CUDA error: an illegal",
                "misaligned address", "CUDA error: unknown error")


def _fwd_part(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k.startswith("fwd_")}


def _bwd_part(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k.startswith("bwd_")}


def candidate_name(block: tuple[int, int], options: dict[str, Any]) -> str:
    """``"128x128 defaults"`` or ``"64x64 bwd_BLOCK_M1=32,..."`` (the mask tile, then the options, sorted)."""
    body = ",".join(f"{k}={v}" for k, v in sorted(options.items())) if options else "defaults"
    return f"{block[0]}x{block[1]} {body}"


def short_config(options: dict[str, Any]) -> str:
    """Compact forward / backward description, e.g. ``fwd 128x64 w4 s3 / bwd default``."""
    def part(p: dict[str, Any], prefix: str, tiles: tuple[str, ...]) -> str:
        p = {k[4:]: v for k, v in p.items()}
        if not p:
            return f"{prefix} default"
        text = "x".join(str(p[t]) for t in tiles if t in p) or "default tiles"
        text += "".join(f" {tag}{p[key]}" for tag, key in (("w", "num_warps"), ("s", "num_stages")) if key in p)
        return f"{prefix} {text}" + (" +TMA" if p.get("USE_TMA") else "")

    return (part(_fwd_part(options), "fwd", ("BLOCK_M", "BLOCK_N")) + " / "
            + part(_bwd_part(options), "bwd", ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")))


def autotune_winners(records: list[tuple[str, list[tuple[float, str]]]]) -> dict[str, Any]:
    """Explicit ``kernel_options`` of the fastest forward and backward choices PyTorch's autotuner timed.

    ``records``: ``(kernel name, [(ms, choice description), ...])``; a description reads
    ``"BLOCK_M=128, BLOCK_N=64, ..., num_stages=3, num_warps=4"`` (Inductor's TritonTemplateCaller).
    """
    import re

    out: dict[str, Any] = {}
    for name, choices in records:
        if "flex_attention_backward" in name:
            prefix, tiles = "bwd_", ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")
        elif "flex_attention" in name:
            prefix, tiles = "fwd_", ("BLOCK_M", "BLOCK_N")
        else:
            continue
        finite = [(ms, desc) for ms, desc in choices if math.isfinite(ms) and ms > 0]
        if not finite:
            continue
        fields = dict(re.findall(r"(\w+)=([^,\s]+)", min(finite)[1]))
        for key in (*tiles, "num_warps", "num_stages"):
            if key in fields and fields[key].isdigit():
                out[prefix + key] = int(fields[key])
        if fields.get("USE_TMA") == "True":
            out[prefix + "USE_TMA"] = True
    return out


class FlexSweep:
    """State and steps of the sweep; everything lands in ``bench.results["sweep_flex"]`` as it is measured."""

    def __init__(self, bench: Bench):
        from dalle.attention_masks import flex_device_key

        self.bench, self.device = bench, bench.device
        self.gpu = self.device.type == "cuda"
        self.config = layout(bench.args, "sparse", "dense")
        self.length = self.config.seq_len - 1
        self.dtype = torch.bfloat16 if self.gpu else torch.float32
        self.repeats = bench.args.op_repeats
        self.reserve = SWEEP_CONFIRM_RESERVE_S if self.gpu else 0.0
        self.kinds = ["row", "column", "conv"]
        self._inputs: dict[str, Any] = {}
        state = bench.results.setdefault("sweep_flex", {})
        state.setdefault("runs", {})
        state.setdefault("autotune", {})
        state.setdefault("reference", {})
        state["device_key"] = flex_device_key(self.device)
        if state.get("running"):  # resumed after the process died inside this one
            kind_or_autotune, name = state["running"]
            group = state["autotune"] if kind_or_autotune == "autotune" else state["runs"].get(kind_or_autotune, {})
            if name in group:
                group[name]["status"] = "crashed (the process died)"
            state["running"] = None
        self.state = state

    # -- measuring --------------------------------------------------------------------------------

    def inputs(self, kind: str) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``([q, k, v], grad, mask, reference)`` in ``kind``'s stream order; the reference is fp32 dense."""
        import torch.nn.functional as F

        from dalle.attention_masks import build_mask, flex_mask

        if kind not in self._inputs:
            cfg, device = self.config, self.device
            b, h, d, n = self.bench.args.batch, cfg.n_heads, cfg.head_dim, self.length
            gen = torch.Generator(device=device).manual_seed(0)
            q, k, v, grad = (torch.randn(b, h, n, d, device=device, dtype=self.dtype, generator=gen) for _ in range(4))
            mask = build_mask(kind, cfg.text_len, cfg.image_grid, cfg.conv_kernel, device)[:n, :n]
            order = flex_mask(kind, cfg.text_len, cfg.image_grid, cfg.conv_kernel, n, device, block_size=128).order
            if order is not None:
                q, k, v, grad = (x.index_select(2, order) for x in (q, k, v, grad))
                mask = mask[order][:, order]
            leaves = [x.detach().requires_grad_(self.gpu) for x in (q, k, v)]
            ref_in = [x.detach().float().requires_grad_(self.gpu) for x in (q, k, v)]
            out = F.scaled_dot_product_attention(*ref_in, attn_mask=mask)
            reference = [out.detach()]
            if self.gpu:
                reference += list(torch.autograd.grad(out, ref_in, grad.float()))
            self._inputs[kind] = (leaves, grad, mask, reference)
        return self._inputs[kind]

    def _ms(self, fn: Callable[[], Any]) -> float:
        """Best of three rounds of ``repeats`` calls, ms a call (after one warm-up call)."""
        fn()
        sync(self.device)
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(self.repeats):
                fn()
            sync(self.device)
            best = min(best, (time.perf_counter() - t0) / self.repeats)
        return best * 1e3

    def measure(self, kind: str, attn: Callable[..., torch.Tensor]) -> dict[str, Any]:
        """Compile (first call), check against the reference, then time ``attn(q, k, v)`` forward and fwd+bwd.

        Gradients come from ``torch.autograd.grad`` (nothing accumulates into ``.grad``), the same
        for every candidate and the dense reference.  On the CPU: forward only (no flex backward).
        """
        (q, k, v), grad, _, reference = self.inputs(kind)
        t0 = time.perf_counter()
        if self.gpu:
            out = attn(q, k, v)
            got = [out.detach(), *torch.autograd.grad(out, (q, k, v), grad)]
        else:
            with torch.no_grad():
                got = [attn(q, k, v)]
        sync(self.device)
        first_s = time.perf_counter() - t0
        errors = [float((g.float() - r).abs().max() / r.abs().max().clamp_min(1e-12)) for g, r in zip(got, reference)]
        err = max(errors) if all(math.isfinite(e) for e in errors) else math.inf
        if self.gpu:
            fwd = self._ms(lambda: attn(q, k, v))  # with autograd recording, as in training
            total = self._ms(lambda: torch.autograd.grad(attn(q, k, v), (q, k, v), grad))
        else:
            with torch.no_grad():
                fwd = self._ms(lambda: attn(q, k, v))
            total = None
        out = {"fwd_ms": round(fwd, 4), "total_ms": round(total, 4) if total is not None else None,
               "bwd_ms": round(total - fwd, 4) if total is not None else None,
               "rel_err": err if math.isfinite(err) else "non-finite", "first_call_s": round(first_s, 1)}
        return out

    def time_of(self, entry: dict[str, Any]) -> float:
        """What a candidate is ranked by: forward+backward (forward alone on the CPU)."""
        value = entry.get("total_ms") if self.gpu else entry.get("fwd_ms")
        return float(value) if value is not None else math.inf

    def ok(self, kind: str, entry: dict[str, Any]) -> bool:
        """Measured, and as accurate as PyTorch's defaults (3x their error, at least 2% of the largest value)."""
        if entry.get("status") != "done" or not isinstance(entry.get("rel_err"), float):
            return False
        default = self.state["runs"].get(kind, {}).get(candidate_name((128, 128), {}), {})
        base = default.get("rel_err") if isinstance(default.get("rel_err"), float) else 0.0
        return entry["rel_err"] <= max(3.0 * base, 0.02 if self.gpu else 1e-4)

    # -- steps --------------------------------------------------------------------------------------

    def _seconds(self, cap: float) -> float | None:
        seconds = min(cap, self.bench.left() - self.reserve - 2.0)
        return seconds if seconds >= 8.0 else None

    def _fail(self, entry: dict[str, Any], e: BaseException) -> None:
        if isinstance(e, KeyboardInterrupt):
            raise e
        entry["status"] = "timeout" if isinstance(e, SectionTimeout) else "failed"
        entry["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        if any(s in str(e) for s in _STICKY_CUDA):
            entry["status"] = "crashed (CUDA context lost)"
            self.state["running"] = None
            self.bench.save()
            print(f"[sweep] CUDA context lost ({entry['error'][:200]}); ending this process", flush=True)
            raise SystemExit(3)

    def references(self) -> None:
        """Dense masked SDPA per kind, dense causal SDPA, the column permutation cost, PyTorch's defaults."""
        import torch.nn.functional as F

        ref = self.state["reference"]
        cfg = self.config
        ref.setdefault("layout", {"tokens": self.length, "batch": self.bench.args.batch, "heads": cfg.n_heads,
                                  "head_dim": cfg.head_dim, "dtype": str(self.dtype)})
        for kind in self.kinds:
            if kind in ref:
                continue
            _, _, mask, _ = self.inputs(kind)
            ref[kind] = {"dense_masked": self.measure(kind, lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask))}
            print(f"[sweep] {kind} dense masked SDPA: {ref[kind]['dense_masked']}", flush=True)
        if "dense_causal" not in ref:
            ref["dense_causal"] = self.measure("row", lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, is_causal=True))
            ref["dense_causal"]["rel_err"] = None  # not the row mask: no accuracy to compare
        if "column_reorder_ms" not in ref:
            ref["column_reorder_ms"] = 0.0
            if self.gpu:  # the permutations the model's column layers add around the kernel (fwd+bwd)
                from dalle.attention_masks import flex_mask

                fm = flex_mask("column", cfg.text_len, cfg.image_grid, cfg.conv_kernel, self.length, self.device,
                               block_size=128)
                gen = torch.Generator(device=self.device).manual_seed(1)

                def timed(fn: Callable[[], torch.Tensor], grad: torch.Tensor) -> float:
                    with torch.autocast("cuda", dtype=torch.bfloat16):  # the layer's weights are fp32, x is bf16
                        return self._ms(lambda: torch.autograd.backward(fn(), grad))

                seconds = self._seconds(60.0)
                if seconds:
                    try:
                        with time_box(seconds):
                            cost = reorder_cost(cfg, "column", fm, timed, self.bench.args.batch, self.dtype, gen,
                                                self.device)
                        ref["column_reorder_ms"] = max(cost["reorder_ms"], 0.0)
                        ref["column_reorder"] = cost
                    except Exception as e:  # noqa: BLE001 - without it the column figures lack the permutations
                        ref["column_reorder_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if self.gpu and "pytorch_defaults" not in ref:
            ref["pytorch_defaults"] = pytorch_flex_defaults(cfg.head_dim, self.dtype)
        self.bench.save()

    def evaluate(self, kind: str, block: tuple[int, int], options: dict[str, Any], source: str,
                 block_mask: Any = None, name: str | None = None) -> dict[str, Any] | None:
        """Measure one candidate on ``kind`` (once: results are kept by name); None if out of time."""
        from dalle.attention_masks import check_kernel_options, flex_mask
        from dalle.transformer import flex_attend

        runs = self.state["runs"].setdefault(kind, {})
        name = name or candidate_name(block, options)
        if name in runs:
            return runs[name]
        seconds = self._seconds(SWEEP_CANDIDATE_S)
        if seconds is None:
            self.state["skipped"] = self.state.get("skipped", 0) + 1
            return None
        entry: dict[str, Any] = {"block": list(block), "options": options, "source": source, "status": "running"}
        runs[name] = entry
        self.state["running"] = [kind, name]
        self.bench.save()
        t0 = time.perf_counter()
        try:
            check_kernel_options(options, block)  # strict: an unknown or unsafe option fails here, loudly
            cfg = self.config
            with time_box(seconds):
                torch.compiler.reset()  # one compiled entry at a time: no guard chains, no recompile limit
                mask = block_mask if block_mask is not None else flex_mask(
                    kind, cfg.text_len, cfg.image_grid, cfg.conv_kernel, self.length, self.device,
                    block_size=block).block_mask
                entry.update(self.measure(kind, lambda q, k, v: flex_attend(q, k, v, mask, options)))
            entry["status"] = "done"
        except BaseException as e:  # noqa: BLE001 - a failed candidate is a result
            self._fail(entry, e)
        finally:
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            self.state["running"] = None
            self.bench.cleanup()
            self.bench.save()
        shown = {k: entry.get(k) for k in ("fwd_ms", "bwd_ms", "total_ms", "rel_err", "first_call_s", "error")
                 if entry.get(k) is not None}
        print(f"[sweep] {kind:6s} {name}: {entry['status']} {json.dumps(shown)} ({entry['seconds']} s)", flush=True)
        return entry

    def autotune(self, kind: str, block: tuple[int, int]) -> dict[str, Any] | None:
        """PyTorch's own autotuning (``max_autotune``) of ``kind`` at mask tile ``block``: time and winners."""
        from torch.nn.attention.flex_attention import flex_attention

        from dalle.attention_masks import flex_mask

        key = f"{kind} {block[0]}x{block[1]}"
        tuned = self.state["autotune"]
        if key in tuned:
            return tuned[key]
        if not self.gpu:
            tuned[key] = {"status": "skipped: autotuning compiles Triton kernels (CUDA only)"}
            return tuned[key]
        seconds = self._seconds(SWEEP_AUTOTUNE_S)
        if seconds is None:
            return None
        entry: dict[str, Any] = {"status": "running"}
        tuned[key] = entry
        self.state["running"] = ["autotune", key]
        self.bench.save()
        records: list[tuple[str, list[tuple[float, str]]]] = []

        def saver(timings: dict[Any, float], name: str, *rest: Any) -> None:
            try:
                records.append((str(name), sorted((float(ms), str(getattr(c, "description", "")))
                                                   for c, ms in timings.items())))
            except Exception as e:  # noqa: BLE001 - a changed PyTorch API must not stop the sweep
                entry["saver_error"] = f"{type(e).__name__}: {e}"

        from torch._inductor import select_algorithm

        torch.compiler.reset()  # before adding the saver, should a reset ever drop it
        saver_added = False
        try:
            select_algorithm.add_feedback_saver(saver)
            saver_added = True
        except Exception as e:  # noqa: BLE001
            entry["saver_error"] = f"{type(e).__name__}: {e}"
        t0 = time.perf_counter()
        try:
            cfg = self.config
            with time_box(seconds):
                mask = flex_mask(kind, cfg.text_len, cfg.image_grid, cfg.conv_kernel, self.length, self.device,
                                 block_size=block).block_mask
                tuned_flex = torch.compile(flex_attention, dynamic=False, options={"max_autotune": True})
                entry.update(self.measure(kind, lambda q, k, v: tuned_flex(q, k, v, block_mask=mask)))
            entry["status"] = "done"
            entry["options"] = autotune_winners(records)
            entry["choices"] = {name: [[round(ms, 4), desc] for ms, desc in choices[:6]] for name, choices in records}
        except BaseException as e:  # noqa: BLE001
            self._fail(entry, e)
        finally:
            if saver_added:
                try:
                    select_algorithm.clear_feedback_savers()
                except Exception:  # noqa: BLE001
                    pass
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            self.state["running"] = None
            self.bench.cleanup()
            self.bench.save()
        print(f"[sweep] autotune {key}: {entry['status']} total {entry.get('total_ms')} ms, winners "
              f"{short_config(entry.get('options') or {})} ({entry['seconds']} s)", flush=True)
        return entry

    def defaults(self) -> None:
        for kind in self.kinds:
            self.evaluate(kind, (128, 128), {}, "PyTorch defaults")

    def transfer(self, key: str, kinds: list[str]) -> None:
        """Try the autotuner's winners for ``key`` (``"row 64x64"``) as explicit options on ``kinds``."""
        entry = self.state["autotune"].get(key) or {}
        if entry.get("status") != "done" or not entry.get("options"):
            return
        q, kv = (int(x) for x in key.split()[1].split("x"))
        for kind in kinds:
            self.evaluate(kind, (q, kv), entry["options"], f"autotune {key}")

    def grid(self, kind: str, block: tuple[int, int]) -> None:
        base_fwd, base_bwd, fwd_variants, bwd_variants = SWEEP_GRID[block]
        self.evaluate(kind, block, {**base_fwd, **base_bwd}, "grid base")
        for i in range(max(len(fwd_variants), len(bwd_variants))):
            if i < len(fwd_variants):
                self.evaluate(kind, block, {**base_fwd, **fwd_variants[i], **base_bwd}, "grid fwd")
            if i < len(bwd_variants):
                self.evaluate(kind, block, {**base_fwd, **base_bwd, **bwd_variants[i]}, "grid bwd")

    def combine(self, kind: str, block: tuple[int, int]) -> None:
        """The best forward part with the best backward part at ``block``, ranked on ``kind``, then on row."""
        for source in dict.fromkeys([kind, "row"]):
            done = [e for e in self.state["runs"].get(source, {}).values()
                    if tuple(e.get("block", ())) == block and self.ok(source, e)]
            if len(done) < 2:
                continue
            if self.gpu:
                best_fwd = min(done, key=lambda e: e["fwd_ms"])
                best_bwd = min(done, key=lambda e: e["bwd_ms"] if e.get("bwd_ms") is not None else math.inf)
            else:  # forward only: rank both parts by it (exercises the path)
                best_fwd = best_bwd = min(done, key=self.time_of)
            options = {**_fwd_part(best_fwd["options"]), **_bwd_part(best_bwd["options"])}
            self.evaluate(kind, block, options, f"combined (parts ranked on {source})")

    def gather_variant(self) -> None:
        """Column layers' defaults with the lookup-table mask_mod (the pre-arithmetic one), for comparison."""
        from torch.nn.attention.flex_attention import create_block_mask

        from dalle.attention_masks import flex_mask, mask_mod

        cfg = self.config
        if self._seconds(SWEEP_CANDIDATE_S) is None:
            return
        order = flex_mask("column", cfg.text_len, cfg.image_grid, cfg.conv_kernel, self.length, self.device,
                          block_size=128).order
        mask = create_block_mask(mask_mod("column", cfg.text_len, cfg.image_grid, 1, order), None, None,
                                 self.length, self.length, device=str(self.device), BLOCK_SIZE=128)
        self.evaluate("column", (128, 128), {}, "mask_mod with order lookups", block_mask=mask,
                      name="128x128 defaults, mask_mod with order lookups")

    def best(self, kind: str, block: tuple[int, int] | None = None) -> tuple[str, dict[str, Any]] | None:
        runs = [(name, e) for name, e in self.state["runs"].get(kind, {}).items()
                if self.ok(kind, e) and e.get("source") != "mask_mod with order lookups"
                and (block is None or tuple(e["block"]) == block)]
        return min(runs, key=lambda item: self.time_of(item[1])) if runs else None

    def confirm(self) -> None:
        """Re-time each kind's defaults and best back to back (same minute, same clocks)."""
        from dalle.attention_masks import flex_mask
        from dalle.transformer import flex_attend

        confirmed = self.state.setdefault("confirm", {})
        self.reserve = 70.0 if self.gpu else 0.0  # still kept: the model check
        cfg = self.config
        for kind in self.kinds:
            found = self.best(kind)
            default = self.state["runs"].get(kind, {}).get(candidate_name((128, 128), {}))
            if not found or not default or found[1] is default or kind in confirmed:
                continue
            name, entry = found
            row: dict[str, Any] = {"best": name}
            for label, block, options in (("default", (128, 128), {}), ("best", tuple(entry["block"]),
                                                                         entry["options"])):
                seconds = self._seconds(30.0)
                if seconds is None:
                    return
                try:
                    with time_box(seconds):
                        torch.compiler.reset()
                        mask = flex_mask(kind, cfg.text_len, cfg.image_grid, cfg.conv_kernel, self.length,
                                         self.device, block_size=block).block_mask
                        m = self.measure(kind, lambda q, k, v: flex_attend(q, k, v, mask, options))
                    row[f"{label}_ms"] = self.time_of(m)
                except BaseException as e:  # noqa: BLE001
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    row[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            confirmed[kind] = row
            print(f"[sweep] confirm {kind}: {row}", flush=True)
            self.bench.save()

    def summarize(self) -> dict[str, Any]:
        """Best per kind, the 12-layer schedule with the defaults and with the best, the FLEX_TUNING tables.

        Times are forward+backward of the attention op; column layers add the permutations'
        cost (``column_reorder_ms``) when compared with dense attention.  Where the defaults and
        the best were re-timed back to back (:meth:`confirm`), those figures decide.
        """
        from dalle.attention_masks import layer_schedule, normalize_block_size

        state, ref = self.state, self.state["reference"]
        reorder = float(ref.get("column_reorder_ms") or 0.0)
        summary: dict[str, Any] = {"column_reorder_ms": reorder}
        tables: dict[str, dict[str, Any]] = {"table": {}, "table_128": {}}
        for kind in self.kinds:
            runs = state["runs"].get(kind, {})
            default = runs.get(candidate_name((128, 128), {}))
            dense = ref.get(kind, {}).get("dense_masked")
            extra = reorder if kind == "column" else 0.0
            row: dict[str, Any] = {"dense_masked_ms": self.time_of(dense) if dense else None,
                                   "default_ms": self.time_of(default) if default and self.ok(kind, default) else None}
            confirmed = state.get("confirm", {}).get(kind, {})
            for label, block, table in (("best", None, "table"), ("best_128", (128, 128), "table_128")):
                found = self.best(kind, block)
                if not found:
                    continue
                name, entry = found
                ms, default_ms = self.time_of(entry), row["default_ms"]
                if confirmed.get("best") == name and "best_ms" in confirmed and "default_ms" in confirmed:
                    ms, default_ms = confirmed["best_ms"], confirmed["default_ms"]
                gain = 1.0 - ms / default_ms if default_ms else 0.0
                row[label] = {"name": name, "ms": round(ms, 4), "default_ms": default_ms,
                              "gain_vs_default": round(gain, 3), "config": short_config(entry["options"]),
                              "block": entry["block"], "options": entry["options"]}
                if row["dense_masked_ms"]:
                    row[label]["speedup_vs_dense_masked"] = round(row["dense_masked_ms"] / (ms + extra), 3)
                is_default = not entry["options"] and tuple(entry["block"]) == (128, 128)
                if not is_default and gain >= SWEEP_MIN_GAIN:
                    q, kv = entry["block"]
                    tables[table][kind] = {"block_size": q if q == kv else [q, kv],
                                           "kernel_options": entry["options"]}
            if row["dense_masked_ms"] and row["default_ms"]:
                row["speedup_default_vs_dense_masked"] = round(row["dense_masked_ms"] / (row["default_ms"] + extra), 3)
            summary[kind] = row
        schedule = layer_schedule(12)  # 8 row, 3 column, 1 conv
        if all(summary[k]["dense_masked_ms"] and summary[k]["default_ms"] for k in set(schedule)):
            def flex_ms(kind: str, best: bool) -> float:
                row = summary[kind]
                ms = row["best"]["ms"] if best and "best" in row else row["default_ms"]
                return min(ms, row["default_ms"]) + (reorder if kind == "column" else 0.0)

            dense_total = sum(summary[k]["dense_masked_ms"] for k in schedule)
            default_total = sum(flex_ms(k, False) for k in schedule)
            best_total = sum(flex_ms(k, True) for k in schedule)
            summary["schedule_12_layers"] = {
                "layers": ", ".join(f"{schedule.count(k)} {k}" for k in self.kinds),
                "dense_masked_ms": round(dense_total, 3), "flex_default_ms": round(default_total, 3),
                "flex_best_ms": round(best_total, 3), "speedup_default": round(dense_total / default_total, 3),
                "speedup_best": round(dense_total / best_total, 3)}
        key = state["device_key"]
        for name, table in tables.items():
            summary[name] = {key: table} if table else {}
        summary["best_needs_small_tiles"] = any(
            min(normalize_block_size(v["block_size"])) < 128 for v in tables["table"].values())
        state["summary"] = summary
        self.bench.save()
        return summary

    def model_check(self, summary: dict[str, Any]) -> None:
        """Training steps of the 12-layer model (eager blocks, flex) with PyTorch's defaults, then with the table.

        Checks the plumbing end to end on the GPU (mask tiles and options reach the kernels, the
        backward compiles, no fallback to dense) and what the table is worth in a whole step.
        """
        from dalle import attention_masks, transformer

        table = summary.get("table") or {}
        check = self.state.setdefault("model_check", {})
        self.reserve = 0.0
        if not self.gpu or not table or "tuned" in check:
            return
        saved = attention_masks.FLEX_TUNING
        for label, tuning in (("defaults", {}), ("tuned", table)):
            if label in check:
                continue
            seconds = self._seconds(60.0)
            if seconds is None:
                check[label] = {"skipped": "no time left"}
                break
            try:
                attention_masks.FLEX_TUNING = tuning
                torch.compiler.reset()
                with time_box(seconds):
                    out = bench_training(self.bench, "sparse", "flex", False)
                check[label] = {k: out.get(k) for k in ("impl", "step_ms", "tok_s", "mfu", "final_loss", "flex_error")
                                if out.get(k) is not None}
            except BaseException as e:  # noqa: BLE001
                check[label] = {}
                self._fail(check[label], e)
            finally:
                attention_masks.FLEX_TUNING = saved
                transformer._FLEX_BROKEN.clear()  # each run decides for itself
                self.bench.cleanup()
                self.bench.save()
            print(f"[sweep] model check, {label}: {check[label]}", flush=True)

    def run(self) -> None:
        self.references()
        self.defaults()
        if not self.gpu:  # the smoke run also walks the failure path: an invalid option is recorded, not fatal
            self.evaluate("row", (128, 128), {"fwd_BLOCK_M": 256}, "smoke: invalid on purpose")
        for block in ((128, 128), (64, 64)):
            key = f"row {block[0]}x{block[1]}"
            self.autotune("row", block)
            self.transfer(key, self.kinds)
        self.grid("row", (128, 128))
        self.grid("row", (64, 64))
        for kind in self.kinds:
            for block in ((128, 128), (64, 64)):
                self.combine(kind, block)
        for kind, block in (("conv", (64, 64)), ("column", (64, 64)), ("conv", (128, 128)), ("column", (128, 128)),
                            ("row", (128, 64))):
            self.autotune(kind, block)
            self.transfer(f"{kind} {block[0]}x{block[1]}", [kind])
        self.grid("row", (128, 64))
        for kind in self.kinds:
            for block in ((128, 128), (64, 64), (128, 64)):
                self.combine(kind, block)
        self.gather_variant()
        self.confirm()
        summary = self.summarize()
        self.model_check(summary)
        print_sweep(summary, self.state)


def pytorch_flex_defaults(head_dim: int, dtype: torch.dtype) -> dict[str, Any]:
    """PyTorch's own default FlexAttention configs on this GPU (best effort: internal API)."""
    try:
        try:
            from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic
        except ImportError:
            from torch._inductor.template_heuristics import CUDAConfigHeuristic  # older layout
        heuristic = CUDAConfigHeuristic()
        return {"fwd": [str(c) for c in heuristic.get_flex_attn_fwd_configs(head_dim, dtype)],
                "bwd": [str(c) for c in heuristic.get_flex_attn_bwd_configs(head_dim, dtype)]}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def print_sweep(summary: dict[str, Any], state: dict[str, Any]) -> None:
    """The sweep's runs per kind (fastest first), its summary, and the table to paste."""
    for kind, runs in state.get("runs", {}).items():
        done = sorted(((n, e) for n, e in runs.items() if e.get("status") == "done"),
                      key=lambda item: (item[1].get("total_ms") or item[1].get("fwd_ms") or math.inf))
        failed = [(n, e) for n, e in runs.items() if e.get("status") != "done"]
        print(f"\n[sweep] {kind}: {len(done)} measured, {len(failed)} failed")
        print("| mask tile | config | fwd ms | bwd ms | fwd+bwd ms | rel. error | source |")
        print("|---|---|---|---|---|---|---|")
        for name, e in done:
            err = e["rel_err"] if isinstance(e["rel_err"], str) else f"{e['rel_err']:.1e}"
            print(f"| {e['block'][0]}x{e['block'][1]} | {short_config(e['options'])} | {e['fwd_ms']} | "
                  f"{e.get('bwd_ms')} | {e.get('total_ms')} | {err} | {e['source']} |")
        for name, e in failed:
            print(f"| {name} | {e.get('status')}: {str(e.get('error'))[:160]} |")
    print("\n[sweep] summary:", json.dumps({k: v for k, v in summary.items() if not k.startswith("table")},
                                         default=str))
    print("[sweep] FLEX_TUNING (best; paste into dalle/attention_masks.py):", json.dumps(summary.get("table", {})))
    print("[sweep] FLEX_TUNING (best with 128x128 mask tiles):", json.dumps(summary.get("table_128", {})),
          flush=True)
    if summary.get("best_needs_small_tiles"):
        print("[sweep] note: the best table uses mask tiles under 128: flex_attend compiles those with max_autotune "
              "(pytorch/pytorch#176025); a caller that compiles the model itself needs the same", flush=True)


def sweep_flex(bench: Bench) -> None:
    FlexSweep(bench).run()


# --- report -------------------------------------------------------------------------------------


def table(bench: Bench) -> str:
    r = bench.results
    lines = [f"device: {bench.meta.get('device')} | torch {torch.__version__} | peak bf16 "
             f"{bench.meta.get('peak_bf16_tflops')} TFLOP/s | smoke={bench.args.smoke}", "",
             "MFU = (6 * params * tokens + 12 * layers * tokens * seq_len * d_model) / step time / peak, "
             "tokens = batch * 1280 (the peer's formula; dense attention counted for every layer)", "",
             "| training (batch {}) | attention | kernel | compiled | ms/step | tokens/s | TFLOP/s | MFU | vs peer |"
             .format(bench.args.batch), "|---|---|---|---|---|---|---|---|---|"]
    for key, x in r.items():
        if key.startswith("train_"):
            peer = PEER["train_full_tok_s"] if x["attention"] == "full" else PEER["train_sparse_tok_s"]
            mfu = f"{100 * x['mfu']:.1f}%" if "mfu" in x else "-"
            lines.append(f"| {key} | {x['attention']} | {x['impl']} | {x['compiled']} | {x['step_ms']} | "
                         f"{x['tok_s']:,} | {x['tflops']} | {mfu} | {x['tok_s'] / peer:.2f}x |")
    op = r.get("attention_op")
    if op:
        lines += ["", f"| attention op fwd+bwd ({op['tokens']} tokens, batch {op['batch']}) | tiles | dense masked ms | "
                      "efficient-kernel ms | flex ms | flex+reorder ms | speed-up |", "|---|---|---|---|---|---|---|"]
        lines.append(f"| dense causal (SDPA is_causal) | ~0.5 | {op['dense_causal_ms']} | - | - | - | - |")
        for kind in ("row", "column", "conv"):
            if kind in op:
                x = op[kind]
                lines.append(f"| {kind} | {x['tiles_computed']} | {x['dense_masked_ms']} | "
                             f"{x.get('dense_masked_efficient_ms')} | {x.get('flex_ms', '-')} | "
                             f"{x.get('flex_with_reorder_ms', '-')} | {x.get('speedup_vs_dense_masked', '-')} |")
        if "schedule_12_layers" in op:
            x = op["schedule_12_layers"]
            lines.append(f"| 12-layer schedule (8 row, 3 column, 1 conv) | - | {x['dense_masked_ms']} | - | "
                         f"{x['flex_ms']} | - | {x['speedup']} |")
    sweep = r.get("sweep_flex", {}).get("summary")
    if sweep:
        lines += ["", "| flex sweep, fwd+bwd ms (column + reorder vs dense) | dense masked | flex defaults | best | "
                      "best config (mask tile; fwd / bwd) | gain | speed-up vs dense: defaults -> best |",
                  "|---|---|---|---|---|---|---|"]
        for kind in ("row", "column", "conv"):
            x = sweep.get(kind)
            if not x:
                continue
            best = x.get("best", {})
            lines.append(f"| {kind} | {x.get('dense_masked_ms')} | {x.get('default_ms')} | {best.get('ms', '-')} | "
                         f"{'x'.join(map(str, best.get('block', [])))}; {best.get('config', '-')} | "
                         f"{best.get('gain_vs_default', '-')} | {x.get('speedup_default_vs_dense_masked', '-')} -> "
                         f"{best.get('speedup_vs_dense_masked', '-')} |")
        if "schedule_12_layers" in sweep:
            x = sweep["schedule_12_layers"]
            lines.append(f"| 12-layer schedule ({x['layers']}) | {x['dense_masked_ms']} | {x['flex_default_ms']} | "
                         f"{x['flex_best_ms']} | - | - | {x['speedup_default']} -> {x['speedup_best']} |")
        lines += ["", f"FLEX_TUNING (best): {json.dumps(sweep.get('table', {}))}",
                  f"FLEX_TUNING (128x128 mask tiles only): {json.dumps(sweep.get('table_128', {}))}"]
    samples = {k: x for k, x in r.items() if k.startswith("sample_")}
    if samples:
        lines += ["", "| sampling (all image tokens, KV cache) | attention | batch | sampler | s/batch | s/image | "
                      "ms/token step | vs peer (3.20 s/image) |", "|---|---|---|---|---|---|---|---|"]
        for key, x in samples.items():
            lines.append(f"| {key} | {x['attention']} | {x['batch']} | {x['sampler']} | {x['s_per_batch']} | "
                         f"{x['s_per_image']} | {x['ms_per_token_step']} | {x['speedup_vs_peer_cached']}x |")
    if bench.errors:
        lines += ["", "failed or skipped sections:"] + [f"- {k}: {v}" for k, v in bench.errors.items()]
    return "\n".join(lines)


# --- orchestration: each group of sections in its own process ---------------------------------
#
# A section that breaks the CUDA context (a failed graph capture, a compiler crash) or hangs
# in a compiler must not take the others with it: each group runs in a fresh process with
# a hard timeout (the whole process group is killed), and writes its JSON after every section.

GROUPS: list[tuple[str, float]] = [  # (group, most seconds it may take), most wanted first
    ("eager", 50.0),
    ("graphed", 35.0),
    ("flex", 70.0),
    ("compiled_full", 80.0),
    ("compiled_flex", 80.0),
]
IMPORT_GRACE_S = 20.0  # a child's start-up (Python, torch, CUDA) before its own budget starts
SWEEP_GROUP = "sweep_flex"  # --sweep-flex: this group alone, with the whole budget
SWEEP_LAUNCHES = 3  # a sweep process that died (a poisoned CUDA context) is relaunched with --resume


def run_group(group: str, bench: Bench) -> None:
    args, gpu = bench.args, bench.device.type == "cuda"
    b0 = args.sample_batch[0]
    if group == "eager":
        bench.run("train_full_eager", lambda: bench_training(bench, "full", "dense", False), box=30)
        bench.run("train_sparse_dense_eager", lambda: bench_training(bench, "sparse", "dense", False), box=30)
        bench.run(f"sample_full_library_b{b0}", lambda: bench_sampling(bench, "full", b0, graphed=False), box=30)
    elif group == "graphed":
        bench.run(f"sample_full_graphed_b{b0}", lambda: bench_sampling(bench, "full", b0, graphed=True), box=20)
        bench.run(f"sample_sparse_graphed_b{b0}", lambda: bench_sampling(bench, "sparse", b0, graphed=True), box=20)
        for b in args.sample_batch[1:]:
            bench.run(f"sample_full_graphed_b{b}", lambda b=b: bench_sampling(bench, "full", b, graphed=True), box=20)
    elif group == "flex":
        # The attention op first: it compiles the FlexAttention kernels the whole-model step then reuses.
        bench.run("attention_op", lambda: bench_attention_op(bench, ["row", "column", "conv"]), box=60)
        if gpu:
            bench.run("train_sparse_flex_eager", lambda: bench_training(bench, "sparse", "flex", False), box=40)
        else:
            bench.errors["train_sparse_flex_eager"] = "skipped: FlexAttention has no backward on the CPU"
    elif group in ("compiled_full", "compiled_flex"):
        if not gpu and not args.compile_on_cpu:
            bench.errors[f"train_{group}"] = "skipped: compiling is for the GPU run (--compile-on-cpu to force)"
            return
        if group == "compiled_full":
            bench.run("train_full_compiled", lambda: bench_training(bench, "full", "dense", True), box=75)
        else:
            impl = "flex" if gpu else "dense"
            bench.run(f"train_sparse_{impl}_compiled", lambda: bench_training(bench, "sparse", impl, True), box=75)
    elif group == "sweep_flex":
        sweep_flex(bench)
    else:
        raise ValueError(f"unknown group {group!r}")


def child_args(args: argparse.Namespace, group: str, json_path: str, budget: float) -> list[str]:
    out = [sys.executable, str(Path(__file__).resolve()), "--only", group, "--json", json_path,
           "--budget", f"{budget:.0f}", "--layers", str(args.layers), "--heads", str(args.heads),
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
           "--op-repeats", str(args.op_repeats), "--sample-repeats", str(args.sample_repeats),
           "--sample-batch", *[str(b) for b in args.sample_batch]]
    if args.smoke:
        out.append("--smoke")
    if args.device:
        out += ["--device", args.device]
    if args.compile_on_cpu:
        out.append("--compile-on-cpu")
    if group == SWEEP_GROUP and Path(json_path).is_file():
        out.append("--resume")  # a relaunch: carry on from what the previous process recorded
    return out


def orchestrate(args: argparse.Namespace) -> int:
    import subprocess
    import tempfile

    start = time.perf_counter()
    # The parent never touches the GPU (each group's process does); its device is only a label.
    merged = Bench(args, torch.device(args.device or "cpu"))
    merged.start = start
    skip = set(args.skip)
    groups = [(SWEEP_GROUP, args.budget)] if args.sweep_flex else GROUPS
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        for group, box in groups:
            if group in skip:
                merged.errors[group] = "skipped: --skip"
                continue
            part = str(Path(tmp) / f"{group}.json")
            t0 = time.perf_counter()
            for launch in range(SWEEP_LAUNCHES if group == SWEEP_GROUP else 1):
                left = args.budget - (time.perf_counter() - start)
                budget = min(box, left - IMPORT_GRACE_S)
                if budget < (30 if launch else 10):
                    if not launch:
                        merged.errors[group] = f"skipped: {max(left, 0):.0f} s left of the {args.budget:.0f} s budget"
                        print(f"[{group}] {merged.errors[group]}", flush=True)
                    break
                print(f"=== group {group}{' (resumed)' if launch else ''} (at most {budget:.0f} s + start-up) ===",
                      flush=True)
                proc = subprocess.Popen(child_args(args, group, part, budget), start_new_session=True)
                try:
                    rc = proc.wait(timeout=budget + IMPORT_GRACE_S)
                    if rc != 0:
                        merged.errors[group] = f"process exited with status {rc}"
                    elif launch:
                        merged.errors[group] = "resumed after its process died (see the failed or crashed runs)"
                except subprocess.TimeoutExpired:
                    rc = None
                    merged.errors[group] = f"killed after {time.perf_counter() - t0:.0f} s (hung past its time box)"
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        proc.kill()
                    proc.wait()
                if rc == 0 or not Path(part).is_file():
                    break
            if Path(part).is_file():
                try:
                    data = json.loads(Path(part).read_text())
                except json.JSONDecodeError as e:
                    merged.errors[group] = f"unreadable results ({e})"
                    continue
                merged.results.update(data.get("results", {}))
                merged.errors.update(data.get("errors", {}))
                if not merged.meta:
                    merged.meta = data.get("meta", {})
            merged.save()  # after every group: an outer timeout still leaves what was measured
            print(f"=== group {group} done in {time.perf_counter() - t0:.1f} s ===", flush=True)
    merged.meta["elapsed_s"] = round(time.perf_counter() - start, 1)
    merged.save()
    write_sweep_table(merged)
    print()
    print(table(merged), flush=True)
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


def write_sweep_table(bench: Bench) -> None:
    """``--sweep-flex``: the tables for FLEX_TUNING as their own JSON file (``--table-json``)."""
    summary = bench.results.get("sweep_flex", {}).get("summary")
    path = bench.args.table_json or (str(Path(bench.args.json).with_suffix("")) + "_table.json"
                                     if bench.args.json else None)
    if not summary or not path:
        return
    payload = {"FLEX_TUNING": summary.get("table", {}), "FLEX_TUNING_128x128_tiles": summary.get("table_128", {}),
               "schedule_12_layers": summary.get("schedule_12_layers"), "torch": torch.__version__,
               "device": bench.meta.get("device"), "best_needs_small_tiles": summary.get("best_needs_small_tiles")}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="write the results here (rewritten after every section)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and few steps; runs on the CPU")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--budget", type=float, default=215.0,
                        help="seconds for everything, start-up of each group included (default 215)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16, help="heads of 64 (16 -> d_model 1024)")
    parser.add_argument("--batch", type=int, default=8, help="training batch (default 8)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps after the warm-up")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--op-repeats", type=int, default=20)
    parser.add_argument("--sample-batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--sample-repeats", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], choices=[g for g, _ in GROUPS], help="groups to leave out")
    parser.add_argument("--sweep-flex", action="store_true",
                        help="only the FlexAttention kernel sweep (section 4; give it --budget 480 on a GPU)")
    parser.add_argument("--table-json", default=None,
                        help="--sweep-flex: write the FLEX_TUNING tables here (default: next to --json)")
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)  # a relaunched sweep process
    parser.add_argument("--compile-on-cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a child process: one group
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.warmup_steps, args.op_repeats = 2, 2, 1, 2
        args.sample_batch = args.sample_batch[:1] if args.sample_batch != [32, 128] else [2]
    if args.only is None:
        return orchestrate(args)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bench = Bench(args, device)
    if args.resume and args.json and Path(args.json).is_file():  # a relaunched sweep: keep what was measured
        previous = json.loads(Path(args.json).read_text())
        bench.results, bench.errors = previous.get("results", {}), previous.get("errors", {})
    name, peak = peak_tflops(device)
    from dalle.attention_masks import flex_available
    from dalle.transformer import flex_works_on

    bench.meta = {"device": name, "peak_bf16_tflops": peak, "torch": torch.__version__,
                  "cuda": torch.version.cuda, "flex_available": flex_available(),
                  "flex_on_device": flex_works_on(device), "smoke": args.smoke,
                  "layout": "smoke" if args.smoke else f"256 text + 32x32 image tokens, {args.layers} layers, "
                                                       f"d_model {64 * args.heads}, batch {args.batch}"}
    print(f"[{args.only}] {json.dumps(bench.meta)}", flush=True)
    try:
        run_group(args.only, bench)
    finally:
        bench.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
