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
  residual stream and the losses stay fp32.

Exact resume: the batch (items, captions, BPE dropout) of step ``s`` is a function of
``(seed, s)`` only and the checkpoint holds weights, optimizer, weight average and
random states, so an interrupted run that is resumed ends bitwise identical (on the
CPU) to one that was never interrupted.  ``minutes`` is turned into a step count
before the first step by timing a few steps on a throw-away copy of the model, as the
dVAE loop does, and is also a hard deadline.
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

from dalle.config import DalleConfig
from dalle.data.preprocess import derive_seed, make_generator
from dalle.sampling import generate_images_tokens, native_bf16
from dalle.training.state import EMA, Checkpointer, NonFiniteGuard, warmup_cosine
from dalle.transformer import DalleTransformer

ADAM_BETAS = (0.9, 0.96)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 4.5e-2
GRAD_CLIP = 4.0
FINAL_LR_FRACTION = 0.1  # cosine decays to this fraction of the peak learning rate
CHECKPOINT_EVERY = 500
BUDGET_SAFETY = 0.92  # fraction of a --minutes budget given to training steps (rest: eval, export)
DATA_STREAM = 11  # mixes into the per-step seeds so this loop's draws differ from other loops'
CSV_FIELDS = ["step", "loss", "text_loss", "image_loss", "grad_norm", "lr", "tokens_per_s", "seconds",
              "eval_bits_per_image_token"]  # fmt: skip


# --- batches -----------------------------------------------------------------------------


