"""Training the discrete VAE: one plain loop, read top to bottom.

The recipe is the paper's (Ramesh et al. 2021, appendix A.2), its schedules scaled to
the run's length ``total`` steps.  The paper: "Several quantities are decayed during
training, all of which use a cosine schedule"; and "The decay schedules for the
relaxation temperature and the step size are especially important for stability and
successful optimization."

* KL weight beta: cosine warm-up from 0 to ``config.dvae.kl_weight`` (6.6, the paper's)
  over ``train.dvae_kl_warmup_fraction`` of the run.  The paper raises beta "from 0 to
  6.6 over the first 5000 updates" of 3M and finds that "increasing the KL weight to
  beta = 6.6 promotes better codebook usage".  A loss without the KL early lets the
  encoder find informative codes before the prior asks it to spread over the codebook.
  What beta weighs: the paper divides the whole ELBO (reconstruction summed over the
  256 x 256 x 3 pixel channels, KL summed over the 32 x 32 grid) by 256 x 256 x 3, "so
  that the weight of the KL term becomes beta/192".  :meth:`dalle.dvae.DiscreteVAE.forward`
  normalises the same way (sum over pixel channels and over the grid, divided by
  ``3 H W``), so ``kl_weight`` is the paper's beta unchanged -- and with 8x down-sampling
  the ratio ``3 H W / grid**2`` is 192 at every image size.  (With ``recon_loss="mse"``
  the reconstruction is not a likelihood and beta has no such meaning.)
* Gumbel-softmax temperature tau: cosine from 1 to 1/16 over
  ``train.dvae_temperature_fraction`` of the run (default 5%: the paper anneals "from 1
  to 1/16 over the first 150,000 updates" of 3M), then held.  "Using a linear annealing
  schedule for this typically led to divergence."
* step size: short linear warm-up to ``train.dvae_lr``, then cosine down to
  ``dvae_lr * LR_END_RATIO`` (the paper: "from 1e-4 to 1.25e-6"; a ratio of 1/80)
  at the end of the run; AdamW (0.9, 0.999, weight decay 1e-4 on weights, as the paper)
  and an exponential moving average of the weights (``train.ema_decay``, the paper's
  0.999), which is what gets evaluated and exported.
* the decoder is fed the soft relaxation (``dvae.straight_through=False``, the paper's)
  and codebook use is logged from the first step (the CSV's ``usage``/``perplexity``:
  the posterior argmax over the batch).

Exact resume: the batch of step ``s`` is a function of ``(seed, s)`` only, and the
checkpoint holds weights, optimizer, weight average and random states, so an
interrupted run that is resumed ends bitwise identical (on the CPU) to one that was
never interrupted.

Several processes: under ``torchrun --nproc_per_node=N`` the same loop trains
data-parallel (:mod:`dalle.training.distributed`) with DDP.  The batch size is the
*global* batch: every rank draws the same batch of step ``s`` and trains on its
contiguous slice; the loss is a mean over the slice, so DDP's average of the ranks'
gradients is the whole batch's gradient.  The VQ codebook, which is not trained by
gradients but kept as moving averages in the forward pass, pools the assignment
statistics of all ranks (:meth:`dalle.dvae.VectorQuantizer.update_codebook`), so the
loss curve, weights and codebook follow a one-process run with the same batch up to
float rounding.  The Gumbel quantiser's noise is drawn per rank (a one-process run
draws it for the whole batch at once, which the slices cannot reproduce), so there a
run on ``N`` processes is a different sample of the same training, not the same one.
Rank 0 writes the logs (of the whole batch), checkpoints (full tensors, loadable at
any world size), sample grids and export.

``minutes``: the schedules need the total number of steps up front, so a time budget
is turned into a step count before the first step, by timing a few forward/backward
passes on a throw-away copy of the model (the real run's random stream is not
touched) and keeping 8% of the budget for evaluation, checkpoints and export.  The
count is stored in the checkpoints, so a resumed run keeps the schedules it started
with.  The budget is also a deadline for the whole run, resumes included: past it the
loop stops, checkpoints and exports even if the machine got slower than the estimate
(the schedules then end early, not annealed).

Validation: the last items of the data set (:func:`dalle.training.state.validation_split`,
the same items the transformer and CLIP stages hold out) never enter a batch.  Every
``sample_every`` steps the weight average reconstructs them and as many training items;
both PSNRs and code uses are logged, and the finished run writes a fit report
(``logs/dvae_fit.json``, :func:`diagnose_dvae`): codebook collapse, blurry
reconstructions, memorised training images.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from dalle.config import DalleConfig
from dalle.data.preprocess import (PAPER_CROP_SCALE, crop_resize, derive_seed, make_generator, random_crop_box,
                                   to_tensor)
from dalle.dvae import (DiscreteVAE, VectorQuantizer, code_statistics, histogram_statistics,
                        psnr_from_mse)
from dalle.training import distributed as dd
from dalle.training.distributed import DistInfo
from dalle.training.state import (EMA, Checkpointer, CsvLog, Diagnosis, NonFiniteGuard, budget_deadline, cosine,
                                  holdout, resumed_progress, spread, steps_in_budget, time_per_step, warmup_cosine,
                                  write_fit_report)
from dalle.training.tensorboard import log_image

TEMPERATURE_START = 1.0
TEMPERATURE_END = 1.0 / 16  # the paper's final temperature
LR_END_RATIO = 1.25e-6 / 1e-4  # the paper's step size ends at 1/80 of its start
LR_WARMUP_FRACTION = 0.02
ADAM_BETAS = (0.9, 0.999)
WEIGHT_DECAY = 1e-4
CHECKPOINT_EVERY = 500
NOISE_STREAM = 29  # mixes into the seeds of each rank's Gumbel noise (data-parallel runs only)
EVAL_ITEMS = 64  # training items evaluated when nothing is held out

# Fit report thresholds (diagnose_dvae).
# Below 20 dB the RMS error exceeds a tenth of the pixel range: edges and small objects are
# lost (on the shapes set a healthy VQ dVAE reaches 30-33 dB, see benchmarks/results/bench_dvae.txt).
BLURRY_PSNR_DB = 20.0
# Blur judged against the data itself, since a fixed dB figure means different things on
# different images (a 15k-icon set at 20.9 dB was visibly blurry, yet above the 20 dB line):
# * edge retention (:func:`edge_retention`): how much of the held-out images' pixel-to-pixel
#   gradients the reconstructions keep.  On 256 pictures of /work/realdata (icons, stamps,
#   flags) a Gaussian blur of sigma 0.5 px keeps 0.80 (28.7 dB, hard to see), sigma 0.7 0.61
#   (22.8 dB, visibly soft) and sigma 1.0 0.43 (19.3 dB); under 0.7 the blur shows.  The
#   bundled shapes dVAE keeps 0.85 on 128 shapes validation images (32.8 dB).
# * the gain over shrinking each image to the token grid and back (bilinear, the cheapest
#   "reconstruction" at the same grid): a dVAE within 3 dB of it adds little to a blur
#   (on that set: 11.5 dB at 8x8, 14.1 dB at 16x16).
EDGE_RETENTION_MIN = 0.7
BASELINE_GAIN_MIN_DB = 3.0
# 3 dB is twice the squared error: the dVAE reconstructs its training images much better
# than unseen ones, so the transformer will be trained on tokens unseen images do not get.
MEMORISING_PSNR_GAP_DB = 3.0
# Codes used, as a share of what the evaluated tokens could use (min(K, tokens)): the healthy
# VQ run of bench_dvae.txt uses 98% of 512 codes on 256 shapes images, the Gumbel run that
# reconstructs only half the judged images 21%.  Judged only with 2 tokens a code or more:
# fewer images cannot show a healthy codebook's spread.
COLLAPSE_SHARE = 0.25
COLLAPSE_MIN_TOKENS_PER_CODE = 2


# --- batches -----------------------------------------------------------------------------


def crop_box(image: Image.Image, image_size: int, generator: torch.Generator) -> tuple[int, int, int, int] | None:
    """The random crop of an item's image (None: used whole), drawn from ``generator``.

    Images already of the model's size (the shapes set) are used as they are, drawing
    nothing: a crop would cut objects.  Others get the paper's random square crop.
    """
    if image.size == (image_size, image_size):
        return None
    return random_crop_box(image.width, image.height, PAPER_CROP_SCALE, generator)


def image_tensor(image: Image.Image, image_size: int, generator: torch.Generator) -> Tensor:
    """An item's PIL image -> ``[3, S, S]`` in [0, 1]: :func:`crop_box`, resized."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    box = crop_box(image, image_size, generator)
    return to_tensor(image if box is None else crop_resize(image, box, image_size))


