"""Section 2 of ``bench_gpu.py``: the attention op alone, dense masked SDPA against FlexAttention."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Callable

import torch

from dalle.config import TransformerConfig

from .common import SCHEDULE_12, Bench, layout, sync


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
