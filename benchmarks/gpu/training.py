"""Section 1 of ``bench_gpu.py``: whole training steps, tokens/s and MFU."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from dalle.transformer import DalleTransformer

from .common import Bench, layout, peak_tflops, step_flops, sync


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