def batch_for_step(
    dataset: Any, seed: int, step: int, batch_size: int, image_size: int, info: DistInfo | None = None,
    n_train: int | None = None,
) -> Tensor:
    """The training batch of step ``step``: a function of ``(seed, step)`` only.

    Items are drawn from the first ``n_train`` of ``dataset`` (default: all; the rest is
    the validation split).

    With ``info`` of several processes ``batch_size`` is the global batch and this rank's
    contiguous slice of it is returned.  The items' crops share one random stream, so the
    items before the slice are read to replay their crops' draws (not cropped, resized or
    converted) and the items after it are not read at all: the slices of all ranks put
    together are exactly the one-process batch.
    """
    g = make_generator(seed, step)
    indices = torch.randint(len(dataset) if n_train is None else n_train, (batch_size,), generator=g).tolist()
    if info is None or not info.distributed:
        return torch.stack([image_tensor(dataset[i].image, image_size, g) for i in indices])
    start, stop = dd.shard_bounds(batch_size, info)
    images = []
    for place, i in enumerate(indices[:stop]):
        image = dataset[i].image
        if place < start:
            crop_box(image, image_size, g)  # another rank's item: only advance the stream past it
        else:
            images.append(image_tensor(image, image_size, g))
    return torch.stack(images)


def fixed_images(dataset: Any, n: int, image_size: int) -> Tensor:
    """The first ``n`` images of ``dataset`` (for evaluation and sample grids)."""
    n = min(n, len(dataset))
    g = make_generator(0)
    return torch.stack([image_tensor(dataset[i].image, image_size, g) for i in range(n)])


