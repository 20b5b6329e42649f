"""Training the DALL-E transformer on cached image tokens: one plain loop, read top to bottom.

Each step draws ``transformer_batch`` items of the token cache, one caption of each
(picked at random, as the paper does with MS-COCO's several captions), encodes the
captions with BPE dropout, and minimises the weighted text + image cross-entropy
(:meth:`DalleTransformer.loss`).

Optimisation follows the paper's appendix B.2 where it scales down:

* AdamW, betas (0.9, 0.96), eps 1e-8, weight decay 4.5e-2 applied to the weight
  matrices of the linear layers only (attention, MLP, output heads).  Biases, norm
  gains and the embedding / position tables are not decayed: a decayed embedding
  row of a rare token shrinks every step but is only pushed back when that token
  appears, which biases rare tokens toward zero.
* gradients clipped to norm 4; linear warm-up then cosine decay of the learning rate;
* an exponential moving average of the weights, which is what gets exported;
* bf16 autocast where the hardware does bf16 natively (CUDA, and CPUs with
  AVX512-BF16/AMX, where it trains ~1.4-1.6x faster than fp32 here); weights, the
  residual stream and the losses stay fp32.  On CUDA AdamW runs fused (one kernel
  for all parameters) and ``compile=True`` compiles each block with ``torch.compile``.

Several processes: under ``torchrun --nproc_per_node=N`` the same loop trains
data-parallel (:mod:`dalle.training.distributed`), with ``strategy="ddp"`` (replicated
weights) or ``"fsdp"`` (sharded weights).  The batch size is the *global* batch: every
rank draws the same batch of step ``s`` and trains on its contiguous slice, and the loss
of each slice is scaled so the averaged gradients are exactly those of the whole batch --
so the loss curve matches a one-process run with the same batch.  Rank 0 writes the
checkpoints (full tensors, loadable at any world size), logs, samples and export.

Exact resume: the batch (items, captions, BPE dropout) of step ``s`` is a function of
``(seed, s)`` only and the checkpoint holds weights, optimizer, weight average and
random states, so an interrupted run that is resumed ends bitwise identical (on the
CPU) to one that was never interrupted.  ``minutes`` is turned into a step count
before the first step by timing a few steps on a throw-away copy of the model, as the
dVAE loop does, and is also a hard deadline for the whole run, resumes included.

Validation: the last items of the token cache (the same images the dVAE and CLIP stages
hold out, :func:`dalle.training.state.validation_split`) never enter a batch.  Every
``sample_every`` steps the weight average's bits per image token are measured on them and
on as many training items, logged side by side, and at the end of the run turned into a
fit report (``logs/transformer_fit.json``, :func:`diagnose_transformer`) that says in
plain words when the model memorises its training images instead of learning.

Early stopping: the validation loss decides the end of a run and the exported weights.
Each evaluation that lowers the validation bits per image token saves the weight average
to ``checkpoints/transformer_best``; once ``train.transformer_patience`` evaluations in a row
(every ``train.transformer_eval_every`` steps) have not, the run stops, and whenever it ends
the export is the best evaluated weights, not the last ones (the fit report names the step).
``transformer_patience=0`` never stops early but still exports the best weights.  The best
figure, its step and the count of evaluations since are in every checkpoint, so a resumed run
stops and exports exactly as one never interrupted.  With nothing held out there is no
validation loss: the run goes to its end and exports its last weights.
"""

from __future__ import annotations

import copy
import csv
import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw

from torch import nn

from dalle.config import DalleConfig
from dalle.data.preprocess import derive_seed, make_generator
from dalle.sampling import generate_images_tokens, native_bf16
from dalle.training import distributed as dd
from dalle.training.distributed import DistInfo
from dalle.training.state import (EMA, Checkpointer, CsvLog, Diagnosis, NonFiniteGuard, budget_deadline, format_count,
                                  holdout, resumed_progress, spread, steps_in_budget, time_per_step, warmup_cosine,
                                  write_fit_report)
from dalle.training.tensorboard import log_image
from dalle.transformer import DalleTransformer

ADAM_BETAS = (0.9, 0.96)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 4.5e-2
GRAD_CLIP = 4.0
FINAL_LR_FRACTION = 0.1  # cosine decays to this fraction of the peak learning rate
CHECKPOINT_EVERY = 500
DATA_STREAM = 11  # mixes into the per-step seeds so this loop's draws differ from other loops'
# ``loss``: the logged step's; ``mean_loss``: the mean over the steps since the previous row.
# ``val_``/``train_bits_per_image_token``: the weight average on the validation items and on as
# many training items; ``eval_bits_per_image_token`` repeats the validation figure for older
# readers (empty when nothing is held out: it is never a training figure).
CSV_FIELDS = ["step", "loss", "text_loss", "image_loss", "grad_norm", "lr", "tokens_per_s", "seconds",
              "eval_bits_per_image_token", "mean_loss", "val_bits_per_image_token",
              "train_bits_per_image_token"]  # fmt: skip
EVAL_ITEMS = 64  # training items evaluated when nothing is held out

