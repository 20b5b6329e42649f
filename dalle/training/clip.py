"""Training and evaluating the reranking CLIP (dalle/clip.py).

A plain loop: the batch of step ``s`` is drawn from ``(seed, s)`` alone (which
items, which of their captions), so a run resumed from a checkpoint ends with the
same weights as one never interrupted.  Each item contributes its image and one
of its captions picked at random; pairs of the batch that also match each other
(two items that both fit "a red circle") are passed to the loss as extra
positives so the contrast never pushes a correct caption away.

Files written under ``out_dir``: ``logs/clip.csv`` (one row per logged step),
``checkpoints/clip/step_*`` (for ``resume=True``) and the final model folder
``clip/`` (``config.json`` + ``model.safetensors``).

Several processes: under ``torchrun --nproc_per_node=N`` the same loop trains
data-parallel (:mod:`dalle.training.distributed`, DDP).  ``clip_batch`` is the
*global* batch.  Every rank draws the whole batch of step ``s`` (items, captions,
twins, the positives matrix: cheap metadata) and tokenises all of it, so the ids
are those of one process; it encodes only its contiguous slice of the images and
captions.  The slices' embeddings are gathered from every rank, with gradients
(:func:`gather_rows`), so the contrastive loss on every rank is over the whole
global batch -- every negative counts, as in one process -- and the loss curve
follows a one-process run with the same batch.  Rank 0 writes the log,
checkpoints (full tensors, loadable at any world size) and the export.

Validation: the last items of the data set (:func:`dalle.training.state.validation_split`,
the same items the dVAE and transformer stages hold out) never enter a batch.  Every
``eval_every`` steps rank 0 measures retrieval among pools of 16 items
(:func:`retrieval_at_1`) on them and on as many training items, logs both, and the
finished run writes a fit report (``logs/clip_fit.json``, :func:`diagnose_clip`).

Against memorising a small set of real pictures (a 15k-image set reached 98% R@1 on
training captions against 60% on held-out ones): ``train.clip_crop_scale`` gives each
training image a random square crop (:func:`augmented_image`; never a flip, since captions
say left and right), ``train.clip_weight_decay`` the AdamW decay of the weight matrices and
``clip.dropout`` dropout in both encoders.  The shapes preset leaves crops off (its captions
name regions and sizes); the presets for users' data turn all three on.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from dalle.clip import CLIP, contrastive_loss
from dalle.config import DalleConfig
from dalle.data.preprocess import derive_seed, eval_transform, make_generator, train_transform
from dalle.training import distributed as dd
from dalle.training.distributed import DistInfo
from dalle.training.state import (Checkpointer, CsvLog, Diagnosis, NonFiniteGuard, holdout, spread, step_generator,
                                  warmup_cosine, write_fit_report)

# ``loss``: the logged step's; ``mean_loss``: the mean over the steps since the previous row;
# ``val_``/``train_r_at_1``: retrieval among pools of POOL items (retrieval_at_1), on the
# validation items and on as many training items.
LOG_FIELDS = ["step", "loss", "lr", "logit_scale", "batch_acc", "seconds", "mean_loss", "val_r_at_1", "train_r_at_1"]
FINAL_LR_FRACTION = 0.1  # cosine decays to a tenth of the peak
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
SPEED_PROBE_STEPS = 10  # a ``minutes=`` run re-fits its schedule length every this many steps
EVAL_ITEMS = 64  # training items evaluated when nothing is held out
# Retrieval is measured among pools of this many items, whatever the split's size, so the
# figure (and chance, 1 in 16) means the same on 16 held-out items as on 512.
POOL = 16
AUGMENT_STREAM = 5  # mixes into the per-item seeds of the image crops

# Fit report thresholds (diagnose_clip).  Under twice chance, the reranker cannot tell a
# fitting image from the others: reranking with it is about as good as picking at random.
NEAR_CHANCE_FACTOR = 2.0
# Memorising: training captions find their image at least 20 points more often than unseen
# ones, and by more than twice the standard error of the difference (small splits are noisy).
MEMORISING_GAP = 0.2


class CaptionedItem(Protocol):
    image: Image.Image
    captions: list[str]


class HardNegativeSource(Protocol):
    """The hook a data set may implement to give training batches hard negatives.

    ``hard_negatives(items, captions, rng)`` returns ``(twins, twin_captions)``: items
    (``.image``, ``.captions``) that each contradict one of ``captions``, and the caption
    each brings to the batch.  It must draw only from ``rng`` (a run resumed from a
    checkpoint sees the same twins) and never return what the data set holds out.
    """

    def hard_negatives(self, items: Sequence[Any], captions: Sequence[str],
                       rng: np.random.Generator) -> tuple[Sequence[CaptionedItem], Sequence[str]]: ...


class TextEncoderLike(Protocol):
    def encode_batch(self, texts: Sequence[str], *, training: bool = ..., seed: int | None = ...) -> torch.Tensor: ...


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> float ``[3, size, size]`` in [0, 1]; no random crop (the shapes set's
    captions name regions and sizes a crop would falsify), centre-cropped if not square."""
    return eval_transform(image if image.mode == "RGB" else image.convert("RGB"), size)


