"""Training the discrete VAE: one plain loop, read top to bottom.

Schedules (the paper's shapes, scaled to the run's length ``total`` steps):

* learning rate: short linear warm-up, then cosine decay to zero (AdamW 0.9/0.999,
  weight decay 1e-4);
* Gumbel-softmax temperature: cosine from 1 to 1/16 over ``TEMPERATURE_FRACTION`` of
  the run, then held (the paper anneals over its first 150k updates);
* KL weight beta: cosine warm-up from 0 to ``config.dvae.kl_weight`` over
  ``KL_WARMUP_FRACTION`` of the run (the paper: 0 -> 6.6 over its first 5k updates).
  A loss without the KL early lets the encoder find informative codes before the
  prior asks it to spread over the codebook.

Exact resume: the batch of step ``s`` is a function of ``(seed, s)`` only, and the
checkpoint holds weights, optimizer, weight average and random states, so an
interrupted run that is resumed ends bitwise identical (on the CPU) to one that was
never interrupted.

``minutes``: the schedules need the total number of steps up front, so a time budget
is turned into a step count before the first step, by timing a few forward/backward
passes on a throw-away copy of the model (the real run's random stream is not
touched) and keeping 8% of the budget for evaluation, checkpoints and export.  The
count is stored in the checkpoints, so a resumed run keeps the schedules it started
with.  The budget is also a deadline for the whole run, resumes included: past it the
loop stops, checkpoints and exports even if the machine got slower than the estimate
(the schedules then end early, not annealed).
"""

from __future__ import annotations

import copy
import csv
import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from dalle.config import DalleConfig
from dalle.data.preprocess import PAPER_CROP_SCALE, make_generator, to_tensor, train_transform
from dalle.dvae import DiscreteVAE, GumbelQuantizer, code_statistics, psnr_from_mse
from dalle.training.state import EMA, Checkpointer, NonFiniteGuard, cosine, warmup_cosine

TEMPERATURE_START = 1.0
TEMPERATURE_END = 1.0 / 16  # the paper's final temperature
TEMPERATURE_FRACTION = 0.8  # of the run spent annealing the temperature
KL_WARMUP_FRACTION = 0.25  # of the run spent warming the KL weight up from 0
LR_WARMUP_FRACTION = 0.02
ADAM_BETAS = (0.9, 0.999)
WEIGHT_DECAY = 1e-4
CHECKPOINT_EVERY = 500
BUDGET_SAFETY = 0.92  # fraction of a --minutes budget given to training steps (rest: eval, export)


# --- batches -----------------------------------------------------------------------------