def images_at(dataset: Any, indices: Any, image_size: int) -> Tensor:
    """The images of ``dataset[indices]``, each with a fixed crop of its own (the same at every call)."""
    return torch.stack([image_tensor(dataset[i].image, image_size, make_generator(0, i)) for i in indices])


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


def grid_baseline(images: Tensor, grid: int) -> Tensor:
    """Each image shrunk to ``grid`` x ``grid`` (area average) and enlarged back (bilinear): what the
    token grid's resolution alone keeps, the yardstick of a dVAE's reconstructions."""
    small = F.interpolate(images, size=(grid, grid), mode="area")
    return F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)


def _gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def edge_sums(recon: Tensor, images: Tensor) -> tuple[float, float]:
    """``(sum of recon-gradient . image-gradient, sum of image-gradient^2)``: see :func:`edge_retention`."""
    (rx, ry), (ix, iy) = _gradients(recon.double()), _gradients(images.double())
    return float((rx * ix).sum() + (ry * iy).sum()), float((ix * ix).sum() + (iy * iy).sum())


def edge_retention(recon: Tensor, images: Tensor) -> float:
    """Share of the images' edges the reconstructions keep: their pixel-to-pixel gradients projected
    on the originals', over the originals' energy.  1 for a perfect copy, near 0 for a flat blur;
    noise or artefacts do not raise it (they are uncorrelated with the true edges)."""
    dot, energy = edge_sums(recon, images)
    return dot / energy if energy > 0 else 1.0


@torch.no_grad()
def reconstruction_figures(model: DiscreteVAE, dataset: Any, indices: Any, batch: int = 64) -> dict[str, Any]:
    """PSNR (dB, all pixels pooled) and the code histogram of the hard reconstructions of ``dataset[indices]``.

    Read ``batch`` images at a time, so a large validation split at a large image size is
    never held in memory at once.  Returns ``psnr``, ``usage`` (fraction of the codebook
    used), ``counts`` (``[K]`` code counts), ``edge_retention`` (:func:`edge_retention`) and
    ``baseline_psnr`` (of :func:`grid_baseline` at the dVAE's token grid, on the same images).
    """
    indices = list(indices)
    size, k = model.config.image_size, model.codebook_size
    was_training = model.training
    model.eval()
    squared, base_squared, pixels, counts = 0.0, 0.0, 0, torch.zeros(k)
    edge_dot, edge_energy = 0.0, 0.0
    try:
        for start in range(0, len(indices), batch):
            images = images_at(dataset, indices[start:start + batch], size)
            recon, tokens = reconstruct(model, images, batch)
            squared += float((recon - images).pow(2).sum(dtype=torch.float64))
            base_squared += float((grid_baseline(images, model.grid_size) - images).pow(2).sum(dtype=torch.float64))
            dot, energy = edge_sums(recon, images)
            edge_dot, edge_energy = edge_dot + dot, edge_energy + energy
            pixels += images.numel()
            counts += torch.bincount(tokens.flatten(), minlength=k).float()
    finally:
        model.train(was_training)
    mse = torch.tensor(squared / max(pixels, 1))
    base_mse = torch.tensor(base_squared / max(pixels, 1))
    return {"psnr": float(psnr_from_mse(mse)), "usage": float((counts > 0).float().mean()), "counts": counts,
            "edge_retention": edge_dot / edge_energy if edge_energy > 0 else 1.0,
            "baseline_psnr": float(psnr_from_mse(base_mse))}


