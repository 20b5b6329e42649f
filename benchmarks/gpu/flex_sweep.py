"""Section 4 of ``bench_gpu.py`` (``--sweep-flex``, run alone): the FlexAttention kernel sweep.

Which FlexAttention settings make the sparse layers fastest at the paper layout?  A candidate
is a mask tile ("block", query x key) and ``kernel_options``; each is timed forward and
forward+backward on the attention op alone (the model's ``flex_attend``, column layers in
their column-major order) and its output and gradients are checked against an fp32 dense
reference.  A candidate that fails to compile is recorded as failed, never fatal.  Steps, most
useful first, each within the budget (``--sweep-flex``, run alone):

1. references: dense masked SDPA per kind (the model's dense path, measured the same way),
   dense causal SDPA, the column layers' token permutations, PyTorch's defaults (128 x 128);
2. PyTorch's autotuner (max_autotune) on row layers, per mask tile: its winning forward and
   backward configs become explicit candidates, tried on every kind;
3. a hand grid on row layers (SWEEP_GRID): one change at a time, forward or backward;
4. per kind and mask tile, the best forward part with the best backward part (the two
   kernels are independent, so their best settings combine);
5. the autotuner on the other kinds and tiles as time allows, and step 4 again;
6. the defaults and the best of each kind re-timed back to back, the 12-layer schedule's
   speed-up with each, and the table for ``dalle.attention_masks.FLEX_TUNING``.

Excluded on purpose: PRESCALE_QK (changes rounding), ROWS_GUARANTEED_SAFE and
BLOCKS_ARE_CONTIGUOUS (false for these masks: NaNs or wrong results), see FLEX_UNSAFE_OPTIONS.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .attention_op import reorder_cost
from .common import Bench, SectionTimeout, layout, sync, time_box
from .training import bench_training


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