# Fit report thresholds (diagnose_transformer).  On one data distribution a model that
# generalises costs about as many bits on unseen images as on its training images (a few
# percent apart); 30% more, and at least 0.2 bits, means much of what it learned is specific
# to the training images.  The evaluations reuse the same items, so a rise of 10% (and at
# least 0.1 bits) from the best validation figure is the model getting worse, not noise.
MEMORISING_RATIO = 1.3
MEMORISING_GAP_BITS = 0.2
RISING_RATIO = 1.1
RISING_GAP_BITS = 0.1
# A transformer stores at most about 2 bits per parameter (Allen-Zhu & Li 2024, "Physics of
# language models 3.3"); ``log2(image_vocab)`` bits per image token bound what the training
# images hold.  Where the first exceeds the second, the model can learn every image by heart.
CAPACITY_BITS_PER_PARAMETER = 2.0
# Above 90% of a uniform guess's bits even on the training images: it has barely started.
UNTRAINED_FRACTION = 0.9


# --- batches -----------------------------------------------------------------------------


def batch_for_step(
    dataset: Any, tokenizer: Any, seed: int, step: int, batch_size: int, info: DistInfo | None = None,
    n_train: int | None = None, null_fraction: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text ids ``[B, text_len]`` and image tokens ``[B, g, g]`` of step ``step``: a function of ``(seed, step)``.

    ``dataset[i]`` is ``(LongTensor[g, g], list[str])`` (a :class:`TokenCache` or any
    sequence of such pairs); one caption per item is picked at random.  Items are drawn
    from the first ``n_train`` (default: all; the rest is the validation split).  With ``info``
    (several processes) ``batch_size`` is the global batch and this rank's contiguous
    slice of it is returned; only the slice is read and encoded.  Each item's caption
    and BPE dropout are drawn from ``(seed, step, its place in the global batch)``, so
    the slices of all ranks put together are exactly the one-process batch.

    ``null_fraction``: each item's caption is replaced by the null caption (the empty
    caption: every position its padding token) with this probability, drawn from the same
    ``(seed, step, place)``, for classifier-free guidance (``TransformerConfig.null_caption_fraction``).
    """
    g = make_generator(seed, step, DATA_STREAM)
    indices = torch.randint(len(dataset) if n_train is None else n_train, (batch_size,), generator=g).tolist()
    places = range(batch_size) if info is None else dd.shard_batch_indices(range(batch_size), info)
    local = [indices[p] for p in places]
    if hasattr(dataset, "batch"):  # TokenCache: one read for the whole batch
        images, caption_lists = dataset.batch(local)
    else:
        items = [dataset[i] for i in local]
        images = torch.stack([torch.as_tensor(tokens) for tokens, _ in items])
        caption_lists = [captions for _, captions in items]
    rows = []
    for place, i, caps in zip(places, local, caption_lists):
        if not caps:
            raise ValueError(f"data set item {i} has no caption; every image needs at least one")
        caption = caps[derive_seed(seed, step, DATA_STREAM, place, 0) % len(caps)]
        if null_fraction > 0 and derive_seed(seed, step, DATA_STREAM, place, 2) / 2**63 < null_fraction:
            caption = ""  # the null caption
        rows.append(tokenizer.encode_batch([caption], training=True,
                                           seed=derive_seed(seed, step, DATA_STREAM, place, 1)))
    return torch.cat(rows), images.long()


def _check_data(dataset: Any, tokenizer: Any, config: DalleConfig) -> None:
    tcfg = config.transformer
    if len(dataset) == 0:
        raise ValueError("the transformer's training set is empty; build the token cache first")
    tokens, captions = dataset[0]
    g = tcfg.image_grid
    if tuple(tokens.shape) != (g, g):
        raise ValueError(f"data set tokens are {tuple(tokens.shape)} but the transformer expects a {g}x{g} grid; "
                         "rebuild the token cache with this model's dVAE")
    if getattr(tokenizer, "text_len", tcfg.text_len) != tcfg.text_len:
        raise ValueError(f"tokenizer.text_len={tokenizer.text_len} but transformer.text_len={tcfg.text_len}")
    total = getattr(tokenizer, "total_vocab", tcfg.text_vocab)
    if total != tcfg.text_vocab:
        raise ValueError(f"the tokenizer has {total} ids but transformer.text_vocab={tcfg.text_vocab}")


# --- optimisation ------------------------------------------------------------------------


def make_optimizer(model: nn.Module, lr: float, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on linear-layer matrices only (see the module docstring).

    ``fused`` (default: on CUDA, for unsharded parameters) updates all parameters in one
    kernel; the CPU keeps PyTorch's default (multi-tensor) implementation.
    """
    decay, free = [], []
    for name, p in model.named_parameters():
        is_matrix = p.dim() >= 2 and not name.startswith(("text_embedding.", "text_position.", "image_embedding.",
                                                          "image_row.", "image_column."))
        (decay if is_matrix else free).append(p)
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": free, "weight_decay": 0.0}]
    params = decay + free
    if fused is None:
        fused = bool(params) and all(p.is_cuda for p in params) and not dd.is_sharded(model)
    return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, **({"fused": True} if fused else {}))


