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
   :class:`StaticDecoder` on a GPU) and this file's own loop around a StaticDecoder.

    python benchmarks/bench_gpu.py --json gpu.json            # on a GPU, ~3 minutes
    python benchmarks/bench_gpu.py --smoke --json /tmp/s.json  # tiny sizes, runs on the CPU

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
from dalle.transformer import DalleTransformer, StaticDecoder  # noqa: E402

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

    from dalle.attention_masks import build_mask, flex_mask, tile_fraction

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
        row: dict[str, Any] = {"tiles_computed": round(tile_fraction(kind, config.text_len, config.image_grid,
                                                                     config.conv_kernel), 3)}
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
            row["flex_ms"] = round(timed(lambda: flex_attend(q, k, v, fm.block_mask)), 3)
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
    return out


def orchestrate(args: argparse.Namespace) -> int:
    import subprocess
    import tempfile

    start = time.perf_counter()
    # The parent never touches the GPU (each group's process does); its device is only a label.
    merged = Bench(args, torch.device(args.device or "cpu"))
    merged.start = start
    skip = set(args.skip)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        for group, box in GROUPS:
            if group in skip:
                merged.errors[group] = "skipped: --skip"
                continue
            left = args.budget - (time.perf_counter() - start)
            budget = min(box, left - IMPORT_GRACE_S)
            if budget < 10:
                merged.errors[group] = f"skipped: {max(left, 0):.0f} s left of the {args.budget:.0f} s budget"
                print(f"[{group}] {merged.errors[group]}", flush=True)
                continue
            part = str(Path(tmp) / f"{group}.json")
            print(f"=== group {group} (at most {budget:.0f} s + start-up) ===", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.Popen(child_args(args, group, part, budget), start_new_session=True)
            try:
                rc = proc.wait(timeout=budget + IMPORT_GRACE_S)
                if rc != 0:
                    merged.errors[group] = f"process exited with status {rc}"
            except subprocess.TimeoutExpired:
                merged.errors[group] = f"killed after {time.perf_counter() - t0:.0f} s (hung past its time box)"
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
                proc.wait()
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
    print()
    print(table(merged), flush=True)
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


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