def image_tensor(image: Image.Image, image_size: int, generator: torch.Generator) -> Tensor:
    """An item's PIL image -> ``[3, S, S]`` in [0, 1].

    Images already of the model's size (the shapes set) are used as they are: a crop
    would cut objects.  Others get the paper's random square crop, resized.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size == (image_size, image_size):
        return to_tensor(image)
    return train_transform(image, image_size, PAPER_CROP_SCALE, generator)


def batch_for_step(dataset: Any, seed: int, step: int, batch_size: int, image_size: int) -> Tensor:
    """The training batch of step ``step``: a function of ``(seed, step)`` only."""
    g = make_generator(seed, step)
    indices = torch.randint(len(dataset), (batch_size,), generator=g).tolist()
    return torch.stack([image_tensor(dataset[i].image, image_size, g) for i in indices])


def fixed_images(dataset: Any, n: int, image_size: int) -> Tensor:
    """The first ``n`` images of ``dataset`` (for evaluation and sample grids)."""
    n = min(n, len(dataset))
    g = make_generator(0)
    return torch.stack([image_tensor(dataset[i].image, image_size, g) for i in range(n)])


# --- evaluation ----------------------------------------------------------------------------


@torch.no_grad()
def reconstruct(model: DiscreteVAE, images: Tensor, batch: int = 64) -> tuple[Tensor, Tensor]:
    """``decode(encode(images))`` batch by batch -> (reconstructions on the CPU, tokens)."""
    device = next(model.parameters()).device
    recons, tokens = [], []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(device)
        t = model.encode(x)
        recons.append(model.decode(t).float().cpu())
        tokens.append(t.cpu())
    return torch.cat(recons), torch.cat(tokens)


@torch.no_grad()
def evaluate_dvae(model: DiscreteVAE, dataset: Any, n: int = 256, batch: int = 64) -> dict[str, float]:
    """Held-out quality of the hard (tokenised) reconstructions of the first ``n`` items.

    Returns ``psnr`` (dB, of all pixels of all images pooled, on [0, 1] pixels),
    ``codebook_usage`` (fraction of the codebook used by these images) and
    ``perplexity`` (of the code histogram; K when codes are used uniformly).
    """
    was_training = model.training
    model.eval()
    images = fixed_images(dataset, n, model.config.image_size)
    recon, tokens = reconstruct(model, images, batch)
    model.train(was_training)
    mse = (recon - images).pow(2).mean()
    perplexity, usage = code_statistics(tokens, model.codebook_size)
    return {"psnr": float(psnr_from_mse(mse)), "codebook_usage": float(usage), "perplexity": float(perplexity)}


def save_grid(images: Tensor, recons: Tensor, path: Path) -> None:
    """Originals on the top row, reconstructions below, as one PNG."""
    both = torch.cat([images, recons])  # [2n, 3, H, W]
    n, (_, h, w) = len(images), images.shape[1:]
    grid = both.reshape(2, n, 3, h, w).permute(0, 3, 1, 4, 2).reshape(2 * h, n * w, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.clamp(0, 1) * 255).round().byte().numpy()).save(path)


# --- the loop ------------------------------------------------------------------------------


def schedules(step: int, total: int, peak_lr: float, kl_weight: float) -> dict[str, float]:
    """Learning rate, Gumbel temperature and KL weight of step ``step`` of a ``total``-step run."""
    return {
        "lr": warmup_cosine(step, total, max(1, int(LR_WARMUP_FRACTION * total)), peak_lr, 0.0),
        "temperature": cosine(step, int(TEMPERATURE_FRACTION * total), TEMPERATURE_START, TEMPERATURE_END),
        "kl_weight": cosine(step, int(KL_WARMUP_FRACTION * total), 0.0, kl_weight),
    }


def estimate_steps(model: DiscreteVAE, images: Tensor, minutes: float, autocast: Any) -> tuple[int, float]:
    """Steps that fit in ``minutes``, timed on a copy of the model (RNG state untouched)."""
    probe = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-9)
    times = []
    with torch.random.fork_rng(devices=[]):
        for _ in range(6):
            t0 = time.perf_counter()
            with autocast:
                out = probe(images, temperature=1.0, kl_weight=0.0)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if images.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    per_step = sorted(times[1:])[len(times[1:]) // 2]  # median, first call excluded (warm-up)
    return max(1, int(minutes * 60 * BUDGET_SAFETY / per_step)), per_step


CSV_FIELDS = ["step", "loss", "nll", "kl", "commitment", "mse", "psnr", "perplexity", "usage",
              "temperature", "kl_weight", "lr", "seconds", "eval_psnr", "eval_usage"]  # fmt: skip


def train_dvae(
    dataset: Any,
    out_dir: Path,
    config: DalleConfig,
    *,
    steps: int | None = None,
    minutes: float | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    log_every: int = 50,
    sample_every: int = 500,
    seed: int | None = None,
    eval_dataset: Any | None = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
    stop_after: int | None = None,
    progress: bool = True,
) -> Path:
    """Train the dVAE of ``config`` on ``dataset`` (items with ``.image``); return ``out_dir/"dvae"``.

    ``steps`` (default ``config.train.dvae_steps``) sets the schedules' length; with
    ``minutes`` alone the step count is estimated from a timing probe (module
    docstring), with both it is the smaller of the two.  ``eval_dataset`` (default: the
    training set) feeds the sample grids and the logged held-out PSNR.  ``stop_after``
    ends the run early after that many steps, checkpointed, as an interruption would
    (for tests); ``resume`` continues from the newest checkpoint in ``out_dir``.
    """
    out_dir = Path(out_dir)
    dcfg, tcfg = config.dvae, config.train
    seed = tcfg.seed if seed is None else seed
    device = torch.device(device)
    if len(dataset) == 0:
        raise ValueError("the dVAE training set is empty; point --data at a folder of images")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if minutes is not None and minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    eval_dataset = dataset if eval_dataset is None else eval_dataset
    batch_size, size = tcfg.dvae_batch, dcfg.image_size
    # bf16 autocast on CUDA (the likelihood and quantiser statistics stay in fp32).
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    start_time = time.perf_counter()

    torch.manual_seed(seed)
    model = DiscreteVAE(dcfg).to(device).to(memory_format=torch.channels_last).train()
    ema = EMA(model, tcfg.ema_decay)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tcfg.dvae_lr, betas=ADAM_BETAS,
    )
    checkpointer = Checkpointer(out_dir / "checkpoints" / "dvae")
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
        total = steps if steps is not None else tcfg.dvae_steps
        if minutes is not None:
            probe_images = batch_for_step(dataset, seed, 0, batch_size, size).to(device)
            fit, per_step = estimate_steps(model, probe_images, minutes, autocast)
            total = fit if steps is None else min(steps, fit)
            print(f"dvae: {per_step:.3f} s a step -> {total} steps in {minutes:g} minutes")
    # The budget covers the whole run, a resumed one included (at least one step is taken).
    deadline = math.inf
    if minutes is not None:
        deadline = start_time + minutes * 60 * (BUDGET_SAFETY + 1) / 2 - elapsed_before
    end = total if stop_after is None else min(total, stop_after)

    log_path = out_dir / "logs" / "dvae.csv"
    rows = _kept_log_rows(log_path, step) if resume else []
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "w", newline="")
    log = csv.DictWriter(log_file, fieldnames=CSV_FIELDS)
    log.writeheader()
    log.writerows(rows)
    sample_images = fixed_images(eval_dataset, 8, size)
    eval_images = fixed_images(eval_dataset, 64, size)

    time_up = False
    bar = _progress(step, end, progress)
    try:
        while step < end:
            s = schedules(step, total, tcfg.dvae_lr, dcfg.kl_weight)
            for group in optimizer.param_groups:
                group["lr"] = s["lr"]
            images = batch_for_step(dataset, seed, step, batch_size, size).to(device)
            images = images.contiguous(memory_format=torch.channels_last)
            with autocast:
                out = model(images, temperature=s["temperature"], kl_weight=s["kl_weight"])
            optimizer.zero_grad(set_to_none=True)
            if guard.check(out.loss):
                out.loss.backward()
                optimizer.step()
                # Bias-corrected warm-up of the average: early weights are forgotten fast.
                ema.decay = min(tcfg.ema_decay, (1 + step) / (10 + step))
                ema.update(model)
            step += 1
            time_up = step < end and time.perf_counter() > deadline
            last = step == end or time_up

            if step % log_every == 0 or step % sample_every == 0 or last:
                row = {k: round(float(v), 5) for k, v in out.metrics.items() if k in CSV_FIELDS}
                row.update(step=step, loss=round(float(out.loss.detach()), 5), seconds=round(
                    elapsed_before + time.perf_counter() - start_time, 1), **{k: round(v, 6) for k, v in s.items()})
                if step % sample_every == 0 or last:
                    recon, tokens = reconstruct(ema.module, eval_images)
                    row["eval_psnr"] = round(float(psnr_from_mse((recon - eval_images).pow(2).mean())), 3)
                    row["eval_usage"] = round(float(code_statistics(tokens, dcfg.codebook_size)[1]), 4)
                    save_grid(sample_images, recon[: len(sample_images)], out_dir / "samples" / f"dvae_step{step:06d}.png")
                log.writerow(row)
                log_file.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", psnr=f"{row['psnr']:.1f}",
                                    codes=f"{row['usage']:.2f}", tau=f"{s['temperature']:.2f}")
            if bar is not None:
                bar.update(1)
            if step % checkpoint_every == 0 or last:
                extra = {"total_steps": total, "seed": seed,
                         "seconds": elapsed_before + time.perf_counter() - start_time}
                checkpointer.save(step, {"model": model, "ema": ema.module}, {"optimizer": optimizer}, extra)
            if time_up:
                warnings.warn(f"time budget spent at step {step} of {total}; stopping early", stacklevel=2)
                break
    finally:
        log_file.close()
        if bar is not None:
            bar.close()

    export = out_dir / "dvae"
    if step >= total or time_up:  # an interrupted run (stop_after) is not exported
        ema.module.float().save_pretrained(export)
    return export


def _kept_log_rows(path: Path, step: int) -> list[dict[str, str]]:
    """Rows of an earlier log up to ``step`` (a resumed run rewrites what came after)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= step]


def _progress(start: int, total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="dvae", dynamic_ncols=True)