def warmup_steps(configured: int, total: int) -> int:
    """The configured warm-up, shortened for runs too short to spend it (at most a fifth of the run)."""
    return max(1, min(configured, total // 5))


def autocast_context(device: torch.device, enabled: bool | None = None) -> Any:
    """bf16 autocast where the hardware does bf16 natively (``enabled=None``), else a no-op."""
    if enabled is None:
        enabled = native_bf16(device)
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


class LossForward(nn.Module):
    """The transformer's loss as a ``forward``, for DDP / FSDP to wrap.

    Their gradient hooks are armed by the wrapped module's ``forward``; calling
    ``model.loss`` directly would skip them.  Parameter names inside are ``model.*``;
    checkpoints are taken from the transformer itself, so they keep the plain names.
    """

    def __init__(self, model: DalleTransformer):
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor, images: torch.Tensor, text_tokens: torch.Tensor,
                image_tokens: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.model.loss(text, images, text_tokens=text_tokens, image_tokens=image_tokens)


def train_step(
    model: DalleTransformer, text: torch.Tensor, images: torch.Tensor, grad_accum: int, autocast: Any,
    *, wrapped: nn.Module | None = None, info: DistInfo | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward over ``grad_accum`` micro-batches of this rank's slice; returns the loss and parts.

    Every micro-batch's loss is normalised by the counts of the *global* batch (all
    micro-batches of all ranks), so the returned loss, summed over ranks, is the whole
    batch's loss, and the gradients averaged over ranks are its gradients.  ``wrapped``:
    the DDP/FSDP module (:func:`dalle.training.distributed.wrap_model` of a
    :class:`LossForward`) through which a distributed step must run; ``info``: the job.
    The returned values are this rank's share; :func:`reduce_losses` adds up the ranks'.
    """
    world = 1 if info is None else info.world_size
    micro = text.shape[0] // grad_accum
    # Divisors of the whole step: real text targets of the global batch, and its image tokens.
    text_tokens = (text[:, 1:] < model.pad_start).sum().to(torch.float32)
    if info is not None:
        text_tokens = dd.all_reduce_sum(text_tokens, info)
    text_tokens = text_tokens.clamp(min=1)
    image_tokens = float(images[0].numel() * text.shape[0] * world)
    total = torch.zeros((), device=text.device)
    parts = {"text_loss": torch.zeros((), device=text.device), "image_loss": torch.zeros((), device=text.device)}
    for i in range(grad_accum):
        sl = slice(i * micro, (i + 1) * micro)
        with dd.gradient_sync(wrapped, i == grad_accum - 1) if wrapped is not None else nullcontext():
            with autocast:
                if wrapped is not None:
                    loss, p = wrapped(text[sl], images[sl], text_tokens, image_tokens)
                else:
                    loss, p = model.loss(text[sl], images[sl], text_tokens=text_tokens, image_tokens=image_tokens)
            # The ranks' gradients are averaged: scale by the world size to get their sum.
            (loss * world if world > 1 else loss).backward()
        total += loss.detach()
        for k in parts:
            parts[k] += p[k]
    return total, parts


def reduce_losses(loss: torch.Tensor, parts: dict[str, torch.Tensor], info: DistInfo
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole batch's loss and parts from each rank's share (one all-reduce; identity on one process)."""
    if not info.distributed:
        return loss, parts
    packed = dd.all_reduce_sum(torch.stack([loss, parts["text_loss"], parts["image_loss"]]).float(), info)
    return packed[0], {"text_loss": packed[1], "image_loss": packed[2]}


# --- evaluation and samples ---------------------------------------------------------------


@torch.no_grad()
def evaluate_transformer(
    model: DalleTransformer, dataset: Any, tokenizer: Any, n: int = 256, batch: int = 64,
    indices: Sequence[int] | None = None,
) -> dict[str, float]:
    """Likelihood of the first ``n`` items (or of ``indices``), each with its first caption (no BPE dropout).

    Returns ``bits_per_image_token`` (the image cross-entropy in bits, averaged over all
    image tokens) and ``bits_per_text_token`` (over the non-padding text targets).
    """
    chosen = list(range(min(n, len(dataset)))) if indices is None else list(indices)
    n = len(chosen)
    if n == 0:
        raise ValueError("evaluate_transformer needs a non-empty data set")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    image_nats = text_nats = 0.0
    image_count = text_count = 0
    try:
        for start in range(0, n, batch):
            items = [dataset[i] for i in chosen[start:start + batch]]
            images = torch.stack([torch.as_tensor(t) for t, _ in items]).long().to(device)
            text = tokenizer.encode_batch([caps[0] for _, caps in items], training=False).to(device)
            text_logits, image_logits = model(text, images)
            image_nats += float(torch.nn.functional.cross_entropy(
                image_logits.flatten(0, 1).float(), images.flatten(), reduction="sum"))
            image_count += images.numel()
            targets = text[:, 1:]
            real = targets < model.pad_start
            text_nats += float(torch.nn.functional.cross_entropy(
                text_logits[real].float(), targets[real], reduction="sum")) if real.any() else 0.0
            text_count += int(real.sum())
    finally:
        model.train(was_training)
    return {
        "bits_per_image_token": image_nats / image_count / math.log(2),
        "bits_per_text_token": text_nats / max(text_count, 1) / math.log(2),
    }


# --- fit report ----------------------------------------------------------------------------


def diagnose_transformer(history: Sequence[dict[str, Any]], *, train_items: int, parameters: int, image_len: int,
                         image_vocab: int) -> list[Diagnosis]:
    """What the evaluations of a run say about its fit, in plain words (empty when all looks fine).

    ``history``: the evaluations in step order, each ``{"step", "train", "val"}`` -- bits per
    image token of the weight average on training items and on the validation items
    (``val`` None when nothing was held out).  ``train_items``: the training part's size;
    ``parameters``, ``image_len`` (tokens an image), ``image_vocab``: the model's.  The
    thresholds are the module's constants (their comments say why).
    """
    if not history:
        return []
    last = history[-1]
    train, val = float(last["train"]), last.get("val")
    found = []
    memorising = val is not None and val >= MEMORISING_RATIO * train and val - train >= MEMORISING_GAP_BITS
    rising = None
    scored = [(int(h["step"]), float(h["val"])) for h in history if h.get("val") is not None]
    if val is not None and len(scored) >= 2:
        best_step, best = min(scored, key=lambda sv: sv[1])  # the earliest of equal minima
        if best_step < scored[-1][0] and val >= RISING_RATIO * best and val - best >= RISING_GAP_BITS:
            rising = best_step, best
    if memorising:
        since = f", and rising since step {rising[0]} (best {rising[1]:.2f})" if rising else ""
        found.append(Diagnosis("memorising", f"memorising: validation images cost {val:.2f} bits per image token "
                               f"against {train:.2f} on training images{since} -- more data, fewer steps or a "
                               "smaller preset would help"))
    elif rising:
        found.append(Diagnosis("validation_rising", f"overtraining: validation bits per image token rose from "
                               f"{rising[1]:.2f} at step {rising[0]} to {val:.2f}; later steps made the model worse "
                               f"on unseen images -- about {rising[0]} steps, or more data, would help"))
    data_bits = train_items * image_len * math.log2(image_vocab)
    capacity = CAPACITY_BITS_PER_PARAMETER * parameters
    if data_bits < capacity and (val is None or memorising):
        needed = math.ceil(capacity / (image_len * math.log2(image_vocab)))
        found.append(Diagnosis("too_little_data", f"too little data: {train_items} training images "
                               f"({format_count(train_items * image_len)} image tokens) for a "
                               f"{format_count(parameters)}-parameter transformer, which can learn them all by "
                               f"heart (it takes about {format_count(needed)} images to rule that out) -- more "
                               "data or a smaller preset would help"))
    uniform = math.log2(image_vocab)
    if train >= UNTRAINED_FRACTION * uniform:
        found.append(Diagnosis("undertrained", f"barely trained: {train:.2f} bits per image token even on training "
                               f"images, near the {uniform:.1f} bits of a uniform guess -- train longer (more steps "
                               "or minutes) or check the learning rate"))
    return found


def save_sample_grid(
    model: DalleTransformer, dvae: Any, tokenizer: Any, captions: Sequence[str], path: Path,
    candidates: int = 4, seed: int = 0,
) -> None:
    """One row per caption, ``candidates`` samples each, decoded by ``dvae``, as one PNG."""
    device = next(model.parameters()).device
    text = tokenizer.encode_batch(list(captions), training=False).to(device)
    text = text.repeat_interleave(candidates, dim=0)
    g = torch.Generator(device=device).manual_seed(seed)
    tokens = generate_images_tokens(model, text, generator=g)
    images = dvae.decode(tokens.to(next(dvae.parameters()).device)).float().cpu().clamp(0, 1)
    n, (_, h, w) = len(captions), images.shape[1:]
    grid = images.reshape(n, candidates, 3, h, w).permute(0, 3, 1, 4, 2).reshape(n * h, candidates * w, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255).round().byte().numpy()).save(path)


def plot_losses(csv_path: Path, png_path: Path, width: int = 640, height: int = 360) -> None:
    """A plain line plot of the logged losses (PIL only: no plotting dependency)."""
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss")]
    if len(rows) < 2:
        return
    steps = [int(r["step"]) for r in rows]
    series = {k: [float(r[k]) for r in rows] for k in ("loss", "text_loss", "image_loss")}
    lo = min(min(v) for v in series.values())
    hi = max(max(v) for v in series.values())
    hi = hi if hi > lo else lo + 1.0
    pad = 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([pad, pad // 2, width - pad // 2, height - pad], outline="black")

    def xy(step: int, value: float) -> tuple[float, float]:
        x = pad + (step - steps[0]) / max(steps[-1] - steps[0], 1) * (width - 1.5 * pad)
        y = height - pad - (value - lo) / (hi - lo) * (height - 1.5 * pad)
        return x, y

    colours = {"loss": "black", "text_loss": "royalblue", "image_loss": "firebrick"}
    for i, (name, values) in enumerate(series.items()):
        draw.line([xy(s, v) for s, v in zip(steps, values)], fill=colours[name], width=2)
        draw.text((pad + 10 + 110 * i, pad // 2 + 5), name, fill=colours[name])
    draw.text((2, pad // 2), f"{hi:.2f}", fill="black")
    draw.text((2, height - pad - 10), f"{lo:.2f}", fill="black")
    draw.text((pad, height - pad + 5), f"step {steps[0]}", fill="black")
    draw.text((width - 100, height - pad + 5), f"step {steps[-1]}", fill="black")
    img.save(png_path)


def estimate_steps(model: DalleTransformer, text: torch.Tensor, images: torch.Tensor, minutes: float,
                   grad_accum: int, autocast: Any) -> tuple[int, float]:
    """Steps that fit in ``minutes``, timed on a copy of the model (the run's random states untouched)."""
    probe = copy.deepcopy(model).train()
    opt = make_optimizer(probe, 1e-9)

    def step() -> None:
        train_step(probe, text, images, grad_accum, autocast)
        opt.step()
        opt.zero_grad(set_to_none=True)

    per_step = time_per_step(step, repeats=3, device=text.device)
    return steps_in_budget(minutes, per_step), per_step


# --- the loop ------------------------------------------------------------------------------


def train_transformer(
    token_cache: Any,
    tokenizer: Any,
    out_dir: str | Path,
    config: DalleConfig,
    *,
    steps: int | None = None,
    minutes: float | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    sample_every: int | None = None,
    dvae: Any | None = None,
    eval_dataset: Any | None = None,
    log_every: int = 50,
    checkpoint_every: int = CHECKPOINT_EVERY,
    stop_after: int | None = None,
    activation_checkpointing: bool = False,
    autocast: bool | None = None,
    progress: bool = True,
    strategy: str = "ddp",
    compile: bool = False,
    val_items: int | None = None,
) -> Path:
    """Train the transformer of ``config`` on ``token_cache``; return ``out_dir/"transformer"``.

    ``steps`` (default ``config.train.transformer_steps``) sets the schedules' length;
    with ``minutes`` alone the step count is estimated from a timing probe, with both it
    is the smaller.  Validation: the last ``val_items`` items of ``token_cache`` (default:
    the config's split of its length, :func:`dalle.training.state.validation_split`) are
    held out of training; ``dalle train`` passes the split of the source data set, so that
    the same images are held out as in the dVAE and CLIP stages.  ``eval_dataset``
    instead gives a separate validation set (then nothing is held out).  Every
    ``sample_every`` steps (default ``train.transformer_eval_every``) the weight average is
    evaluated on the validation items and as
    many training items (logged), and with ``dvae`` given sample grids of validation
    captions are written to ``out_dir/samples``; a finished run writes its fit report
    (``logs/transformer_fit.json``, printed too).  Early stopping on the validation figure
    and the export of the best evaluated weights: see the module docstring.  ``stop_after``
    ends the run early,
    checkpointed, as an interruption would (for tests); ``resume`` continues from the
    newest checkpoint in ``out_dir/checkpoints/transformer``.  ``autocast``: None = bf16
    where supported natively, True/False to force.  The weight average is exported to
    ``out_dir/"transformer"`` when the run completes (or its time budget runs out).

    Under ``torchrun`` the run is data-parallel over the job's processes (``device``
    "cuda" becomes each rank's own GPU), with ``strategy`` "ddp" or "fsdp"; on one
    process ``strategy`` changes nothing.  ``compile=True`` compiles each block with
    ``torch.compile`` (falls back to eager, with a warning, if compiling fails).
    """
    out_dir = Path(out_dir)
    tcfg, train_cfg = config.transformer, config.train
    seed = train_cfg.seed if seed is None else seed
    sample_every = train_cfg.transformer_eval_every if sample_every is None else sample_every
    if sample_every < 1:
        raise ValueError(f"the evaluation interval (train.transformer_eval_every) must be >= 1 step, got {sample_every}")
    if train_cfg.transformer_patience < 0:
        raise ValueError(f"train.transformer_patience must be >= 0 evaluations, got {train_cfg.transformer_patience}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if minutes is not None and minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    info = dd.init_distributed(device)
    strategy = dd.resolve_strategy(strategy, info)
    device = info.device
    batch_size, grad_accum = train_cfg.transformer_batch, max(1, train_cfg.grad_accum)
    if batch_size % (grad_accum * info.world_size):
        raise ValueError(f"transformer_batch={batch_size} must be divisible by grad_accum={grad_accum} times the "
                         f"{info.world_size} processes (each step splits its batch into equal micro-batches)")
    _check_data(token_cache, tokenizer, config)
    if eval_dataset is not None and val_items is not None:
        raise ValueError("give eval_dataset (a separate validation set) or val_items (held out of the token cache), "
                         "not both")
    if eval_dataset is None:
        n_train, val_indices = holdout(len(token_cache), train_cfg, val_items, "transformer", warn=info.is_main)
        val_data = token_cache
    else:
        n_train, val_data = len(token_cache), eval_dataset
        val_indices = range(min(len(eval_dataset), train_cfg.val_max))
    train_probe = spread(n_train, len(val_indices) or EVAL_ITEMS)  # as many training items as validation ones
    amp = autocast_context(device, autocast)
    start_time = time.perf_counter()
    main = info.is_main
    sharded = strategy == "fsdp" and info.distributed

    torch.manual_seed(seed)
    model = DalleTransformer(tcfg).to(device).train()
    model.gradient_checkpointing = activation_checkpointing
    checkpointer = Checkpointer(out_dir / "checkpoints" / "transformer")
    guard = NonFiniteGuard()

    # Before wrapping: the timing probe copies the plain model, and compiled blocks must
    # not be deep-copied (a copy would call the original's compiled forward).
    total_hint = None
    if minutes is not None and not resume:
        total_hint = _estimate_total(model, token_cache, tokenizer, seed, batch_size, grad_accum, amp, minutes,
                                     steps, info, n_train)
    # The weight average: a whole copy (made before compiling, for the same reason), or under
    # FSDP shards of it, made from the sharded parameters.
    ema: Any = None if sharded else EMA(model, train_cfg.ema_decay)
    if compile:
        _compile_blocks(model)
    wrapped = dd.wrap_model(LossForward(model), info, strategy, units=list(model.blocks)) if info.distributed else None
    if sharded:
        ema = dd.ShardedEMA(model, train_cfg.ema_decay)
    elif info.distributed:  # the wrapper started every replica from rank 0's weights; so does the average
        ema.module.load_state_dict(model.state_dict())
    optimizer = make_optimizer(model, train_cfg.transformer_lr)

    step, total, elapsed_before = 0, None, 0.0
    window_sum, window_count = 0.0, 0  # the losses of the steps since the last logged row
    # Early stopping: the best validation evaluation so far ({"step", "val"}) and the evaluations since.
    best: dict[str, Any] | None = None
    evals_since_best = 0
    best_dir = out_dir / "checkpoints" / "transformer_best"
    if resume:
        restored = _load_checkpoint(checkpointer, model, ema, optimizer, sharded)
        step, total, elapsed_before, (window_sum, window_count) = resumed_progress(
            restored, steps, checkpointer.folder, warn=main)
        if restored is not None:
            best, evals_since_best = restored[1].get("best"), int(restored[1].get("evals_since_best", 0))
        if total is None and minutes is not None:
            total = _estimate_total(model, token_cache, tokenizer, seed, batch_size, grad_accum, amp, minutes,
                                    steps, info, n_train)
    if total is None:
        total = total_hint if total_hint is not None else (steps if steps is not None else train_cfg.transformer_steps)
    warmup = warmup_steps(train_cfg.transformer_warmup, total)
    deadline = budget_deadline(minutes, start_time, elapsed_before)
    end = total if stop_after is None else min(total, stop_after)

    log_path = out_dir / "logs" / "transformer.csv"
    log: CsvLog | None = None
    history: list[dict[str, Any]] = []  # the evaluations so far (rank 0), for the fit report
    if main:
        log = CsvLog(log_path, CSV_FIELDS, step if resume else None)
        history = [{"step": int(r["step"]), "train": float(r["train_bits_per_image_token"]),
                    "val": float(r["val_bits_per_image_token"]) if r.get("val_bits_per_image_token") else None}
                   for r in log.kept if r.get("train_bits_per_image_token")]
    shown = [(val_data, i) for i in val_indices[:4]] or [(token_cache, i) for i in train_probe[:4]]
    sample_captions = [data[i][1][0] for data, i in shown]  # unseen captions where there are some
    tokens_per_step = batch_size * (tcfg.seq_len - 1)

    saved_step, time_up, stopped_early = step, False, False

    def save_checkpoint() -> None:
        nonlocal saved_step
        extra = {"total_steps": total, "seed": seed, "seconds": elapsed_before + time.perf_counter() - start_time,
                 "world_size": info.world_size, "strategy": strategy, "window_loss": [window_sum, window_count],
                 "best": best, "evals_since_best": evals_since_best}
        if sharded:  # gather full tensors on every rank (collective), then rank 0 writes them
            modules: dict[str, Any] = {"model": dd.StateHolder(dd.full_state_dict(model)),
                                       "ema": dd.StateHolder(ema.state_dict())}
            optimizers: dict[str, Any] = {"optimizer": dd.StateHolder(dd.full_optimizer_state_dict(optimizer))}
        else:
            modules = {"model": model, "ema": ema.module}  # type: ignore[union-attr]
            optimizers = {"optimizer": optimizer}
        if main:
            checkpointer.save(step, modules, optimizers, extra)
        dd.barrier(info)
        saved_step = step

    def averaged_model() -> DalleTransformer | None:
        """The weight average as a plain module on rank 0 (None elsewhere); gathered under FSDP."""
        if not sharded:
            return ema.module if main else None  # type: ignore[union-attr]
        state = ema.state_dict()
        if not main:
            return None
        average = DalleTransformer(tcfg).to(device).eval()
        average.load_state_dict(state)
        return average

    def evaluate_fit(average: DalleTransformer) -> dict[str, Any]:
        """Bits per image token of ``average`` on the training probe and the validation items (rank 0)."""
        entry: dict[str, Any] = {"step": step, "train": round(evaluate_transformer(
            average, token_cache, tokenizer, indices=train_probe)["bits_per_image_token"], 4), "val": None}
        if val_indices:
            entry["val"] = round(evaluate_transformer(
                average, val_data, tokenizer, indices=val_indices)["bits_per_image_token"], 4)
        history.append(entry)
        return entry

    def track_best(average: DalleTransformer, entry: dict[str, Any]) -> None:
        """Keep the weights of the best validation evaluation so far on disk (rank 0)."""
        nonlocal best, evals_since_best
        if entry["val"] is None:
            return
        if best is None or entry["val"] < best["val"]:
            best, evals_since_best = {"step": entry["step"], "val": entry["val"], "train": entry["train"]}, 0
            average.float().save_pretrained(best_dir)
        else:
            evals_since_best += 1

    bar = _progress(step, end, progress and main)
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < end:
            out_of_time = time.perf_counter() > deadline
            if info.distributed and math.isfinite(deadline):
                out_of_time = dd.any_rank(out_of_time, info)  # every rank must stop at the same step
            if out_of_time:
                if main:
                    warnings.warn(f"time budget spent at step {step} of {total}; stopping early", stacklevel=2)
                time_up = True
                break
            peak = train_cfg.transformer_lr
            lr = warmup_cosine(step, total, warmup, peak, FINAL_LR_FRACTION * peak)
            for group in optimizer.param_groups:
                group["lr"] = lr
            text, images = batch_for_step(token_cache, tokenizer, seed, step, batch_size,
                                          info if info.distributed else None, n_train,
                                          config.transformer.null_caption_fraction)
            text, images = text.to(device, non_blocking=True), images.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss, parts = _guarded_step(model, text, images, grad_accum, amp, wrapped, info, compile)
            compile = False  # the first step has shown whether compiling works
            loss, parts = reduce_losses(loss, parts, info)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            if dd._is_dtensor(grad_norm):
                grad_norm = grad_norm.full_tensor()
            if guard.check(loss) and guard.check(grad_norm):
                optimizer.step()
                # Bias-corrected warm-up of the average: early weights are forgotten fast.
                ema.decay = min(train_cfg.ema_decay, (1 + step) / (10 + step))
                ema.update(model)
                window_sum += float(loss)
                window_count += 1
            step += 1
            window_steps += 1

            if step % log_every == 0 or step % sample_every == 0 or step == end:
                now = time.perf_counter()
                row: dict[str, Any] = {
                    "step": step, "loss": round(float(loss), 5), "text_loss": round(float(parts["text_loss"]), 5),
                    "image_loss": round(float(parts["image_loss"]), 5), "grad_norm": round(float(grad_norm), 4),
                    "lr": round(lr, 8),
                    "tokens_per_s": round(window_steps * tokens_per_step / max(now - window_start, 1e-9)),
                    "seconds": round(elapsed_before + now - start_time, 1),
                    "mean_loss": round(window_sum / window_count, 5) if window_count else "",
                }
                if step % sample_every == 0 or step == end:
                    average = averaged_model()
                    if average is not None:
                        entry = evaluate_fit(average)
                        track_best(average, entry)
                        row["train_bits_per_image_token"] = entry["train"]
                        if entry["val"] is not None:
                            row["val_bits_per_image_token"] = row["eval_bits_per_image_token"] = entry["val"]
                        if dvae is not None:
                            grid_path = out_dir / "samples" / f"transformer_step{step:06d}.png"
                            save_sample_grid(average, dvae, tokenizer, sample_captions, grid_path, seed=seed)
                            log_image(out_dir / "logs", "transformer", "samples", grid_path, step)
                    dd.barrier(info)
                if log is not None:
                    log.write(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", img=f"{row['image_loss']:.3f}",
                                    tok_s=row["tokens_per_s"])
                window_start, window_steps = time.perf_counter(), 0
                window_sum, window_count = 0.0, 0
            if bar is not None:
                bar.update(1)
            patience = train_cfg.transformer_patience
            if step % sample_every == 0 and patience and step < end:
                # Rank 0 evaluated; every rank must take the same decision.
                stopped_early = bool(dd.broadcast_object(evals_since_best >= patience if main else None, info))
            if step % checkpoint_every == 0 or step == end or stopped_early:
                save_checkpoint()
            if stopped_early:
                if main:
                    print(f"transformer: stopping early at step {step}: validation bits per image token have not "
                          f"improved for {evals_since_best} evaluations since step {best['step']} "
                          f"({best['val']:.3f})")
                break
    finally:
        if log is not None:
            log.close()
        if bar is not None:
            bar.close()

    if step != saved_step:  # stopped by the time budget between checkpoints
        save_checkpoint()
    export = out_dir / "transformer"
    exporting = step >= total or time_up or stopped_early  # an interrupted run (stop_after) is not exported
    average = averaged_model() if exporting else None
    if main:
        plot_losses(log_path, log_path.with_suffix(".png"))
        if average is not None:
            if not history or history[-1]["step"] != step:  # stopped by the time budget after the last evaluation
                track_best(average, evaluate_fit(average))
            exported = history[-1]
            if best is not None and best["step"] != step and (best_dir / "model.safetensors").is_file():
                average = DalleTransformer.from_pretrained(best_dir, device=device)  # the best validation weights
                exported = next((h for h in history if h["step"] == best["step"]), best)
            average.float().save_pretrained(export)
            _fit_report(out_dir, history, n_train=n_train, n_val=len(val_indices), n_probe=len(train_probe),
                        parameters=sum(p.numel() for p in average.parameters()), batch_size=batch_size, config=config,
                        exported=exported, stopped_early=stopped_early)
    dd.barrier(info)
    if not sharded:  # replicated weights must agree bit for bit; a drift is a bug worth reporting loudly
        dd.check_replicas_identical(model, info, "model")
        dd.check_replicas_identical(ema.module, info, "weight average")
    return export


def _fit_report(out_dir: Path, history: list[dict[str, Any]], *, n_train: int, n_val: int, n_probe: int,
                parameters: int, batch_size: int, config: DalleConfig, exported: dict[str, Any] | None = None,
                stopped_early: bool = False) -> Path:
    """Diagnose the exported weights from the evaluations up to theirs; write ``logs/transformer_fit.json``.

    ``exported``: the evaluation whose weights were exported (default the last); the report
    judges those weights, and says when later evaluations were worse (early stopping).
    """
    tcfg = config.transformer
    last_step = history[-1]["step"]
    exported = exported or history[-1]
    upto = [h for h in history if h["step"] <= exported["step"]] or history[-1:]
    last = upto[-1]
    passes = last["step"] * batch_size / n_train
    diagnoses = diagnose_transformer(upto, train_items=n_train, parameters=parameters, image_len=tcfg.image_len,
                                     image_vocab=tcfg.image_vocab)
    seen = f"{n_train} training images, each seen {passes:.1f} times"
    if last["val"] is None:
        summary = (f"{last['train']:.3f} bits per image token on {n_probe} training images at step {last['step']} "
                   f"({seen}; none held out for validation)")
    else:
        summary = (f"{last['val']:.3f} bits per image token on {n_val} validation images, {last['train']:.3f} on "
                   f"{n_probe} training images at step {last['step']} ({seen})")
    if last["step"] != last_step:
        worse = max(h["val"] for h in history if h["step"] > last["step"] and h["val"] is not None)
        summary += (f"; exported the weights of step {last['step']}, the best on validation images: "
                    f"{'stopped early at' if stopped_early else 'ran to'} step {last_step}, with later "
                    f"evaluations up to {worse:.3f}")
    figures = {"step": last["step"], "last_step": last_step, "stopped_early": stopped_early,
               "train_items": n_train, "val_items": n_val, "parameters": parameters,
               "passes": round(passes, 2), "val_bits_per_image_token": last["val"],
               "train_bits_per_image_token": last["train"], "history": history}
    return write_fit_report(out_dir, "transformer", summary, figures, diagnoses)


def _estimate_total(model: DalleTransformer, dataset: Any, tokenizer: Any, seed: int, batch_size: int,
                    grad_accum: int, amp: Any, minutes: float, steps: int | None, info: DistInfo,
                    n_train: int | None = None) -> int:
    """The step count that fits ``minutes``: timed by rank 0 on its share of a batch, then shared."""
    total = None
    if info.is_main:
        text, images = batch_for_step(dataset, tokenizer, seed, 0, batch_size, info if info.distributed else None,
                                      n_train)
        fit, per_step = estimate_steps(model, text.to(info.device), images.to(info.device), minutes, grad_accum, amp)
        total = fit if steps is None else min(steps, fit)
        print(f"transformer: {per_step:.3f} s a step -> {total} steps in {minutes:g} minutes")
    return int(dd.broadcast_object(total, info))


def _compile_blocks(model: DalleTransformer) -> None:
    """``torch.compile`` each block in place (parameter names unchanged); the embeddings and loss stay eager."""
    try:
        import torch._dynamo as dynamo

        # One compiled graph per (layer kind, shape); allow one per layer when layers differ.
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 4 * len(model.blocks))
        for block in model.blocks:
            block.compile()
    except Exception as e:  # noqa: BLE001 - compiling is an optimisation
        warnings.warn(f"torch.compile unavailable ({type(e).__name__}: {e}); training eagerly", stacklevel=2)


def _guarded_step(model: DalleTransformer, text: torch.Tensor, images: torch.Tensor, grad_accum: int, amp: Any,
                  wrapped: nn.Module | None, info: DistInfo, first_compiled: bool
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`train_step`; on the first step of a compiled model, a compiler failure falls back to eager."""
    if not first_compiled:
        return train_step(model, text, images, grad_accum, amp, wrapped=wrapped, info=info)
    try:
        return train_step(model, text, images, grad_accum, amp, wrapped=wrapped, info=info)
    except Exception as e:  # noqa: BLE001
        if info.distributed:
            raise  # the ranks could disagree on falling back; fail loudly instead
        warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); training eagerly", stacklevel=2)
        for block in model.blocks:
            block._compiled_call_impl = None  # nn.Module.compile's hook: back to the eager forward
        model.zero_grad(set_to_none=True)
        return train_step(model, text, images, grad_accum, amp, wrapped=wrapped, info=info)


def _load_checkpoint(checkpointer: Checkpointer, model: DalleTransformer, ema: Any, optimizer: torch.optim.Optimizer,
                     sharded: bool) -> tuple[int, dict[str, Any]] | None:
    """Restore the newest checkpoint (full tensors, written at any world size) on every rank."""
    if not sharded:
        return checkpointer.load_latest({"model": model, "ema": ema.module}, {"optimizer": optimizer})
    # Sharded: read into full-size CPU staging copies, then let each rank keep its shards.
    staging_model, staging_ema = DalleTransformer(model.config), DalleTransformer(model.config)
    holder = dd.StateHolder()
    restored = checkpointer.load_latest({"model": staging_model, "ema": staging_ema}, {"optimizer": holder})
    if restored is not None:
        dd.load_full_state_dict(model, staging_model.state_dict())
        ema.load_state_dict(staging_ema.state_dict())
        dd.load_full_optimizer_state_dict(optimizer, holder.state_dict())
    return restored


def _progress(start: int, total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="transformer", dynamic_ncols=True)