def diagnose_dvae(*, train_psnr: float, val_psnr: float | None, codes_used: int, tokens: int,
                  codebook_size: int, edge_retention: float | None = None, baseline_psnr: float | None = None,
                  grid: int | None = None, image_size: int | None = None) -> list[Diagnosis]:
    """What the final evaluation of a dVAE run says, in plain words (empty when all looks fine).

    ``train_psnr`` / ``val_psnr``: dB on training items and on the validation items (None
    when nothing was held out); ``codes_used`` of ``codebook_size``: distinct codes among
    the ``tokens`` of all evaluated images.  ``edge_retention`` and ``baseline_psnr``
    (:func:`reconstruction_figures`, on the images the PSNR shown is of) judge blur against
    the data itself; ``grid`` and ``image_size`` let the advice name a finer grid.
    Thresholds: the module's constants.
    """
    found = []
    available = min(codebook_size, tokens)
    if tokens >= COLLAPSE_MIN_TOKENS_PER_CODE * codebook_size and codes_used < COLLAPSE_SHARE * available:
        found.append(Diagnosis("codebook_collapse", f"dVAE codebook collapse: {codes_used} of {codebook_size} codes "
                               f"({codes_used / codebook_size:.0%}) used on {tokens} image tokens, so the transformer "
                               "gets few distinct tokens -- the VQ quantiser (it restarts dead codes), a smaller "
                               "codebook or a longer run would help"))
    shown, where = (val_psnr, "validation") if val_psnr is not None else (train_psnr, "training")
    reasons = []
    if shown < BLURRY_PSNR_DB:
        reasons.append(f"below {BLURRY_PSNR_DB:.0f} dB (an RMS error over a tenth of the pixel range)")
    if edge_retention is not None and edge_retention < EDGE_RETENTION_MIN:
        reasons.append(f"keeping {edge_retention:.0%} of the images' edges (sharp-looking reconstructions keep "
                       f"over {EDGE_RETENTION_MIN:.0%})")
    if baseline_psnr is not None and shown - baseline_psnr < BASELINE_GAIN_MIN_DB:
        at = f"{grid}x{grid} " if grid else ""
        reasons.append(f"only {shown - baseline_psnr:+.1f} dB over shrinking each image to the {at}token grid and "
                       f"back ({baseline_psnr:.1f} dB)")
    if reasons:
        wider = "a wider dVAE (--set dvae.hidden_width=64), a larger codebook or a longer run"
        if grid and image_size and image_size // grid >= 8:
            # 8x down-sampling (the paper's 256 -> 32) leaves too few tokens for the detail of small
            # real pictures; 4x costs the transformer 4x the tokens, which it can afford at 64-128 px.
            groups = round(math.log2(image_size // grid)) + 1
            preset = ", as the small-64 preset does" if image_size == 64 else ""
            advice = (f"pick a finer token grid (--set dvae.num_groups={groups - 1} halves the down-sampling: "
                      f"{2 * grid}x{2 * grid} tokens at {image_size} px{preset}) or {wider}")
        else:
            advice = f"pick {wider}"
        found.append(Diagnosis("blurry", f"dVAE reconstructions blurry: PSNR {shown:.1f} dB on {where} images, "
                               + "; ".join(reasons) + f" -- {advice}"))
    if val_psnr is not None and train_psnr - val_psnr >= MEMORISING_PSNR_GAP_DB:
        found.append(Diagnosis("memorising", f"dVAE memorising: reconstructs training images at {train_psnr:.1f} dB "
                               f"but unseen ones at {val_psnr:.1f} dB -- more data or fewer steps would help"))
    return found


def save_grid(images: Tensor, recons: Tensor, path: Path) -> None:
    """Originals on the top row, reconstructions below, as one PNG."""
    both = torch.cat([images, recons])  # [2n, 3, H, W]
    n, (_, h, w) = len(images), images.shape[1:]
    grid = both.reshape(2, n, 3, h, w).permute(0, 3, 1, 4, 2).reshape(2 * h, n * w, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.clamp(0, 1) * 255).round().byte().numpy()).save(path)


# --- the loop ------------------------------------------------------------------------------


def schedules(step: int, total: int, peak_lr: float, kl_weight: float, temperature_fraction: float = 0.05,
              kl_warmup_fraction: float = 0.05) -> dict[str, float]:
    """Learning rate, Gumbel temperature and KL weight of step ``step`` of a ``total``-step run.

    All cosine (module docstring): the step size from ``peak_lr`` (after a 2% linear
    warm-up) to ``peak_lr * LR_END_RATIO`` at ``total``; the temperature from 1 to 1/16
    over ``temperature_fraction`` of the run; the KL weight from 0 to ``kl_weight`` over
    ``kl_warmup_fraction`` of it.
    """
    return {
        "lr": warmup_cosine(step, total, max(1, int(LR_WARMUP_FRACTION * total)), peak_lr, peak_lr * LR_END_RATIO),
        "temperature": cosine(step, int(temperature_fraction * total), TEMPERATURE_START, TEMPERATURE_END),
        "kl_weight": cosine(step, int(kl_warmup_fraction * total), 0.0, kl_weight),
    }


def estimate_steps(model: DiscreteVAE, images: Tensor, minutes: float, autocast: Any) -> tuple[int, float]:
    """Steps that fit in ``minutes``, timed on a copy of the model (random states untouched).

    Call it before :func:`data_parallel_quantizer`: the probe must not talk to other ranks.
    """
    probe = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-9)

    def step() -> None:
        with autocast:
            out = probe(images, temperature=1.0, kl_weight=0.0)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    per_step = time_per_step(step, repeats=5, device=images.device)
    return steps_in_budget(minutes, per_step), per_step


