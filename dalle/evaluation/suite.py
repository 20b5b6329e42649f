"""``dalle eval``: the whole model measured on held-out shapes data.

Reports (keys of shared/INTERFACE.md):
- ``dvae``: reconstruction PSNR, fraction of the codebook used, and how often the
  shapes judge still accepts a reconstructed image with its own caption;
- ``transformer``: held-out loss in bits per image token;
- ``clip``: text-to-image R@1 among 100 held-out pairs;
- ``shapes``: judge pass rates per category for the CLIP top-1 of N candidates, for
  a random pick of the same candidates (the reranking gain is the difference), and
  for the real images (the upper bound).

Prompts are the first captions of test-split images.  The shapes set holds out
captions as well as images: every test scene shows a held-out colour-shape pair
(zero_shot) or describes a held-out description (``dalle.data.shapes.
HELD_OUT_DESCRIPTIONS``), so no prompt, nor any paraphrase of it, is a training caption.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from dalle.evaluation.shapes_judge import CATEGORIES, judge
from dalle.pipeline import DallePipeline, pil_to_tensor
from dalle.sampling import check_guidance

HELD_OUT_SPLIT = "test"


def _held_out(seed: int, size: int):
    from dalle.data.shapes import ShapesDataset

    return ShapesDataset(split=HELD_OUT_SPLIT, size=size, seed=seed)


def _images_tensor(samples, size: int, device) -> torch.Tensor:
    return torch.cat([pil_to_tensor(s.image, size) for s in samples]).to(device)


@torch.inference_mode()
def evaluate_dvae(pipe: DallePipeline, samples, batch: int = 64) -> dict[str, float]:
    """PSNR and codebook use of the tokenised reconstructions (as the training loop logs
    them), and how often the judge still accepts a reconstruction with its caption."""
    from dalle.dvae import code_statistics, psnr_from_mse
    from dalle.pipeline import tensor_to_pil
    from dalle.training.dvae import reconstruct

    images = _images_tensor(samples, pipe.image_size, "cpu")
    recon, tokens = reconstruct(pipe.dvae, images, batch)
    recon = recon.clamp(0, 1)
    _, usage = code_statistics(tokens, pipe.dvae.codebook_size)
    passed = sum(judge(image, sample.captions[0]).passed for sample, image in zip(samples, tensor_to_pil(recon)))
    return {
        "psnr": float(psnr_from_mse((recon - images).pow(2).mean())),
        "codebook_usage": float(usage),
        "recon_pass_rate": passed / len(samples),
    }


@torch.inference_mode()
def evaluate_transformer(pipe: DallePipeline, samples, batch: int = 64) -> dict[str, float]:
    nats, count = 0.0, 0
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        tokens = pipe.dvae.encode(_images_tensor(chunk, pipe.image_size, pipe.device))
        text = pipe.tokenizer.encode_batch([s.captions[0] for s in chunk]).to(pipe.device)
        _, parts = pipe.transformer.loss(text, tokens)
        nats += float(parts["image_loss"]) * tokens.numel()
        count += tokens.numel()
    return {"bits_per_image_token": nats / count / math.log(2)}


@torch.inference_mode()
def evaluate_clip(pipe: DallePipeline, samples, seed: int = 0) -> dict[str, float]:
    """Text-to-image retrieval among 100 held-out pairs (see :func:`dalle.training.clip.evaluate_clip`)."""
    if pipe.clip is None:
        return {"r_at_1": float("nan")}
    from dalle.training.clip import evaluate_clip as clip_retrieval

    # A converted OpenAI CLIP reads captions with its own tokenizer.
    tokenizer = getattr(pipe.clip, "tokenizer", None) or pipe.tokenizer
    return clip_retrieval(pipe.clip, samples, tokenizer, n=100, seed=seed)


def pick_prompts(dataset, per_category: int) -> dict[str, list[Any]]:
    """The first ``per_category`` held-out samples of each category (deterministic)."""
    picked: dict[str, list[Any]] = {c: [] for c in CATEGORIES}
    for i in range(len(dataset)):
        sample = dataset[i]
        bucket = picked[sample.scene.category]
        if len(bucket) < per_category:
            bucket.append(sample)
        if all(len(b) >= per_category for b in picked.values()):
            break
    return picked


def evaluate_generation(pipe: DallePipeline, prompts: dict[str, list[Any]], candidates: int, seed: int,
                        progress: bool = True, guidance: float = 1.0) -> dict[str, dict[str, float]]:
    rng = random.Random(seed)
    top1: dict[str, list[bool]] = defaultdict(list)
    random_pick: dict[str, list[bool]] = defaultdict(list)
    real: dict[str, list[bool]] = defaultdict(list)
    work = [(c, s) for c, samples in prompts.items() for s in samples]
    if progress:
        from tqdm.auto import tqdm

        work = tqdm(work, desc="eval: generating", unit="prompt")
    for i, (category, sample) in enumerate(work):
        caption = sample.captions[0]
        result = pipe(caption, candidates=candidates, keep=candidates, seed=seed + i, guidance=guidance)
        top1[category].append(judge(result.images[0], caption).passed)
        random_pick[category].append(judge(result.images[rng.randrange(candidates)], caption).passed)
        real[category].append(judge(sample.image, caption).passed)

    def rates(table: dict[str, list[bool]]) -> dict[str, float]:
        out = {c: sum(v) / len(v) for c, v in table.items() if v}
        every = [v for values in table.values() for v in values]
        out["overall"] = sum(every) / len(every) if every else float("nan")
        return out

    out = {"reranked_top1": rates(top1), "random_pick": rates(random_pick), "real_images": rates(real)}
    return out


def evaluate_model(model: str | Path | None = None, *, prompts_per_category: int = 20, candidates: int = 32,
                   device: str | None = None, seed: int = 0, progress: bool = True, held_out_size: int = 512,
                   guidance: float = 1.0) -> dict:
    """The whole report; ``guidance`` is the classifier-free guidance scale of the generated candidates."""
    started = time.time()
    pipe = DallePipeline.from_pretrained(model, device=device)
    check_guidance(pipe.transformer, guidance)  # refuse before any work
    dataset = _held_out(seed, 100_000)
    samples = [dataset[i] for i in range(held_out_size)]
    report: dict[str, Any] = {
        "dvae": evaluate_dvae(pipe, samples),
        "transformer": evaluate_transformer(pipe, samples),
        "clip": evaluate_clip(pipe, samples, seed),
    }
    generating = time.time()
    report["shapes"] = evaluate_generation(pipe, pick_prompts(dataset, prompts_per_category), candidates, seed, progress,
                                           guidance)
    generation_seconds = time.time() - generating
    shapes = report["shapes"]
    report["reranking_gain"] = shapes["reranked_top1"]["overall"] - shapes["random_pick"]["overall"]
    report["settings"] = {"model": str(model) if model else "bundled", "prompts_per_category": prompts_per_category,
                          "candidates": candidates, "seed": seed, "held_out_split": HELD_OUT_SPLIT,
                          "held_out": "images (test split) and captions (held-out pairs and descriptions)",
                          "guidance": guidance, "generation_seconds": round(generation_seconds, 1),
                          "seconds": round(time.time() - started, 1)}
    return report


def format_report(report: dict) -> str:
    d, t, c, s = report["dvae"], report["transformer"], report["clip"], report["shapes"]
    lines = [
        f"dVAE        PSNR {d['psnr']:.2f} dB | codebook used {d['codebook_usage']:.1%} | recon pass {d['recon_pass_rate']:.1%}",
        f"transformer {t['bits_per_image_token']:.3f} bits per image token (held out)",
        f"CLIP        R@1 among 100: {c['r_at_1']:.1%}",
        "",
        f"{'category':<15}{'reranked top-1':>16}{'random pick':>14}{'real images':>14}",
    ]
    for category in list(CATEGORIES) + ["overall"]:
        row = [s[k].get(category, float("nan")) for k in ("reranked_top1", "random_pick", "real_images")]
        lines.append(f"{category:<15}" + "".join(f"{v:>14.1%}  " for v in row))
    lines.append(f"reranking gain: {report['reranking_gain']:+.1%}")
    return "\n".join(lines)
