"""``dalle eval --data DIR``: a model measured on the held-out split of a user's own data.

The held-out images are the ones every training stage held out: the data set's last items,
by the rule of the ``train`` section of the model folder's ``dalle.json``
(:func:`dalle.training.state.validation_split`).  Evaluated on another data set, that tail
is simply its last items.  The report (JSON keys; the README lists them too):

- ``dvae``: ``psnr`` (dB, pixels pooled) and ``ssim`` (mean over images and channels, 11x11
  Gaussian window) of the tokenised reconstructions; ``codebook_usage`` (share of the codes
  these images use); ``edge_retention`` and ``baseline_psnr``, the blur yardsticks of the
  training fit report (:func:`dalle.training.dvae.reconstruction_figures`).
- ``transformer``: ``bits_per_image_token`` on the held-out images (each with its first
  caption), and ``train_bits_per_image_token`` on as many training images spread over the
  rest: the gap between them is memorising.
- ``clip``: ``r_at_1``, text-to-image retrieval among ``pool`` (100, or all held-out images
  when fewer) held-out pairs.
- ``generated``: for ``captions`` held-out captions, ``candidates`` images each are sampled
  and reranked by the model's CLIP; ``r_precision`` is how often that CLIP ranks the true
  caption first for the top image among the caption and ``pool - 1`` other held-out
  captions, and ``real_r_precision`` the same for the real held-out image of that caption.
  Self-judged: the CLIP that picked the top image also scores it, which flatters generated
  images (the report says so in ``self_judged``/``note``).
- ``generated.copying``: each generated top image's distance to its nearest training image
  (RMS over 32x32 pixels in [0, 1]) against the same for the real held-out images, and the
  copy ratio (nearest distance over the mean of the next nine: near 0 for a copy of one
  training image, near 1 for an image that is merely simple), with the share of copies.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from dalle.pipeline import DallePipeline

COPY_SIDE = 32  # images compared for the copying check at this size (pixels in [0, 1])
COPY_NEIGHBOURS = 10  # the copy ratio compares the nearest training image with the next nine
COPY_RATIO = 0.5  # nearer than half the distance to the next nearest ones: a copy
CLIP_POOL = 100


def held_out_split(dataset: Any, model: str | Path | None) -> tuple[int, range, str]:
    """``(n_train, held_out_indices, how)``: the model's validation rule applied to ``dataset``."""
    from dalle.config import DalleConfig, TrainConfig, load_config
    from dalle.pipeline import bundled_model_dir
    from dalle.training.state import validation_split

    folder = Path(model) if model is not None else bundled_model_dir()
    config_path = folder / "dalle.json"
    train = load_config(DalleConfig, config_path).train if config_path.is_file() else TrainConfig()
    n_train, held = validation_split(len(dataset), train.val_fraction, train.val_min, train.val_max)
    where = str(config_path) if config_path.is_file() else "the default TrainConfig (the model has no dalle.json)"
    how = (f"the last {len(held)} of {len(dataset)} items, as every training stage holds them out "
           f"(val_fraction {train.val_fraction}, val_min {train.val_min}, val_max {train.val_max} from {where})")
    return n_train, held, how


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of ``[N, C, H, W]`` images in [0, 1], averaged over channels."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    window = min(window, x.shape[-1], x.shape[-2])
    t = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).to(x.dtype)
    channels = x.shape[1]
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, kernel, groups=channels)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return value.mean(dim=(1, 2, 3))


def _items(dataset: Any, indices: Sequence[int]) -> list[tuple[int, Any]]:
    """``(index, item)`` for the readable items of ``indices`` (a reader gives None for a broken image)."""
    out = []
    for i in indices:
        item = dataset[i]
        if item is not None and item.captions:
            out.append((i, item))
    return out


def _pixels(images: Sequence[Any], size: int) -> torch.Tensor:
    from dalle.data.preprocess import eval_transform

    return torch.stack([eval_transform(im if im.mode == "RGB" else im.convert("RGB"), size) for im in images])