# ``loss`` and the batch metrics: the logged step's; ``mean_loss``: the mean loss over the steps
# since the previous row; ``val_``/``train_psnr`` and ``_usage``: the weight average on the
# validation items and on as many training items; ``eval_psnr``/``eval_usage`` repeat the
# validation figures for older readers (empty when nothing is held out).
CSV_FIELDS = ["step", "loss", "nll", "kl", "commitment", "mse", "psnr", "perplexity", "usage",
              "temperature", "kl_weight", "lr", "seconds", "eval_psnr", "eval_usage", "mean_loss",
              "val_psnr", "train_psnr", "val_usage", "train_usage"]  # fmt: skip
MEAN_METRICS = ("nll", "kl", "commitment", "mse")  # batch means: the global one is the mean over ranks


def data_parallel_quantizer(model: DiscreteVAE, device: torch.device) -> torch.Generator | None:
    """Make the quantiser of ``model`` train on one slice of the batch per rank.

    VQ: the codebook statistics are pooled over ranks (one codebook everywhere).  Gumbel:
    each rank gets a noise generator of its own, returned for the loop to seed each step
    (from the seed, step and rank: exact resume needs no state).  None for VQ.
    """
    if isinstance(model.quantizer, VectorQuantizer):
        model.quantizer.data_parallel = True
        return None
    noise = torch.Generator(device=device)
    model.quantizer.generator = noise
    return noise