def batch_for_step(
    dataset: Any, tokenizer: Any, seed: int, step: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text ids ``[B, text_len]`` and image tokens ``[B, g, g]`` of step ``step``: a function of ``(seed, step)``.

    ``dataset[i]`` is ``(LongTensor[g, g], list[str])`` (a :class:`TokenCache` or any
    sequence of such pairs); one caption per item is picked at random.
    """
    g = make_generator(seed, step, DATA_STREAM)
    indices = torch.randint(len(dataset), (batch_size,), generator=g).tolist()
    if hasattr(dataset, "batch"):  # TokenCache: one read for the whole batch
        images, caption_lists = dataset.batch(indices)
    else:
        items = [dataset[i] for i in indices]
        images = torch.stack([torch.as_tensor(tokens) for tokens, _ in items])
        caption_lists = [captions for _, captions in items]
    captions = []
    for i, caps in zip(indices, caption_lists):
        if not caps:
            raise ValueError(f"data set item {i} has no caption; every image needs at least one")
        captions.append(caps[int(torch.randint(len(caps), (1,), generator=g))])
    text = tokenizer.encode_batch(captions, training=True, seed=derive_seed(seed, step, DATA_STREAM))
    return text, images.long()


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


def make_optimizer(model: DalleTransformer, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay on linear-layer matrices only (see the module docstring)."""
    decay, free = [], []
    for name, p in model.named_parameters():
        is_matrix = p.dim() >= 2 and not name.startswith(("text_embedding.", "text_position.", "image_embedding.",
                                                          "image_row.", "image_column."))
        (decay if is_matrix else free).append(p)
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": free, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)


def warmup_steps(configured: int, total: int) -> int:
    """The configured warm-up, shortened for runs too short to spend it (at most a fifth of the run)."""
    return max(1, min(configured, total // 5))


def autocast_context(device: torch.device, enabled: bool | None = None) -> Any:
    """bf16 autocast where the hardware does bf16 natively (``enabled=None``), else a no-op."""
    if enabled is None:
        enabled = native_bf16(device)
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def train_step(
    model: DalleTransformer, text: torch.Tensor, images: torch.Tensor, grad_accum: int, autocast: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward over ``grad_accum`` micro-batches; returns the mean loss and parts."""
    micro = text.shape[0] // grad_accum
    total = torch.zeros((), device=text.device)
    parts = {"text_loss": torch.zeros((), device=text.device), "image_loss": torch.zeros((), device=text.device)}
    for i in range(grad_accum):
        sl = slice(i * micro, (i + 1) * micro)
        with autocast:
            loss, p = model.loss(text[sl], images[sl])
        (loss / grad_accum).backward()
        total += loss.detach() / grad_accum
        for k in parts:
            parts[k] += p[k] / grad_accum
    return total, parts


# --- evaluation and samples ---------------------------------------------------------------


@torch.no_grad()
def evaluate_transformer(
    model: DalleTransformer, dataset: Any, tokenizer: Any, n: int = 256, batch: int = 64
) -> dict[str, float]:
    """Held-out likelihood of the first ``n`` items, each with its first caption (no BPE dropout).

    Returns ``bits_per_image_token`` (the image cross-entropy in bits, averaged over all
    image tokens) and ``bits_per_text_token`` (over the non-padding text targets).
    """
    n = min(n, len(dataset))
    if n == 0:
        raise ValueError("evaluate_transformer needs a non-empty data set")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    image_nats = text_nats = 0.0
    image_count = text_count = 0
    try:
        for start in range(0, n, batch):
            items = [dataset[i] for i in range(start, min(start + batch, n))]
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
    """Steps that fit in ``minutes``, timed on a copy of the model (the run's random state untouched)."""
    probe = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-9)
    times = []
    with torch.random.fork_rng(devices=[]):
        for _ in range(4):
            t0 = time.perf_counter()
            train_step(probe, text, images, grad_accum, autocast)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if text.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    per_step = sorted(times[1:])[len(times[1:]) // 2]  # median, first call excluded (warm-up)
    return max(1, int(minutes * 60 * BUDGET_SAFETY / per_step)), per_step


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
    sample_every: int = 500,
    dvae: Any | None = None,
    eval_dataset: Any | None = None,
    log_every: int = 50,
    checkpoint_every: int = CHECKPOINT_EVERY,
    stop_after: int | None = None,
    activation_checkpointing: bool = False,
    autocast: bool | None = None,
    progress: bool = True,
) -> Path:
    """Train the transformer of ``config`` on ``token_cache``; return ``out_dir/"transformer"``.

    ``steps`` (default ``config.train.transformer_steps``) sets the schedules' length;
    with ``minutes`` alone the step count is estimated from a timing probe, with both it
    is the smaller.  ``eval_dataset`` (default: the training set) feeds the logged
    held-out bits per image token and, with ``dvae`` given, the sample grids written to
    ``out_dir/samples`` every ``sample_every`` steps.  ``stop_after`` ends the run early,
    checkpointed, as an interruption would (for tests); ``resume`` continues from the
    newest checkpoint in ``out_dir/checkpoints/transformer``.  ``autocast``: None = bf16
    where supported natively, True/False to force.  The weight average is exported to
    ``out_dir/"transformer"`` when the run completes (or its time budget runs out).
    """
    out_dir = Path(out_dir)
    tcfg, train_cfg = config.transformer, config.train
    seed = train_cfg.seed if seed is None else seed
    device = torch.device(device)
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if minutes is not None and minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    batch_size, grad_accum = train_cfg.transformer_batch, max(1, train_cfg.grad_accum)
    if batch_size % grad_accum:
        raise ValueError(f"transformer_batch={batch_size} must be divisible by grad_accum={grad_accum} "
                         "(each step splits its batch into grad_accum micro-batches)")
    _check_data(token_cache, tokenizer, config)
    eval_dataset = token_cache if eval_dataset is None else eval_dataset
    amp = autocast_context(device, autocast)
    start_time = time.perf_counter()

    torch.manual_seed(seed)
    model = DalleTransformer(tcfg).to(device).train()
    model.gradient_checkpointing = activation_checkpointing
    ema = EMA(model, train_cfg.ema_decay)
    optimizer = make_optimizer(model, train_cfg.transformer_lr)
    checkpointer = Checkpointer(out_dir / "checkpoints" / "transformer")
    guard = NonFiniteGuard()

    step, total, elapsed_before = 0, None, 0.0
    if resume:
        restored = checkpointer.load_latest({"model": model, "ema": ema.module}, {"optimizer": optimizer})
        if restored is None:
            warnings.warn(f"--resume: no checkpoint in {checkpointer.folder}; starting from scratch", stacklevel=2)
        else:
            step, extra = restored
            total, elapsed_before = int(extra["total_steps"]), float(extra.get("seconds", 0.0))
            if steps is not None and steps != total:
                warnings.warn(f"resuming a {total}-step run: steps={steps} ignored (the schedules keep their length)",
                              stacklevel=2)
    if total is None:
        total = steps if steps is not None else train_cfg.transformer_steps
        if minutes is not None:
            text, images = batch_for_step(token_cache, tokenizer, seed, 0, batch_size)
            fit, per_step = estimate_steps(model, text.to(device), images.to(device), minutes, grad_accum, amp)
            total = fit if steps is None else min(steps, fit)
            print(f"transformer: {per_step:.3f} s a step -> {total} steps in {minutes:g} minutes")
    warmup = warmup_steps(train_cfg.transformer_warmup, total)
    deadline = start_time + minutes * 60 * (BUDGET_SAFETY + 1) / 2 if minutes is not None else math.inf
    end = total if stop_after is None else min(total, stop_after)

    log_path = out_dir / "logs" / "transformer.csv"
    rows = _kept_log_rows(log_path, step) if resume else []
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "w", newline="")
    log = csv.DictWriter(log_file, fieldnames=CSV_FIELDS)
    log.writeheader()
    log.writerows({k: r.get(k, "") for k in CSV_FIELDS} for r in rows)
    sample_captions = [eval_dataset[i][1][0] for i in range(min(4, len(eval_dataset)))]
    tokens_per_step = batch_size * (tcfg.seq_len - 1)

    saved_step, time_up = step, False

    def save_checkpoint() -> None:
        nonlocal saved_step
        extra = {"total_steps": total, "seed": seed, "seconds": elapsed_before + time.perf_counter() - start_time}
        checkpointer.save(step, {"model": model, "ema": ema.module}, {"optimizer": optimizer}, extra)
        saved_step = step

    bar = _progress(step, end, progress)
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < end:
            if time.perf_counter() > deadline:
                warnings.warn(f"time budget spent at step {step} of {total}; stopping early", stacklevel=2)
                time_up = True
                break
            peak = train_cfg.transformer_lr
            lr = warmup_cosine(step, total, warmup, peak, FINAL_LR_FRACTION * peak)
            for group in optimizer.param_groups:
                group["lr"] = lr
            text, images = batch_for_step(token_cache, tokenizer, seed, step, batch_size)
            text, images = text.to(device, non_blocking=True), images.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss, parts = train_step(model, text, images, grad_accum, amp)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            if guard.check(loss) and guard.check(grad_norm):
                optimizer.step()
                # Bias-corrected warm-up of the average: early weights are forgotten fast.
                ema.decay = min(train_cfg.ema_decay, (1 + step) / (10 + step))
                ema.update(model)
            step += 1
            window_steps += 1

            if step % log_every == 0 or step == end:
                now = time.perf_counter()
                row: dict[str, Any] = {
                    "step": step, "loss": round(float(loss), 5), "text_loss": round(float(parts["text_loss"]), 5),
                    "image_loss": round(float(parts["image_loss"]), 5), "grad_norm": round(float(grad_norm), 4),
                    "lr": round(lr, 8),
                    "tokens_per_s": round(window_steps * tokens_per_step / max(now - window_start, 1e-9)),
                    "seconds": round(elapsed_before + now - start_time, 1),
                }
                if step % sample_every == 0 or step == end:
                    row["eval_bits_per_image_token"] = round(
                        evaluate_transformer(ema.module, eval_dataset, tokenizer, n=64)["bits_per_image_token"], 4)
                    if dvae is not None:
                        save_sample_grid(ema.module, dvae, tokenizer, sample_captions,
                                         out_dir / "samples" / f"transformer_step{step:06d}.png", seed=seed)
                log.writerow(row)
                log_file.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", img=f"{row['image_loss']:.3f}",
                                    tok_s=row["tokens_per_s"])
                window_start, window_steps = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            if step % checkpoint_every == 0 or step == end:
                save_checkpoint()
    finally:
        log_file.close()
        if bar is not None:
            bar.close()

    if step != saved_step:  # stopped by the time budget between checkpoints
        save_checkpoint()
    plot_losses(log_path, log_path.with_suffix(".png"))
    export = out_dir / "transformer"
    if step >= total or time_up:  # an interrupted run (stop_after) is not exported
        ema.module.float().save_pretrained(export)
    return export


def _kept_log_rows(path: Path, step: int) -> list[dict[str, str]]:
    """Rows of an earlier log up to ``step`` (a resumed run rewrites what came after)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= step]


def _progress(start: int, total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="transformer", dynamic_ncols=True)