@torch.inference_mode()
def evaluate_dvae_on(pipe: DallePipeline, images: torch.Tensor, batch: int = 64) -> dict[str, float]:
    from dalle.dvae import psnr_from_mse
    from dalle.training.dvae import edge_retention, grid_baseline, reconstruct

    recon, tokens = reconstruct(pipe.dvae, images, batch)
    recon = recon.clamp(0, 1)
    used = int(torch.unique(tokens).numel())
    return {
        "psnr": float(psnr_from_mse((recon - images).pow(2).mean())),
        "ssim": float(ssim(recon.double(), images.double()).mean()),
        "codebook_usage": used / pipe.dvae.codebook_size,
        "codes_used": used,
        "edge_retention": edge_retention(recon, images),
        "baseline_psnr": float(psnr_from_mse((grid_baseline(images, pipe.dvae.grid_size) - images).pow(2).mean())),
        "images": len(images),
    }


@torch.inference_mode()
def bits_per_image_token(pipe: DallePipeline, images: torch.Tensor, captions: Sequence[str], batch: int = 32) -> float:
    nats, count = 0.0, 0
    for lo in range(0, len(images), batch):
        tokens = pipe.dvae.encode(images[lo:lo + batch].to(pipe.device))
        text = pipe.tokenizer.encode_batch(list(captions[lo:lo + batch])).to(pipe.device)
        _, parts = pipe.transformer.loss(text, tokens)
        nats += float(parts["image_loss"]) * tokens.numel()
        count += tokens.numel()
    return nats / count / math.log(2)