def augmented_image(image: Image.Image, size: int, crop_scale: Sequence[float], seed: int, step: int,
                    index: int) -> torch.Tensor:
    """A training view of ``image``: a random square crop of ``crop_scale`` of its shorter side,
    resized to ``size`` (no flip: captions say left and right).  Drawn from ``(seed, step,
    index)`` alone, so a resumed run and every rank of a data-parallel one see the same view.
    ``crop_scale`` (1, 1) is :func:`image_to_tensor` itself."""
    if tuple(crop_scale) == (1.0, 1.0):
        return image_to_tensor(image, size)
    g = make_generator(seed, step, AUGMENT_STREAM, index)
    return train_transform(image if image.mode == "RGB" else image.convert("RGB"), size, crop_scale, g)


def true_captions(item: CaptionedItem) -> set[str]:
    """The captions known to fit ``item``: its own, and for a shapes item every caption
    the set's generator could write for its scene (an item lists only 3 to 5)."""
    scene = getattr(item, "scene", None)
    if scene is None:
        return set(item.captions)
    from dalle.data.shapes import all_captions

    return set(item.captions).union(all_captions(scene))


def caption_positives(captions: Sequence[str], items: Sequence[CaptionedItem]) -> torch.Tensor:
    """Bool ``[B, B]``: entry ``[j, i]`` is True when caption ``j`` is known to fit item ``i``
    (see :func:`true_captions`)."""
    own = [true_captions(item) for item in items]
    return torch.tensor([[c in own_i for own_i in own] for c in captions], dtype=torch.bool)


def draw_batch(dataset: Sequence[CaptionedItem], batch_size: int, seed: int, step: int,
               n_train: int | None = None) -> tuple[list[CaptionedItem], list[str]]:
    """The items and captions of step ``step``: a function of ``(seed, step)`` only.

    Items are drawn from the first ``n_train`` (default: all; the rest is the validation split).
    """
    g = step_generator(seed, step, stream=3)
    n = len(dataset) if n_train is None else n_train
    if n >= batch_size:
        indices = torch.randperm(n, generator=g)[:batch_size].tolist()
    else:  # a data set smaller than a batch: repeats are unavoidable (and marked positive)
        indices = torch.randint(n, (batch_size,), generator=g).tolist()
    items = [dataset[i] for i in indices]
    captions = []
    for item in items:
        if not item.captions:
            raise ValueError("a data set item has no caption; every image needs at least one caption")
        captions.append(item.captions[int(torch.randint(len(item.captions), (1,), generator=g))])
    return items, captions


