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

Sections (each one time-boxed, each failure printed and skipped, never fatal), one
module each in ``benchmarks/gpu/``; this script runs them and reports:

1. ``gpu/training.py``, training steps: full attention (SDPA causal), sparse with dense
   masked attention, sparse with FlexAttention block masks; eager, then with
   ``torch.compile`` per block;
2. ``gpu/attention_op.py``, the attention op alone (forward + backward, 16 heads, batch 8,
   1279 tokens): dense masked SDPA vs FlexAttention per layer kind, and the paper
   schedule's weighted mean; for column layers "flex+reorder" adds the cost of the model's
   token permutations, measured on the model's own layer (:func:`reorder_cost`);
3. ``gpu/sampling.py``, sampling 1024 image tokens with the key/value cache: the library
   sampler (``generate_images_tokens`` with its default decoder, which is the CUDA-graph
   :class:`StaticDecoder` on a GPU) and a bare loop around a StaticDecoder;
4. ``gpu/flex_sweep.py``, ``--sweep-flex`` (alone): FlexAttention mask tiles and kernel
   options for each sparse kind against dense masked SDPA, PyTorch's autotuner included;
   prints the table for ``dalle.attention_masks.FLEX_TUNING`` and writes it next to
   ``--json`` (``*_table.json``).

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
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# The sections, one module each in benchmarks/gpu/ (found beside this script).
from gpu.attention_op import bench_attention_op  # noqa: E402
from gpu.common import PEER, Bench, peak_tflops  # noqa: E402
from gpu.flex_sweep import sweep_flex, write_sweep_table  # noqa: E402
from gpu.sampling import bench_sampling  # noqa: E402
from gpu.training import bench_training  # noqa: E402

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