@torch.inference_mode()
def _clip_embed_images(pipe: DallePipeline, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    size = pipe.clip.config.image_size
    out = []
    for lo in range(0, len(images), batch):
        chunk = images[lo:lo + batch]
        if chunk.shape[-1] != size:
            chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(pipe.clip.encode_image(chunk.to(pipe.device)).float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def _clip_embed_text(pipe: DallePipeline, captions: Sequence[str], batch: int = 128) -> torch.Tensor:
    out = []
    for lo in range(0, len(captions), batch):
        ids = pipe.tokenizer.encode_batch(list(captions[lo:lo + batch]), training=False).to(pipe.device)
        out.append(pipe.clip.encode_text(ids).float().cpu())
    return torch.cat(out)


def retrieval_r_at_1(text: torch.Tensor, image: torch.Tensor) -> float:
    """Share of captions (rows of ``text``) whose own image (same row of ``image``) ranks first."""
    top = (text @ image.t()).argmax(dim=1)
    return float((top == torch.arange(len(text))).float().mean())


def r_precision(image: torch.Tensor, text: torch.Tensor, own: Sequence[int], pool: int, seed: int) -> float:
    """Share of images whose own caption (``text[own[i]]``) ranks first among it and ``pool - 1``
    other captions drawn (by ``seed``) from the rest of ``text`` (AttnGAN's R-precision, R = 1)."""
    g = torch.Generator().manual_seed(seed)
    hits = 0
    for i, j in enumerate(own):
        others = torch.tensor([k for k in range(len(text)) if k != j])
        chosen = others[torch.randperm(len(others), generator=g)[: pool - 1]]
        candidates = torch.cat([torch.tensor([j]), chosen])
        hits += int((text[candidates] @ image[i]).argmax() == 0)
    return hits / max(len(own), 1)


def nearest_distances(queries: torch.Tensor, library: torch.Tensor, k: int = 1, batch: int = 256) -> torch.Tensor:
    """RMS pixel distances of each query image to its ``k`` nearest images of ``library`` (both
    ``[N, D]``), nearest first: ``[N]`` for ``k=1``, else ``[N, k]``."""
    lib_sq = library.pow(2).sum(dim=1)
    k = min(k, len(library))
    best = []
    for lo in range(0, len(queries), batch):
        q = queries[lo:lo + batch]
        d2 = q.pow(2).sum(dim=1, keepdim=True) + lib_sq[None] - 2 * q @ library.t()
        best.append(d2.clamp(min=0).topk(k, dim=1, largest=False).values)
    d = (torch.cat(best) / queries.shape[1]).sqrt()
    return d[:, 0] if k == 1 else d


def copy_ratio(distances: torch.Tensor) -> torch.Tensor:
    """Nearest distance over the mean of the next nearest ones (rows of ``[N, k]``, nearest first).

    Near 0 for a copy of one training image (much closer to it than to any other); near 1
    for an image merely simple or typical (a flat blob is about as close to many training
    images), which a plain nearest distance would mistake for a copy.
    """
    return distances[:, 0] / distances[:, 1:].mean(dim=1).clamp(min=1e-8)


def _small(images: torch.Tensor) -> torch.Tensor:
    return F.interpolate(images, size=(COPY_SIDE, COPY_SIDE), mode="area").flatten(1)


def _summary(values: torch.Tensor) -> dict[str, float]:
    return {"mean": float(values.mean()), "median": float(values.median()), "min": float(values.min())}


def evaluate_user_data(model: str | Path | None, data: str, *, captions: int = 32, candidates: int = 8,
                       device: str | None = None, seed: int = 0, progress: bool = True,
                       train_images: int | None = None, guidance: float = 1.0) -> dict[str, Any]:
    """The report of the module docstring for ``model`` on the held-out split of ``data``.

    ``captions``: held-out captions to generate for; ``candidates``: images sampled per
    caption before the CLIP picks the top one; ``train_images``: training images the copying
    check compares with (default all; fewer is faster on a large set); ``guidance``: the
    classifier-free guidance scale of the samples (1: none).
    """
    from dalle.train import open_training_data
    from dalle.training.state import spread

    started = time.time()
    dataset = open_training_data(data, "train", seed=seed)
    if not hasattr(dataset, "__len__"):
        raise ValueError(f"--data {data} is a stream; dalle eval --data needs random access to find the held-out "
                         "split: give a folder, a COCO captions file or local uncompressed .tar shards")
    n_train, held, how = held_out_split(dataset, model)
    if len(held) < 2:
        raise ValueError(f"--data {data} has {len(dataset)} items, too few to hold any out (about 20 are needed); "
                         "evaluate on a larger set")
    pipe = DallePipeline.from_pretrained(model, device=device)
    size = pipe.image_size
    held_items = _items(dataset, held)
    held_images = _pixels([item.image for _, item in held_items], size)
    held_captions = [item.captions[0] for _, item in held_items]
    probe = _items(dataset, spread(n_train, len(held_items)))
    probe_images = _pixels([item.image for _, item in probe], size)

    report: dict[str, Any] = {
        "data": {"path": str(data), "items": len(dataset), "train_items": n_train, "held_out_items": len(held_items),
                 "held_out": how},
        "dvae": evaluate_dvae_on(pipe, held_images),
        "transformer": {
            "bits_per_image_token": bits_per_image_token(pipe, held_images, held_captions),
            "train_bits_per_image_token": bits_per_image_token(
                pipe, probe_images, [item.captions[0] for _, item in probe]),
            "images": len(held_items),
        },
    }
    if pipe.clip is None:
        report["clip"] = {"r_at_1": float("nan"), "note": "the model has no CLIP"}
        report["generated"] = {"r_precision": float("nan"), "real_r_precision": float("nan"),
                               "note": "the model has no CLIP to rerank and judge with"}
    else:
        text_emb = _clip_embed_text(pipe, held_captions)
        image_emb = _clip_embed_images(pipe, held_images)
        pool = min(CLIP_POOL, len(held_items))
        report["clip"] = {"r_at_1": retrieval_r_at_1(text_emb[:pool], image_emb[:pool]), "pool": pool,
                          "chance": 1 / pool}
        report["generated"] = _generated(pipe, held_items, held_images, text_emb, image_emb, dataset, n_train,
                                         captions=captions, candidates=candidates, seed=seed, progress=progress,
                                         train_images=train_images, guidance=guidance)
    report["settings"] = {"model": str(model) if model else "bundled", "captions": captions,
                          "candidates": candidates, "guidance": guidance, "seed": seed, "device": str(pipe.device),
                          "seconds": round(time.time() - started, 1)}
    return report


def _generated(pipe: DallePipeline, held_items: list[tuple[int, Any]], held_images: torch.Tensor,
               text_emb: torch.Tensor, image_emb: torch.Tensor, dataset: Any, n_train: int, *, captions: int,
               candidates: int, seed: int, progress: bool, train_images: int | None,
               guidance: float = 1.0) -> dict[str, Any]:
    from dalle.training.state import spread

    chosen = spread(len(held_items), min(captions, len(held_items)))
    work: Any = chosen
    if progress:
        from tqdm.auto import tqdm

        work = tqdm(chosen, desc="eval: generating", unit="caption")
    tops = []
    for i in work:
        result = pipe(held_items[i][1].captions[0], candidates=candidates, keep=1, seed=seed + i, guidance=guidance)
        tops.append(result.images[0])
    generated = _pixels(tops, pipe.image_size)
    pool = min(CLIP_POOL, len(held_items))
    gen_emb = _clip_embed_images(pipe, generated)
    out: dict[str, Any] = {
        "r_precision": r_precision(gen_emb, text_emb, chosen, pool, seed),
        "real_r_precision": r_precision(image_emb[chosen], text_emb, chosen, pool, seed),
        "captions": len(chosen), "candidates": candidates, "pool": pool, "chance": 1 / pool,
        "self_judged": True,
        "note": ("R-precision: the share of images for which the model's own CLIP ranks the true caption first "
                 f"among it and {pool - 1} other held-out captions.  Self-judged: the same CLIP picked the top "
                 f"generated image among {candidates}, which flatters generated images against real ones."),
    }
    library_idx = spread(n_train, train_images) if train_images else range(n_train)
    library = []
    for lo in range(0, len(library_idx), 512):
        chunk = _items(dataset, list(library_idx)[lo:lo + 512])
        library.append(_small(_pixels([item.image for _, item in chunk], pipe.image_size)))
    library_t = torch.cat(library)
    gen_k = nearest_distances(_small(generated), library_t, k=COPY_NEIGHBOURS)
    real_k = nearest_distances(_small(held_images[chosen]), library_t, k=COPY_NEIGHBOURS)
    gen_d, real_d = gen_k[:, 0], real_k[:, 0]
    out["copying"] = {
        "generated_nearest_train_rms": _summary(gen_d),
        "real_nearest_train_rms": _summary(real_d),
        "generated_copy_ratio": _summary(copy_ratio(gen_k)) if gen_k.shape[1] > 1 else None,
        "real_copy_ratio": _summary(copy_ratio(real_k)) if real_k.shape[1] > 1 else None,
        "generated_copies": float((copy_ratio(gen_k) < COPY_RATIO).float().mean()) if gen_k.shape[1] > 1 else None,
        "real_copies": float((copy_ratio(real_k) < COPY_RATIO).float().mean()) if real_k.shape[1] > 1 else None,
        "train_images_compared": len(library_t),
        "note": (f"RMS pixel distance ({COPY_SIDE}x{COPY_SIDE}, pixels in [0, 1]) from each generated top image, and "
                 "from each real held-out image of the same captions, to its nearest training image.  A small "
                 "distance alone can mean a simple image (a flat blob is near many training images), so the copy "
                 f"ratio divides it by the mean distance to the next {COPY_NEIGHBOURS - 1} nearest: near 0 for a copy "
                 f"of one training image, near 1 otherwise; *_copies is the share under {COPY_RATIO}.  Real held-out "
                 "images give the level of near-duplicates the data itself has."),
    }
    return out


def format_user_report(report: dict[str, Any]) -> str:
    d, t, c, g = report["dvae"], report["transformer"], report["clip"], report["generated"]
    lines = [
        f"held out: {report['data']['held_out']}",
        f"dVAE        PSNR {d['psnr']:.2f} dB | SSIM {d['ssim']:.3f} | codebook used {d['codebook_usage']:.1%} | "
        f"edges kept {d['edge_retention']:.0%} (shrink-to-grid baseline {d['baseline_psnr']:.2f} dB)",
        f"transformer {t['bits_per_image_token']:.3f} bits per image token held out, "
        f"{t['train_bits_per_image_token']:.3f} on training images",
        f"CLIP        R@1 among {c.get('pool', CLIP_POOL)} held-out pairs: {c['r_at_1']:.1%}",
    ]
    if "pool" in g:
        cp = g["copying"]
        lines += [
            f"generated   R-precision {g['r_precision']:.1%} (top of {g['candidates']}) against "
            f"{g['real_r_precision']:.1%} for the real held-out images, {g['captions']} captions, among {g['pool']} "
            "(self-judged by the model's CLIP)",
            f"copying     nearest training image: generated {cp['generated_nearest_train_rms']['median']:.3f} "
            f"RMS (median), real held-out {cp['real_nearest_train_rms']['median']:.3f}; copies (nearest under "
            f"{COPY_RATIO} of the next ones): generated {cp['generated_copies'] or 0:.0%}, real {cp['real_copies'] or 0:.0%}",
        ]
    return "\n".join(lines)