def _optimizer(model: CLIP, lr: float, weight_decay: float = WEIGHT_DECAY) -> torch.optim.AdamW:
    # Decay matrices only; biases, norms and the temperature stay free.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    free = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": free, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def _warmup_steps(total: int) -> int:
    return max(1, min(200, total // 10))


# --- data parallelism: every negative of the global batch on every rank -------------------


def slice_bounds(total: int, info: DistInfo) -> tuple[int, int]:
    """``(start, stop)`` of this rank's contiguous rows of a global batch of ``total`` rows.

    Equal shares when ``total`` divides by the world size (as :func:`dalle.training.
    distributed.shard_bounds`); otherwise the shares differ by at most one row -- a
    batch with hard-negative twins is short of a twin now and then.
    """
    return total * info.rank // info.world_size, total * (info.rank + 1) // info.world_size


class _GatherRows(torch.autograd.Function):
    """All ranks' rows, concatenated in rank order, with a gradient.

    Forward: an all-gather (padded to the largest share, so shares may differ by a row).
    Backward: the gradient of the concatenation is *summed* over ranks (all-reduce) and
    each rank keeps its own rows.  That is the gradient of the sum of the ranks' losses
    with respect to this rank's rows.  Every rank computes the same loss ``L`` from the same
    gathered rows, so the sum is ``W * L`` and each rank's parameters get ``W`` times the
    gradient that flows through its own slice; DDP's average (divide by ``W``) of those
    is the gradient of ``L`` itself.  A parameter used identically on every rank outside
    the gathered rows (the temperature) gets the full ``dL/dp`` on each rank, which the
    average leaves unchanged.  So no loss scaling is needed.
    """

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, counts: tuple[int, ...], rank: int) -> torch.Tensor:  # type: ignore[override]
        ctx.counts, ctx.rank = counts, rank
        width = max(counts)
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()  # all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start:start + ctx.counts[ctx.rank]], None, None


def gather_rows(local: torch.Tensor, total: int, info: DistInfo) -> torch.Tensor:
    """The ``[total, ...]`` global batch from each rank's contiguous rows (:func:`slice_bounds`).

    Differentiable (see :class:`_GatherRows` for how the gradient is scaled); every rank
    must call it, in the same order.  On one process: ``local`` itself.
    """
    start, stop = slice_bounds(total, info)
    if local.shape[0] != stop - start:
        raise ValueError(f"rank {info.rank} holds {local.shape[0]} rows but its share of a global batch of {total} "
                         f"over {info.world_size} processes is {stop - start}")
    if not info.distributed:
        return local
    world = info.world_size
    counts = tuple(total * (r + 1) // world - total * r // world for r in range(world))
    return _GatherRows.apply(local, counts, info.rank)


class EmbedForward(nn.Module):
    """CLIP's encoders and temperature as one ``forward``, for DDP to wrap.

    DDP's gradient hooks are armed by the wrapped module's ``forward``; the loss needs
    the embeddings of every rank, so it is computed outside, on the gathered rows
    (:func:`global_batch_loss`).  Parameter names inside are ``model.*``; checkpoints are
    taken from the CLIP itself, so they keep the plain names.
    """

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, text_ids: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.encode_text(text_ids), self.model.encode_image(images), self.model.scale()


def global_batch_loss(
    forward: nn.Module, text_ids: torch.Tensor, images: torch.Tensor, positives: torch.Tensor, info: DistInfo
) -> torch.Tensor:
    """The contrastive loss of the whole global batch, the same value on every rank.

    ``forward``: an :class:`EmbedForward` (DDP-wrapped under torchrun); ``text_ids`` and
    ``images``: this rank's rows (:func:`slice_bounds`); ``positives``: the global
    ``[N, N]`` matrix.  Backpropagating it on every rank and letting DDP average gives
    the gradient of one process on the whole batch.
    """
    total = positives.shape[0]
    text, image, scale = forward(text_ids, images)
    return contrastive_loss(gather_rows(text, total, info), gather_rows(image, total, info), scale, positives)


@torch.no_grad()
def _batch_accuracy(model: CLIP, text_ids: torch.Tensor, images: torch.Tensor, positives: torch.Tensor,
                    info: DistInfo) -> torch.Tensor:
    """Fraction of the global batch's captions whose top image fits them (a collective under torchrun)."""
    total = positives.shape[0]
    text = gather_rows(model.encode_text(text_ids), total, info)
    image = gather_rows(model.encode_image(images), total, info)
    logits = model.scale() * text @ image.t()
    # A caption counts as right when its top image fits it (its own or an equal one).
    return positives.gather(1, logits.argmax(dim=1, keepdim=True)).float().mean()


# --- validation and the fit report ---------------------------------------------------------


@torch.no_grad()
def retrieval_at_1(model: CLIP, dataset: Sequence[CaptionedItem], indices: Sequence[int], tokenizer: TextEncoderLike,
                   pool: int = POOL, batch_size: int = 128) -> tuple[float, int]:
    """``(R@1, captions)``: how often a caption's best image, among a pool of ``pool`` items, fits it.

    ``indices`` are cut into consecutive pools of ``pool`` items (a remainder smaller than a
    pool is left out).  Each item's first caption ranks the images of its pool; it counts
    when the top image is its own or one the caption is known to fit (:func:`true_captions`:
    "a red circle" fits two images of red circles).  Chance is about ``1 / pool``.
    """
    usable = len(indices) - len(indices) % pool
    if usable == 0:
        raise ValueError(f"retrieval_at_1 needs at least one pool of {pool} items, got {len(indices)}")
    items = [dataset[i] for i in list(indices)[:usable]]
    captions = [item.captions[0] for item in items]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    size = model.config.image_size
    text, image = [], []
    try:
        for lo in range(0, usable, batch_size):
            pixels = torch.stack([image_to_tensor(item.image, size) for item in items[lo:lo + batch_size]])
            image.append(model.encode_image(pixels.to(device)).float().cpu())
            ids = tokenizer.encode_batch(captions[lo:lo + batch_size], training=False)
            text.append(model.encode_text(ids.to(device)).float().cpu())
    finally:
        model.train(was_training)
    text_all, image_all = torch.cat(text), torch.cat(image)
    hits = 0
    for lo in range(0, usable, pool):
        top = (text_all[lo:lo + pool] @ image_all[lo:lo + pool].t()).argmax(dim=1).tolist()
        fits = [true_captions(items[lo + j]) for j in range(pool)]
        hits += sum(captions[lo + q] in fits[j] for q, j in enumerate(top))
    return hits / usable, usable


def diagnose_clip(*, train_r1: float, val_r1: float | None, pool: int, captions: int) -> list[Diagnosis]:
    """What the final retrieval figures of a CLIP run say, in plain words (empty when all looks fine).

    ``train_r1`` / ``val_r1``: :func:`retrieval_at_1` among pools of ``pool`` items, each
    over ``captions`` captions, on training items and on the validation items (None when
    nothing was held out).  Thresholds: the module's constants.
    """
    found = []
    chance = 1.0 / pool
    shown, where = (val_r1, "validation") if val_r1 is not None else (train_r1, "training")
    if shown < NEAR_CHANCE_FACTOR * chance:
        found.append(Diagnosis("near_chance", f"CLIP near chance on {where} images: a caption's best image among "
                               f"{pool} fits it for {shown:.0%} of captions (chance {chance:.0%}), so reranking "
                               "with it is close to picking at random -- train longer, or check that the captions "
                               "describe their images"))
    if val_r1 is not None:
        noise = math.sqrt((train_r1 * (1 - train_r1) + val_r1 * (1 - val_r1)) / max(captions, 1))
        if train_r1 - val_r1 >= max(MEMORISING_GAP, 2 * noise):
            found.append(Diagnosis("memorising", f"CLIP memorising: a caption's best image among {pool} fits it for "
                                   f"{train_r1:.0%} of training captions but {val_r1:.0%} of unseen ones -- more data "
                                   "or fewer steps would help"))
    return found


def train_clip(
    dataset: Sequence[CaptionedItem],
    tokenizer: TextEncoderLike,
    out_dir: str | Path,
    config: DalleConfig,
    *,
    steps: int | None = None,
    minutes: float | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    log_every: int = 10,
    checkpoint_every: int = 250,
    hard_negatives: bool | None = None,
    eval_every: int = 250,
    val_items: int | None = None,
) -> Path:
    """Train a CLIP on ``dataset`` and save it to ``out_dir/clip``; returns that folder.

    ``steps`` is the length of the learning-rate schedule (default
    ``config.train.clip_steps``; a resumed run keeps its checkpoint's length
    unless ``steps`` is given).  ``minutes`` bounds this call's wall-clock time:
    the loop stops, checkpoints and saves when it runs out.  Given ``minutes``
    without ``steps``, the schedule length is fitted to the budget from the
    speed so far (re-fitted as it goes), so the cosine decay ends on time.

    ``hard_negatives`` (default: on when ``dataset`` offers twins, see
    :class:`HardNegativeSource`; the shapes set does, :mod:`dalle.data.shapes_twins`)
    gives items of the batch a twin: a near miss with a caption of its own, e.g. its
    scene with one attribute its caption names changed.  Twin and original are each
    other's hardest negatives in both directions of the loss: the image encoder must
    see the one attribute that differs and the text encoder must read it, e.g. tell
    "a red circle to the left of a blue square" from "a blue square to the left
    of a red circle".  The batch about doubles (``clip_batch`` originals + their twins).

    Validation: the last ``val_items`` items of ``dataset`` (default: the config's split,
    :func:`dalle.training.state.validation_split`) are held out of training; every
    ``eval_every`` steps and at the end, retrieval on them and on as many training items
    is logged, and the finished run writes its fit report (``logs/clip_fit.json``).

    Under ``torchrun`` every rank must call this; the run is data-parallel over the job
    (see the module docstring), ``clip_batch`` is the global batch and must divide by
    the number of processes, and ``device`` "cuda" becomes each rank's own GPU.
    """
    if len(dataset) < 2:
        raise ValueError(f"CLIP training needs at least 2 captioned images (contrast needs negatives), got {len(dataset)}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be a positive number, got {steps}")
    if minutes is not None and minutes <= 0:
        raise ValueError(f"minutes must be positive, got {minutes}")
    train = config.train
    seed = train.seed if seed is None else seed
    out_dir = Path(out_dir)
    deadline = None if minutes is None else time.monotonic() + 60.0 * minutes
    info = dd.init_distributed(device)
    device, main = info.device, info.is_main
    if train.clip_batch % info.world_size:
        raise ValueError(f"clip_batch={train.clip_batch} does not split evenly over {info.world_size} processes: "
                         f"use a batch size divisible by {info.world_size} (it is the global batch)")
    if eval_every < 1:
        raise ValueError(f"eval_every must be a positive number of steps, got {eval_every}")
    lo_scale, hi_scale = train.clip_crop_scale
    if not 0.0 < lo_scale <= hi_scale <= 1.0:
        raise ValueError(f"train.clip_crop_scale must be (min, max) with 0 < min <= max <= 1, got {train.clip_crop_scale}")
    twin_source = getattr(dataset, "hard_negatives", None) if hard_negatives is not False else None
    if hard_negatives and twin_source is None:
        raise ValueError("hard_negatives=True needs a data set that offers twins (a hard_negatives(items, captions, "
                         "rng) method, as the shapes set has)")
    n_train, val_indices = holdout(len(dataset), train, val_items, "clip", warn=main)
    if n_train < 2:
        raise ValueError(f"val_items={val_items} leaves {n_train} training item: CLIP needs at least 2 (contrast "
                         "needs negatives)")
    train_probe = spread(n_train, len(val_indices) or EVAL_ITEMS)  # as many training items as validation ones
    pool = min(POOL, len(val_indices) or len(train_probe))

    torch.manual_seed(seed)
    model = CLIP(config.clip).to(device).train()
    forward = dd.wrap_model(EmbedForward(model), info)  # itself on one process
    optimizer = _optimizer(model, train.clip_lr, train.clip_weight_decay)
    checkpointer = Checkpointer(out_dir / "checkpoints" / "clip")
    guard = NonFiniteGuard()

    start, total = 0, steps or train.clip_steps
    window_sum, window_count = 0.0, 0  # the losses of the steps since the last logged row
    fit_to_budget = minutes is not None and steps is None
    # Every rank reads the same checkpoint (full tensors, written at any world size).
    loaded = checkpointer.load_latest({"clip": model}, {"clip": optimizer}) if resume else None
    if loaded is not None:
        start, extra = loaded
        window_sum, window_count = extra.get("window_loss", (0.0, 0))
        if steps is None:
            total = int(extra.get("total_steps", total))
            fit_to_budget = False  # the schedule was fixed by the run that wrote the checkpoint
    log_path = out_dir / "logs" / "clip.csv"

    def save_checkpoint(step: int, wait: bool = True) -> None:
        if main:
            checkpointer.save(step, {"clip": model}, {"clip": optimizer},
                              {"total_steps": total, "seed": seed, "world_size": info.world_size,
                               "window_loss": [window_sum, window_count]})
        if wait:
            dd.barrier(info)

    last_fit: dict[str, Any] | None = None  # the newest evaluation (rank 0)

    def evaluate_fit(step: int) -> dict[str, Any]:
        """Retrieval among pools of ``pool`` items on the training probe and the validation items (rank 0)."""
        r1, captions = retrieval_at_1(model, dataset, train_probe, tokenizer, pool)
        entry: dict[str, Any] = {"step": step, "train_r_at_1": round(r1, 4), "val_r_at_1": None, "captions": captions}
        if val_indices:
            r1, captions = retrieval_at_1(model, dataset, val_indices, tokenizer, pool)
            entry.update(val_r_at_1=round(r1, 4), captions=captions)
        return entry

    size = config.clip.image_size
    step = start
    t_probe = time.monotonic()
    bar = tqdm(total=total, initial=start, desc="clip", unit="step", mininterval=1.0, disable=not main)
    log = CsvLog(log_path, LOG_FIELDS, start if loaded is not None else None) if main else None
    try:
        while step < total:
            if deadline is not None:
                out_of_time = time.monotonic() >= deadline
                if info.distributed:
                    out_of_time = dd.any_rank(out_of_time, info)  # every rank stops at the same step
                if out_of_time:
                    break
            t0 = time.monotonic()
            lr = warmup_cosine(step, total, _warmup_steps(total), train.clip_lr, train.clip_lr * FINAL_LR_FRACTION)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # The whole global batch's metadata on every rank; pixels of this rank's slice only.
            items, captions = draw_batch(dataset, train.clip_batch, seed, step, n_train)
            if twin_source is not None:
                twins, twin_captions = twin_source(items, captions, np.random.default_rng(derive_seed(seed, step, 2)))
                items, captions = items + list(twins), captions + list(twin_captions)
            lo, hi = slice_bounds(len(items), info)
            images = torch.stack([augmented_image(item.image, size, train.clip_crop_scale, seed, step, i)
                                  for i, item in enumerate(items[lo:hi], start=lo)]).to(device)
            # BPE dropout seeded from (seed, step) too, so a resumed run sees the same ids.  The
            # dropout draws run through the batch in order, so every rank encodes all captions
            # (cheap) and keeps its rows: the ids are those of one process.
            text_ids = tokenizer.encode_batch(captions, training=True, seed=derive_seed(seed, step, 1))[lo:hi].to(device)
            positives = caption_positives(captions, items).to(device)

            loss = global_batch_loss(forward, text_ids, images, positives, info)
            optimizer.zero_grad(set_to_none=True)
            # The loss, and after DDP's average the gradients, are equal on every rank: so is each decision.
            if guard.check(loss.detach()):
                window_sum += float(loss.detach())
                window_count += 1
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
                if guard.check(grad_norm):
                    optimizer.step()
            step += 1
            bar.update(1)

            evaluating = step % eval_every == 0 or step == total
            if step % log_every == 0 or evaluating:
                acc = _batch_accuracy(model, text_ids, images, positives, info)
                if main and evaluating:
                    last_fit = evaluate_fit(step)
                if log is not None:
                    scale = float(model.logit_scale.detach().exp())
                    row = {"step": step, "loss": f"{loss.item():.5f}", "lr": f"{lr:.3e}",
                           "logit_scale": f"{scale:.3f}", "batch_acc": f"{acc.item():.4f}",
                           "seconds": f"{time.monotonic() - t0:.4f}",
                           "mean_loss": f"{window_sum / window_count:.5f}" if window_count else ""}
                    if evaluating and last_fit is not None:
                        row["train_r_at_1"] = f"{last_fit['train_r_at_1']:.4f}"
                        if last_fit["val_r_at_1"] is not None:
                            row["val_r_at_1"] = f"{last_fit['val_r_at_1']:.4f}"
                    log.write(row)
                if evaluating:
                    dd.barrier(info)  # the other ranks wait for rank 0's evaluation
                window_sum, window_count = 0.0, 0
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc.item():.2f}")
            if step % checkpoint_every == 0 and step < total:
                save_checkpoint(step)
            if fit_to_budget and step - start >= SPEED_PROBE_STEPS and step % SPEED_PROBE_STEPS == 0:
                # Fit the schedule to the time left at the mean speed so far (re-fitted as
                # the speed drifts on a shared machine); earlier steps used the old length.
                # Rank 0's clock decides for all, so every rank keeps the same schedule.
                fitted = None
                if main:
                    per_step = (time.monotonic() - t_probe) / (step - start)
                    fitted = max(step + 1, step + int((deadline - time.monotonic()) / per_step))
                total = int(dd.broadcast_object(fitted, info))
                bar.total = total
    except KeyboardInterrupt:
        save_checkpoint(step, wait=False)  # the other ranks are being interrupted too
        raise
    finally:
        bar.close()
        if log is not None:
            log.close()
    save_checkpoint(step)
    model.eval()
    folder = out_dir / "clip"
    if main:
        model.save_pretrained(folder)
        if last_fit is None or last_fit["step"] != step:  # stopped by the clock after the last evaluation
            last_fit = evaluate_fit(step)
        _fit_report(out_dir, last_fit, n_train=n_train, n_val=len(val_indices), n_probe=len(train_probe), pool=pool)
    dd.barrier(info)
    # Replicas must agree bit for bit; a drift is a bug worth reporting loudly.
    dd.check_replicas_identical(model, info, "CLIP")
    return folder


def _fit_report(out_dir: Path, fit: dict[str, Any], *, n_train: int, n_val: int, n_probe: int, pool: int) -> Path:
    """Diagnose the run from its final evaluation; write ``logs/clip_fit.json`` and print it."""
    diagnoses = diagnose_clip(train_r1=fit["train_r_at_1"], val_r1=fit["val_r_at_1"], pool=pool,
                              captions=fit["captions"])
    among = f"a caption's best image among {pool} fits it"
    if fit["val_r_at_1"] is None:
        summary = (f"{among} for {fit['train_r_at_1']:.0%} of {n_probe} training captions at step {fit['step']} "
                   f"({n_train} training images; none held out for validation)")
    else:
        summary = (f"{among} for {fit['val_r_at_1']:.0%} of {n_val} validation captions and "
                   f"{fit['train_r_at_1']:.0%} of {n_probe} training ones at step {fit['step']} "
                   f"({n_train} training images)")
    figures = {"train_items": n_train, "val_items": n_val, "pool": pool, "chance": round(1 / pool, 4), **fit}
    return write_fit_report(out_dir, "clip", summary, figures, diagnoses)


@torch.no_grad()
def evaluate_clip(
    model: CLIP,
    dataset: Sequence[CaptionedItem],
    tokenizer: TextEncoderLike,
    n: int = 100,
    seed: int = 0,
    batch_size: int = 100,
) -> dict[str, Any]:
    """Text-to-image retrieval among ``n`` held-out pairs.

    ``n`` items are drawn from ``dataset`` (by ``seed``), one caption each; every
    caption ranks all ``n`` images by cosine similarity.

    * ``r_at_1``: fraction of captions whose own image ranks first.  In the
      shapes set two different images can both fit a caption (two pictures of
      "a red circle"), so even a perfect model scores below 1 here.
    * ``r_at_1_caption_consistent``: fraction whose top image *also fits* the
      caption, i.e. the caption is one of that image's own captions.  Captions
      are several phrasings of one scene, so this still misses some correct
      answers ("a red circle" is not listed for a small red circle in the top
      left whose captions all name its size or region), but it does not count
      a true match as a miss.
    * ``r_at_5``: own image among the top five.
    """
    if len(dataset) < 2:
        raise ValueError(f"evaluate_clip needs at least 2 items, got {len(dataset)}")
    n = min(n, len(dataset))
    g = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=g)[:n].tolist()
    items = [dataset[i] for i in indices]
    captions = [item.captions[int(torch.randint(len(item.captions), (1,), generator=g))] for item in items]

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    size = model.config.image_size
    text, image = [], []
    for lo in range(0, n, batch_size):
        chunk = items[lo:lo + batch_size]
        pixels = torch.stack([image_to_tensor(item.image, size) for item in chunk]).to(device)
        image.append(model.encode_image(pixels))
        text.append(model.encode_text(tokenizer.encode_batch(captions[lo:lo + batch_size], training=False).to(device)))
    model.train(was_training)

    similarity = torch.cat(text) @ torch.cat(image).t()  # [captions, images]
    ranking = similarity.argsort(dim=1, descending=True)
    own = torch.arange(n, device=ranking.device)
    top = ranking[:, 0].tolist()
    consistent = [captions[q] in items[top[q]].captions for q in range(n)]
    metrics: dict[str, Any] = {
        "r_at_1": float((ranking[:, 0] == own).float().mean()),
        "r_at_1_caption_consistent": float(np.mean(consistent)),
        "r_at_5": float((ranking[:, :5] == own[:, None]).any(dim=1).float().mean()),
        "n": n,
    }
    if all(getattr(item, "scene", None) is not None for item in items):
        from dalle.evaluation.shapes_judge import judge

        # Shapes set: the judge reads the top image's pixels and says whether it shows the caption.
        metrics["r_at_1_judged"] = float(np.mean([bool(judge(items[top[q]].image, captions[q])) for q in range(n)]))
    return metrics


