"""Write BENCHMARKS.md from the benchmark scripts, side by side with the peer's figures.

    .venv/bin/python benchmarks/write_benchmarks.py            # reruns the CPU benchmarks (~5 min)
    .venv/bin/python benchmarks/write_benchmarks.py --no-run   # only re-render from saved results

CPU figures are measured in this run (tokenizer, transformer); the long or GPU runs are read
from benchmarks/results/*.json, each written by the command named beside its table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CATEGORIES = ["single", "single_size", "single_region", "pair", "pair_relation", "zero_shot", "overall"]


def run(script: str, *args: str) -> str:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    (RESULTS / (Path(script).stem + ".txt")).write_text(out)
    return out


def saved(name: str) -> str | None:
    path = RESULTS / name
    return path.read_text() if path.is_file() else None


def load(name: str) -> dict | None:
    text = saved(name)
    return json.loads(text) if text else None


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def quality_section(report: dict, title: str, command: str) -> list[str]:
    d, t, c, s = report["dvae"], report["transformer"], report["clip"], report["shapes"]
    st = report.get("settings", {})
    lines = [
        f"### {title}",
        f"`{command}` ({st.get('prompts_per_category', '?')} held-out prompts a category, "
        f"{st.get('candidates', '?')} candidates each, {st.get('seconds', '?')} s)",
        "",
        "| category | reranked top-1 | random pick | real images | target |",
        "|---|---|---|---|---|",
    ]
    targets = {"single": ">= 90%", "pair_relation": ">= 60%", "zero_shot": ">= 30%"}
    for cat in CATEGORIES:
        row = [s[k].get(cat) for k in ("reranked_top1", "random_pick", "real_images")]
        lines.append(f"| {cat} | " + " | ".join(pct(v) if v is not None else "-" for v in row)
                     + f" | {targets.get(cat, '')} |")
    lines += [
        "",
        f"Reranking gain (top-1 minus random pick, overall): **{100 * report['reranking_gain']:+.1f} points** (target >= +15).",
        "",
        "| part | figure |",
        "|---|---|",
        f"| dVAE held-out PSNR | {d['psnr']:.2f} dB (target >= 28) |",
        f"| dVAE codebook used | {pct(d['codebook_usage'])} |",
        f"| dVAE reconstructions the judge accepts | {pct(d['recon_pass_rate'])} (target >= 98%) |",
        f"| transformer held-out loss | {t['bits_per_image_token']:.3f} bits per image token |",
        f"| CLIP text-to-image R@1 among 100 | {pct(c['r_at_1'])} |",
    ]
    if "r_at_1_judged" in c:
        lines.append(f"| CLIP: top image of 100 fits the caption (judged) | {pct(c['r_at_1_judged'])} |")
    lines += [
        "",
    ]
    return lines


def dvae_sweep_section(rows: list[dict], notes: str | None) -> list[str]:
    """The table of benchmarks/sweep_dvae.py runs (results/sweep_dvae.jsonl) and the notes beside it."""
    lines = ["## dVAE recipe sweep: which lever matters (shapes set, 1 thread a run, shared CPU)", ""]
    if notes:
        lines += [notes.strip(), ""]
    lines += ["| runs side by side | run | quantizer | likelihood | beta | samples | tau, beta warm-up (share of run) | peak step size | budget (min) | steps "
              "| trained (min) | s/step | load avg (start, end) | held-out PSNR | codes used (held out) | perplexity |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        o = r["overrides"]
        gumbel = o.get("dvae.quantizer", "vq") == "gumbel"
        quantizer = "Gumbel" if gumbel else "VQ (shapes preset)"
        likelihood = o.get("dvae.recon_loss", "mse")
        beta = o.get("dvae.kl_weight", 0.2) if gumbel else "-"
        samples = ("straight-through" if o.get("dvae.straight_through", True) else "soft") if gumbel else "-"
        lr = o.get("train.dvae_lr", 2e-3)
        shares = (f"{o.get('train.dvae_temperature_fraction', 0.05):g}, {o.get('train.dvae_kl_warmup_fraction', 0.05):g}"
                  if gumbel else "-")
        load = ", ".join(f"{x:g}" for x in r["load_avg"])
        lines.append(f"| {r.get('group', '')} | {r['name']} | {quantizer} | {likelihood} | {beta} | {samples} | {shares} | {lr:g} "
                     f"| {r['minutes']:g} | {r['steps']} | {r['train_seconds'] / 60:.1f} | {r['s_per_step']:.2f} | {load} | {r['psnr']:.2f} dB "
                     f"| {pct(r['codebook_usage'])} | {r['perplexity']:.1f} |")
    return lines + [""]


def gpu_section(bench: dict) -> list[str]:
    meta = bench.get("meta") or next((v for v in bench.values() if isinstance(v, dict) and "device" in v), {})
    lines = ["## One GPU", ""]
    log = saved("bench_gpu_h200.log")
    if log:
        start = log.find("| training")
        lines += [f"`python3 benchmarks/bench_gpu.py --json bench_gpu.json` on {meta.get('device', 'the GPU')} "
                  f"(torch {meta.get('torch', '?')}); the script's own tables:", "", log[start:].split("\nfailed")[0].strip(), ""]
    lines += [
        "Peer on an H200 (shared/ANCHORS.md): training 46,000 tokens/s (MFU 7.9%) full attention, 51,700 tokens/s "
        "sparse; sampling 3.20 s an image with its cache, 4.17 s sparse.",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-run", action="store_true", help="do not rerun the CPU benchmarks; use saved output")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.no_run:
        transformer = saved("bench_transformer.txt") or "(not run)"
        tokenizer = saved("bench_tokenizer.txt") or "(not run)"
    else:
        transformer = run("bench_transformer.py")
        tokenizer = run("bench_tokenizer.py")

    lines = [
        "# Benchmarks",
        "",
        f"Written by `benchmarks/write_benchmarks.py` on {date.today()} ({platform.machine()}, Python "
        f"{platform.python_version()}). Every figure comes from a script in this repo; rerun it to check. "
        "The CPU machines are shared and noisy: compare ratios from one run, not absolute times.",
        "",
        "## Quality of the bundled model (shapes set, held-out captions)",
        "",
    ]
    for name, title, command in (
        ("eval_bundled_cpu.json", "The bundled model (trained 60 minutes on 2 CPU cores), measured on 2 CPU cores",
         "dalle eval --prompts-per-category 40 --device cpu"),
        ("eval_previous_bundled_cpu.json", "The previous bundled model (trained 5 minutes on one H200), on 2 CPU cores",
         "dalle eval --model PREVIOUS --prompts-per-category 40 --device cpu"),
        ("eval_previous_bundled_h200.json", "The previous bundled model, measured on the H200 right after training",
         "dalle eval --model EXPORT --device cuda"),
    ):
        report = load(name)
        if report:
            lines += quality_section(report, title, command)
    dvae = saved("bench_dvae.txt")
    if dvae:
        lines += ["## dVAE: Gumbel-softmax against VQ-VAE (2 CPU cores)", "", "`" + dvae.splitlines()[0] + "`", "", "```",
                  *dvae.splitlines()[1:], "```", ""]
    sweep = saved("sweep_dvae.jsonl")
    if sweep:
        rows = [json.loads(line) for line in sweep.splitlines() if line.strip()]
        lines += dvae_sweep_section(rows, saved("sweep_dvae_notes.md"))
    lines += [
        "## Transformer on 2 CPU cores",
        "",
        "`.venv/bin/python benchmarks/bench_transformer.py` (d_model 256, 4 layers, 4 heads of 64, 32 text + 8x8 image "
        "tokens, 512 codes, batch 32 training, batch 8 sampling; the peer is lucidrains' DALLE-pytorch 1.6.6 measured on "
        "these machines, shared/ANCHORS.md):",
        "",
        "```",
        transformer.strip(),
        "```",
        "",
    ]
    sparse_runs = [(name, saved(name)) for name in ("bench_transformer_1thread_before.txt", "bench_transformer_1thread.txt",
                                                   "bench_transformer_1thread_repeats5.txt")]
    if any(text for _, text in sparse_runs):
        lines += ["## Sparse schedule (row / column / conv) against dense attention, 1 thread", ""]
        notes = saved("bench_transformer_1thread_notes.md")
        if notes:
            lines += [notes.strip(), ""]
        for name, text in sparse_runs:
            if text:
                lines += [f"`benchmarks/results/{name}`:", "", "```", text.strip(), "```", ""]
    lines += [
        "## Tokenizer on 2 CPU cores",
        "",
        "`.venv/bin/python benchmarks/bench_tokenizer.py`:",
        "",
        "```",
        tokenizer.strip(),
        "```",
        "",
    ]
    data = saved("bench_data.txt")
    if data:
        lines += ["## Data readers on 2 CPU cores", "",
                  "`.venv/bin/python benchmarks/bench_data.py --count 2000 --photo-count 0 --workers 0 --shard-samples 2000`:",
                  "", "```", data.strip(), "```", ""]
    bench = load("bench_gpu_h200.json")
    if bench:
        lines += gpu_section(bench)
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
