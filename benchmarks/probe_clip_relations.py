"""Probe: does a larger share of relation twins late in training teach CLIP relations?

Starts from a trained CLIP (default: the bundled model's) and continues training it for
``--minutes`` per arm on the shapes train split with hard-negative twins (the split's
rule applies: no held-out pair, description or other split's image), once per arm of
twin weights; then measures, on val-split items, how often the true image beats each
one-attribute perturbation of its scene (:func:`dalle.training.clip.evaluate_clip_hard_negatives`;
"relation": the two objects swapped, 0.5 is chance).  The arms differ only in the twins'
weights, so the difference between them is the effect of the share of relation twins.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_clip_relations.py --minutes 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dalle.clip import CLIP, contrastive_loss
from dalle.data.preprocess import derive_seed
from dalle.data.shapes import ShapesDataset, belongs_to
from dalle.data.shapes_twins import TWIN_WEIGHTS, hard_negative_twins
from dalle.pipeline import bundled_model_dir
from dalle.tokenizer import TextTokenizer
from dalle.training.clip import caption_positives, draw_batch, evaluate_clip_hard_negatives, image_to_tensor

ARMS = {
    "default": dict(TWIN_WEIGHTS),
    "relation_x4": {**TWIN_WEIGHTS, "relation": 4.0},
}


def continue_training(clip: CLIP, tokenizer: TextTokenizer, weights: dict[str, float], minutes: float, batch: int,
                      lr: float, seed: int) -> int:
    """Train ``clip`` in place for ``minutes`` with twins drawn under ``weights``; returns the steps run."""
    data = ShapesDataset("train", 50_000, seed=0)
    clip.train()
    optimizer = torch.optim.AdamW(clip.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    size = clip.config.image_size
    deadline = time.monotonic() + 60 * minutes
    step = 0
    while time.monotonic() < deadline:
        items, captions = draw_batch(data, batch, seed, step)
        rng = np.random.default_rng(derive_seed(seed, step, 2))
        twins, twin_captions = hard_negative_twins(items, captions, rng, accept=lambda s: belongs_to(s, "train"),
                                                   weights=weights)
        items, captions = items + twins, captions + twin_captions
        images = torch.stack([image_to_tensor(item.image, size) for item in items])
        ids = tokenizer.encode_batch(captions, training=True, seed=derive_seed(seed, step, 1))
        loss = contrastive_loss(clip.encode_text(ids), clip.encode_image(images), clip.scale(),
                                caption_positives(captions, items))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        optimizer.step()
        step += 1
    clip.eval()
    return step


@torch.no_grad()
def twin_similarity(clip: CLIP, tokenizer: TextTokenizer, n: int) -> dict[str, dict[str, float]]:
    """Mean cosine similarity of an item's embeddings to its twin's, per perturbation, for the
    caption (the item's plainest against the twin's) and for the image.  Near 1: that encoder
    hardly tells the two apart, so it is where the perturbation is lost."""
    from dalle.data.shapes import all_captions, render
    from dalle.data.shapes_twins import PERTURBATIONS, perturb_scene

    data = ShapesDataset("val", 4000, seed=0)
    rng = np.random.default_rng(2)
    sims: dict[str, dict[str, list[float]]] = {what: {"text": [], "image": []} for what in PERTURBATIONS}
    size = clip.config.image_size
    for i in range(min(n, len(data))):
        item = data[i]
        caption = item.captions[0]
        for what in PERTURBATIONS:
            scene = perturb_scene(item.scene, caption, what, rng)
            if scene is None:
                continue
            ids = tokenizer.encode_batch([caption, all_captions(scene)[0]], training=False)
            text = clip.encode_text(ids)
            image = clip.encode_image(torch.stack([image_to_tensor(item.image, size),
                                                   image_to_tensor(render(scene), size)]))
            sims[what]["text"].append(float(text[0] @ text[1]))
            sims[what]["image"].append(float(image[0] @ image[1]))
    return {what: {k: round(float(np.mean(v)), 4) for k, v in d.items()} for what, d in sims.items() if d["text"]}


def probe(clip: CLIP, tokenizer: TextTokenizer, n: int) -> dict:
    result = evaluate_clip_hard_negatives(clip, ShapesDataset("val", 4000, seed=0), tokenizer, n=n, seed=1)
    return {"pairwise": {k: round(v, 4) for k, v in result["pairwise"].items()}, "pairs": result["pairs"],
            "top1_among_hard": round(result["top1_among_hard"], 4),
            "twin_cosine": twin_similarity(clip, tokenizer, min(n, 400))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model folder with clip/ and tokenizer/ (default: bundled)")
    parser.add_argument("--minutes", type=float, default=5.0, help="training minutes per arm")
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--batch", type=int, default=64, help="items a step (plus their twins)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--n", type=int, default=1000, help="val items probed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.model or bundled_model_dir()
    tokenizer = TextTokenizer.from_pretrained(folder / "tokenizer")
    report = {"settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                           "model": str(folder)}, "arms": {}}
    start = CLIP.from_pretrained(folder / "clip").float().eval()
    report["arms"]["start"] = probe(start, tokenizer, args.n)
    print("start", json.dumps(report["arms"]["start"]), flush=True)
    for arm in args.arms:
        torch.manual_seed(args.seed)
        clip = CLIP.from_pretrained(folder / "clip").float()
        steps = continue_training(clip, tokenizer, ARMS[arm], args.minutes, args.batch, args.lr, args.seed)
        report["arms"][arm] = {"steps": steps, "weights": ARMS[arm], **probe(clip, tokenizer, args.n)}
        print(arm, json.dumps(report["arms"][arm]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