# --- Hard negatives: does the reranker notice one wrong attribute? ----------------------


@torch.no_grad()
def evaluate_clip_hard_negatives(
    model: CLIP,
    dataset: Sequence[Any],
    tokenizer: TextEncoderLike,
    n: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """How often the reranker prefers the true image to one that differs in one attribute.

    For ``n`` shapes-set items (they need ``.scene``), one caption each: the true
    image is scored against every applicable one-attribute perturbation of its
    scene (see :func:`dalle.data.shapes_twins.perturb_scene`), rendered by the set's own renderer.

    * ``pairwise[what]``: fraction of (true, perturbed) pairs where the true image
      scores higher (0.5 is chance);
    * ``pairwise_all``: the same over all pairs;
    * ``top1_among_hard``: fraction of captions whose true image beats *all* its
      perturbations at once (chance is about 1 / (1 + number of perturbations)).
    """
    from dalle.data.shapes import render
    from dalle.data.shapes_twins import PERTURBATIONS, perturb_scene

    rng = np.random.default_rng(seed)
    indices = rng.choice(len(dataset), size=min(n, len(dataset)), replace=False)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    size = model.config.image_size
    wins: dict[str, list[bool]] = {what: [] for what in PERTURBATIONS}
    top1 = []
    for index in indices.tolist():
        item = dataset[index]
        if getattr(item, "scene", None) is None:
            raise ValueError("evaluate_clip_hard_negatives needs shapes-set items (with a .scene)")
        caption = item.captions[int(rng.integers(len(item.captions)))]
        negatives = [(what, perturb_scene(item.scene, caption, what, rng)) for what in PERTURBATIONS]
        negatives = [(what, scene) for what, scene in negatives if scene is not None]
        if not negatives:
            continue
        images = torch.stack([image_to_tensor(item.image, size)] +
                             [image_to_tensor(render(scene), size) for _, scene in negatives]).to(device)
        scores = model.score(tokenizer.encode_batch([caption], training=False).to(device), images)
        for k, (what, _) in enumerate(negatives, start=1):
            wins[what].append(bool(scores[0] > scores[k]))
        top1.append(bool(scores[0] > scores[1:].max()))
    model.train(was_training)
    every = [w for ws in wins.values() for w in ws]
    return {
        "pairwise": {what: float(np.mean(ws)) for what, ws in wins.items() if ws},
        "pairs": {what: len(ws) for what, ws in wins.items()},
        "pairwise_all": float(np.mean(every)) if every else float("nan"),
        "top1_among_hard": float(np.mean(top1)) if top1 else float("nan"),
        "n": len(top1),
    }