def reduce_metrics(out: Any, info: DistInfo, codebook_size: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The whole batch's loss and metrics from each rank's slice (one all-reduce; as they are on one process).

    Means over equal slices average to the whole batch's mean; the PSNR is recomputed
    from the mean squared error and the code use from the pooled code histogram.
    """
    if not info.distributed:
        return out.loss, out.metrics
    names = [k for k in MEAN_METRICS if k in out.metrics]
    counts = torch.bincount(out.tokens.flatten(), minlength=codebook_size).float()
    means = torch.stack([out.loss.detach().float()] + [out.metrics[k].float() for k in names])
    packed = dd.all_reduce_sum(torch.cat([means, counts]), info)
    means = packed[: len(means)] / info.world_size
    metrics = dict(out.metrics, **dict(zip(names, means[1:])))
    metrics["psnr"] = psnr_from_mse(metrics["mse"])
    metrics["perplexity"], metrics["usage"] = histogram_statistics(packed[len(means) :])
    return means[0], metrics


def _check_strategy(strategy: str, info: DistInfo) -> None:
    if strategy not in dd.STRATEGIES:
        raise ValueError(f"strategy must be one of {dd.STRATEGIES}, got {strategy!r}")
    if strategy == "fsdp" and info.distributed and info.is_main:
        # Sharding pays for models that do not fit one device; the dVAE is small.
        warnings.warn("the dVAE trains data-parallel with DDP; strategy 'fsdp' applies to the transformer only",
                      stacklevel=3)


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
    strategy: str = "ddp",
    val_items: int | None = None,
) -> Path:
    """Train the dVAE of ``config`` on ``dataset`` (items with ``.image``); return ``out_dir/"dvae"``.

    ``steps`` (default ``config.train.dvae_steps``) sets the schedules' length; with
    ``minutes`` alone the step count is estimated from a timing probe (module
    docstring), with both it is the smaller of the two.  Validation: the last
    ``val_items`` items of ``dataset`` (default: the config's split,
    :func:`dalle.training.state.validation_split`) are held out of training;
    ``eval_dataset`` instead gives a separate validation set (then nothing is held out).
    They feed the sample grids, the logged validation PSNR and the fit report
    (``logs/dvae_fit.json``, printed too) that a finished run writes.  ``stop_after``
    ends the run early after that many steps, checkpointed, as an interruption would
    (for tests); ``resume`` continues from the newest checkpoint in ``out_dir``.

    Under ``torchrun`` every rank calls this: the run is data-parallel over the job's
    processes (``device`` "cuda" becomes each rank's own GPU) and ``config.train.dvae_batch``
    is the global batch, divisible by the number of processes.  ``strategy``: "ddp"; the
    dVAE is small, so "fsdp" (accepted for a command line shared with the transformer)
    trains with DDP too, with a warning.
    """
    out_dir = Path(out_dir)
    dcfg, tcfg = config.dvae, config.train
    seed = tcfg.seed if seed is None else seed
    if len(dataset) == 0:
        raise ValueError("the dVAE training set is empty; point --data at a folder of images")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if minutes is not None and minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    info = dd.init_distributed(device)
    _check_strategy(strategy, info)
    device, main = info.device, info.is_main
    if eval_dataset is not None and val_items is not None:
        raise ValueError("give eval_dataset (a separate validation set) or val_items (held out of the data set), "
                         "not both")
    if eval_dataset is None:
        n_train, val_indices = holdout(len(dataset), tcfg, val_items, "dvae", warn=main)
        val_data = dataset
    else:
        n_train, val_data, val_indices = len(dataset), eval_dataset, range(min(len(eval_dataset), tcfg.val_max))
    train_probe = spread(n_train, len(val_indices) or EVAL_ITEMS)  # as many training items as validation ones
    batch_size, size = tcfg.dvae_batch, dcfg.image_size
    if batch_size % info.world_size:
        raise ValueError(f"dvae_batch={batch_size} must be divisible by the {info.world_size} processes "
                         "(each trains on an equal slice of the batch)")
    shard = info if info.distributed else None
    # bf16 autocast on CUDA (the likelihood and quantiser statistics stay in fp32).
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    start_time = time.perf_counter()

    torch.manual_seed(seed)  # the same on every rank: same weights, and random streams in step
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

    # Every rank restores the same checkpoint (full tensors and rank 0's random states).
    step, total, elapsed_before = 0, None, 0.0
    window_sum, window_count = 0.0, 0  # the losses of the steps since the last logged row
    restored = None
    if resume:
        restored = checkpointer.load_latest({"model": model, "ema": ema.module}, {"optimizer": optimizer})
        step, total, elapsed_before, (window_sum, window_count) = resumed_progress(
            restored, steps, checkpointer.folder, warn=main)
    if total is None:
        total = steps if steps is not None else tcfg.dvae_steps
        if minutes is not None:  # timed by rank 0 on its slice, then shared
            fit = None
            if main:
                probe_images = batch_for_step(dataset, seed, 0, batch_size, size, shard, n_train).to(device)
                fit, per_step = estimate_steps(model, probe_images, minutes, autocast)
                fit = fit if steps is None else min(steps, fit)
                print(f"dvae: {per_step:.3f} s a step -> {fit} steps in {minutes:g} minutes")
            total = int(dd.broadcast_object(fit, info))
    # The budget covers the whole run, a resumed one included (at least one step is taken).
    deadline = budget_deadline(minutes, start_time, elapsed_before)
    end = total if stop_after is None else min(total, stop_after)

    # Data parallel: train through DDP's wrapper (its forward arms the gradient averaging).
    # Buffers are not broadcast from rank 0 at each forward: the VQ codebook is updated in
    # the forward pass from statistics pooled over the ranks, so every rank already holds
    # rank 0's codebook; a broadcast would cost a copy a step and mask a drift that the
    # final check_replicas_identical is there to catch.
    wrapped = model
    noise = None
    if info.distributed:
        wrapped = dd.wrap_model(model, info, "ddp", broadcast_buffers=False)
        if restored is None:  # the wrapper started every replica from rank 0's weights; so does the average
            ema.module.load_state_dict(model.state_dict())
        noise = data_parallel_quantizer(model, device)

    log_path = out_dir / "logs" / "dvae.csv"
    log: CsvLog | None = None
    if main:
        log = CsvLog(log_path, CSV_FIELDS, step if resume else None)
        sample_images = (images_at(val_data, val_indices[:8], size) if val_indices
                         else images_at(dataset, train_probe[:8], size))
    last_fit: dict[str, Any] | None = None  # the newest evaluation (rank 0)

    def evaluate_fit() -> dict[str, Any]:
        """Reconstruction figures of the weight average on the training probe and the validation items."""
        train = reconstruction_figures(ema.module, dataset, train_probe)
        entry: dict[str, Any] = {"step": step, "train_psnr": round(train["psnr"], 3),
                                 "train_usage": round(train["usage"], 4), "val_psnr": None, "val_usage": None}
        counts = train["counts"]
        shown = train
        if val_indices:
            val = reconstruction_figures(ema.module, val_data, val_indices)
            entry.update(val_psnr=round(val["psnr"], 3), val_usage=round(val["usage"], 4))
            counts = counts + val["counts"]
            shown = val
        # Blur against the data: on the validation images (the training probe when none are held out).
        entry.update(edge_retention=round(shown["edge_retention"], 4),
                     baseline_psnr=round(shown["baseline_psnr"], 3))
        entry.update(codes_used=int((counts > 0).sum()), tokens=int(counts.sum()))
        return entry

    time_up = False
    bar = _progress(step, end, progress and main)
    try:
        while step < end:
            s = schedules(step, total, tcfg.dvae_lr, dcfg.kl_weight, tcfg.dvae_temperature_fraction,
                          tcfg.dvae_kl_warmup_fraction)
            for group in optimizer.param_groups:
                group["lr"] = s["lr"]
            images = batch_for_step(dataset, seed, step, batch_size, size, shard).to(device)
            images = images.contiguous(memory_format=torch.channels_last)
            if noise is not None:
                noise.manual_seed(derive_seed(seed, step, NOISE_STREAM, info.rank))
            with autocast:
                out = wrapped(images, temperature=s["temperature"], kl_weight=s["kl_weight"])
            loss, metrics = reduce_metrics(out, info, dcfg.codebook_size)  # the whole batch's
            optimizer.zero_grad(set_to_none=True)
            if guard.check(loss):  # the same decision on every rank: the loss is the batch's
                out.loss.backward()
                optimizer.step()
                # Bias-corrected warm-up of the average: early weights are forgotten fast.
                ema.decay = min(tcfg.ema_decay, (1 + step) / (10 + step))
                ema.update(model)
                window_sum += float(loss.detach())
                window_count += 1
            step += 1
            time_up = step < end and time.perf_counter() > deadline
            if info.distributed and math.isfinite(deadline):
                time_up = dd.any_rank(time_up, info)  # every rank must stop at the same step
            last = step == end or time_up

            if step % log_every == 0 or step % sample_every == 0 or last or step == 1:  # code use from step 1
                row = {k: round(float(v), 5) for k, v in metrics.items() if k in CSV_FIELDS}
                row.update(step=step, loss=round(float(loss.detach()), 5), seconds=round(
                    elapsed_before + time.perf_counter() - start_time, 1), **{k: round(v, 6) for k, v in s.items()})
                row["mean_loss"] = round(window_sum / window_count, 5) if window_count else ""
                window_sum, window_count = 0.0, 0
                if step % sample_every == 0 or last:
                    if main:
                        last_fit = evaluate_fit()
                        row.update({k: last_fit[k] for k in ("train_psnr", "train_usage")})
                        if val_indices:
                            row["val_psnr"] = row["eval_psnr"] = last_fit["val_psnr"]
                            row["val_usage"] = row["eval_usage"] = last_fit["val_usage"]
                        grid_path = out_dir / "samples" / f"dvae_step{step:06d}.png"
                        save_grid(sample_images, reconstruct(ema.module, sample_images)[0], grid_path)
                        log_image(out_dir / "logs", "dvae", "reconstructions", grid_path, step)
                    dd.barrier(info)
                if log is not None:
                    log.write(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", psnr=f"{row['psnr']:.1f}",
                                    codes=f"{row['usage']:.2f}", tau=f"{s['temperature']:.2f}")
            if bar is not None:
                bar.update(1)
            if step % checkpoint_every == 0 or last:
                extra = {"total_steps": total, "seed": seed, "world_size": info.world_size,
                         "seconds": elapsed_before + time.perf_counter() - start_time,
                         "window_loss": [window_sum, window_count]}
                if main:  # full tensors of the plain model: loadable at any world size
                    checkpointer.save(step, {"model": model, "ema": ema.module}, {"optimizer": optimizer}, extra)
                dd.barrier(info)
            if time_up:
                if main:
                    warnings.warn(f"time budget spent at step {step} of {total}; stopping early", stacklevel=2)
                break
    finally:
        if log is not None:
            log.close()
        if bar is not None:
            bar.close()

    export = out_dir / "dvae"
    if main and (step >= total or time_up):  # an interrupted run (stop_after) is not exported
        ema.module.float().save_pretrained(export)
        if last_fit is None or last_fit["step"] != step:
            last_fit = evaluate_fit()
        _fit_report(out_dir, last_fit, n_train=n_train, n_val=len(val_indices), n_probe=len(train_probe),
                    codebook_size=dcfg.codebook_size, grid=dcfg.grid_size, image_size=dcfg.image_size)
    dd.barrier(info)
    # Replicated weights and codebooks must agree bit for bit; a drift is a bug worth reporting loudly.
    dd.check_replicas_identical(model, info, "dVAE")
    dd.check_replicas_identical(ema.module, info, "dVAE weight average")
    return export


def _fit_report(out_dir: Path, fit: dict[str, Any], *, n_train: int, n_val: int, n_probe: int,
                codebook_size: int, grid: int | None = None, image_size: int | None = None) -> Path:
    """Diagnose the run from its final evaluation; write ``logs/dvae_fit.json`` and print it."""
    diagnoses = diagnose_dvae(train_psnr=fit["train_psnr"], val_psnr=fit["val_psnr"], codes_used=fit["codes_used"],
                              tokens=fit["tokens"], codebook_size=codebook_size,
                              edge_retention=fit.get("edge_retention"), baseline_psnr=fit.get("baseline_psnr"),
                              grid=grid, image_size=image_size)
    codes = f"{fit['codes_used']} of {codebook_size} codes used"
    if fit["val_psnr"] is None:
        summary = (f"PSNR {fit['train_psnr']:.2f} dB on {n_probe} training images, {codes}, at step {fit['step']} "
                   f"({n_train} training images; none held out for validation)")
    else:
        summary = (f"PSNR {fit['val_psnr']:.2f} dB on {n_val} validation images, {fit['train_psnr']:.2f} dB on "
                   f"{n_probe} training images, {codes}, at step {fit['step']} ({n_train} training images)")
    if fit.get("edge_retention") is not None:
        summary += (f"; {fit['edge_retention']:.0%} of the edges kept, against {fit['baseline_psnr']:.1f} dB for "
                    "shrinking to the token grid and back")
    figures = {"train_items": n_train, "val_items": n_val, "codebook_size": codebook_size, **fit}
    return write_fit_report(out_dir, "dvae", summary, figures, diagnoses)


def _progress(start: int, total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="dvae", dynamic_ncols=True)

