"""The discrete VAE that turns an image into a grid of tokens, and back.

Follows the paper (Ramesh et al. 2021, section 2.1 and appendix A) and the shape
of OpenAI's released dVAE:

* encoder: 7x7 input conv, ``num_groups`` groups of bottleneck residual blocks
  (ReLU-conv3x3 x3 at a quarter of the block's width, then a 1x1 conv back) with a
  2x max-pool between groups, then ReLU + 1x1 conv to logits over the codebook;
* decoder: 1x1 conv over the (soft) one-hot code to ``decoder_init_width`` channels
  (128 in the released dVAE), groups of residual blocks (the first one widening to the
  group's width with a 1x1 conv on its identity path) with nearest-neighbour 2x
  up-sampling between groups, then ReLU + 1x1 conv to six channels: the location and
  log-scale of a logit-Laplace distribution for each of R, G, B (pixels mapped into
  [0.1, 0.9] first, ``PIXEL_EPS``);
* every residual branch is multiplied by ``1 / n_layers**2`` (``n_layers`` = the
  number of residual blocks of the encoder or decoder) so that the network starts
  close to its identity path, and convolutions start as the released dVAE's
  (N(0, 1/fan_in) weights, zero biases: see :func:`init_conv` for why it matters).

Two quantisers are selectable with ``DVAEConfig.quantizer``:

``"gumbel"``
    The paper's: the encoder's logits parametrise a categorical posterior; training
    feeds the decoder a Gumbel-softmax relaxation of a sample (temperature given by
    the training loop) and adds the KL divergence to the uniform prior; inference
    takes the argmax, with no noise.  ``straight_through=True`` feeds the decoder the
    one-hot sample instead (gradient through the relaxation).
``"vq"``
    VQ-VAE (van den Oord et al. 2017) for comparison: nearest codebook vector,
    straight-through gradient, commitment loss, codebook kept as exponential moving
    averages of the encoder outputs assigned to each code, and codes that fall out
    of use restarted from encoder outputs of the current batch.

The objective is ELBO-shaped and normalised per pixel channel::

    loss = [ sum_pixels NLL(x | z) + kl_weight * sum_grid KL(q(z|x) || uniform) ] / (3 H W)

i.e. the paper's per-image ELBO (reconstruction summed over pixels, KL summed over
the grid) divided by the number of pixel channels.  Dividing both terms by the same
number keeps the paper's ratio between them, so with the logit-Laplace likelihood
``kl_weight`` is the paper's beta (6.6 at the end of its warm-up) at any image size.
``recon_loss="mse"`` replaces the NLL by the mean squared error of the decoded
median (on [0, 1] pixels), a Gaussian of fixed scale; its nats are far smaller, so
beta is on another scale there (the shapes preset uses 0.2).  On the shapes set
(mostly black, flat objects) the learned per-pixel scale of the logit-Laplace makes
the background ever sharper and the objects ever cheaper to ignore; the MSE
weighs every pixel alike (measurements in the shapes preset, dalle/config.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle.config import DVAEConfig

# Pixels are squeezed into [eps, 1 - eps] before the logit-Laplace likelihood, whose
# density is undefined at exactly 0 and 1 (paper, section A.3).
PIXEL_EPS = 0.1
# VQ-VAE constants (van den Oord et al. 2017; Razavi et al. 2019 for the EMA form).
VQ_COMMITMENT = 0.25
VQ_EMA_DECAY = 0.99
# A code's EMA count estimates how many positions of a batch pick it.  Below
# VQ_DEAD_CODE_COUNT it is dead and restarted with count VQ_RESTART_COUNT, so an unused
# restarted code is tried again after log(DEAD/RESTART)/log(decay) ~ 160 steps.
VQ_DEAD_CODE_COUNT = 0.1
VQ_RESTART_COUNT = 0.5


def map_pixels(x: Tensor, eps: float = PIXEL_EPS) -> Tensor:
    """[0, 1] -> [eps, 1 - eps], the support on which the logit-Laplace is evaluated."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: Tensor, eps: float = PIXEL_EPS) -> Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0.0, 1.0)


def logit_laplace_nll(x: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """Element-wise negative log-density of the logit-Laplace distribution.

    ``x`` lies in (0, 1) (already :func:`map_pixels`-ed); ``loc`` and ``log_scale``
    are the Laplace parameters in logit space.  The density is
    ``exp(-|logit(x) - loc| / b) / (2 b x (1 - x))``.
    """
    logit_x = torch.log(x) - torch.log1p(-x)
    return (
        math.log(2.0)
        + log_scale
        + torch.log(x)
        + torch.log1p(-x)
        + (logit_x - loc).abs() * torch.exp(-log_scale)
    )


@dataclass
class DVAEOutput:
    """What :meth:`DiscreteVAE.forward` returns.

    ``metrics`` holds detached scalar tensors (no device sync until read):
    ``nll`` (per pixel channel), ``kl`` (nats per grid position), ``mse``, ``psnr``
    (of the decoded median), ``perplexity`` and ``usage`` (fraction of the codebook
    chosen by at least one position of the batch) and, for VQ, ``commitment``.
    ``tokens``: the code each grid position chose ``[B, g, g]`` (the posterior's argmax
    for Gumbel), from which data-parallel training pools the code use of a whole batch.
    """

    loss: Tensor
    recon: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    tokens: Tensor | None = None


# --- Building blocks ---------------------------------------------------------------------


class EncoderBlock(nn.Module):
    """Bottleneck residual block: ReLU-conv3x3 x3 at width ``n_out/4``, then a 1x1 conv back."""

    def __init__(self, n_in: int, n_out: int, post_gain: float):
        super().__init__()
        n_hid = max(n_out // 4, 1)
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(n_in, n_hid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_out, 1),
        )
        self.post_gain = post_gain

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(nn.Module):
    """Mirror of :class:`EncoderBlock`: a 1x1 conv into the bottleneck, then ReLU-conv3x3 x3."""

    def __init__(self, n_in: int, n_out: int, post_gain: float):
        super().__init__()
        n_hid = max(n_out // 4, 1)
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(n_in, n_hid, 1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_out, 3, padding=1),
        )
        self.post_gain = post_gain

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def init_conv(module: nn.Module) -> None:
    """The released dVAE's initialisation: N(0, 1/fan_in) weights, zero biases.

    It keeps activations at the scale of the input through the network (PyTorch's
    default shrinks them about 3x in variance a layer and adds random biases), so at
    the start the encoder's logits already depend on the image rather than on the
    biases alone; with the default, every position picks the same few codes.  (At
    hidden width 16 on shapes images: logits vary over positions by 0.006 against
    biases of 0.05, 4 codes chosen; with this initialisation 0.10, 22 codes.)
    """
    if isinstance(module, nn.Conv2d):
        fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        nn.init.normal_(module.weight, std=1.0 / math.sqrt(fan_in))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def group_widths(config: DVAEConfig) -> list[int]:
    """Width of each encoder group, full resolution first (the decoder uses them reversed)."""
    return [config.hidden_width * m for m in config.width_multipliers]


class Encoder(nn.Module):
    """Image ``[B, 3, H, W]`` (mapped pixels) -> ``[B, out_channels, H/d, W/d]``."""

    def __init__(self, config: DVAEConfig, out_channels: int):
        super().__init__()
        widths = group_widths(config)
        post_gain = 1.0 / (config.num_groups * config.blocks_per_group) ** 2
        layers: list[nn.Module] = [nn.Conv2d(config.channels, widths[0], 7, padding=3)]
        n_in = widths[0]
        for g, width in enumerate(widths):
            for _ in range(config.blocks_per_group):
                layers.append(EncoderBlock(n_in, width, post_gain))
                n_in = width
            if g < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.ReLU(), nn.Conv2d(n_in, out_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Code ``[B, in_channels, g, g]`` -> logit-Laplace parameters ``[B, 6, H, W]``."""

    def __init__(self, config: DVAEConfig, in_channels: int):
        super().__init__()
        widths = group_widths(config)[::-1]
        post_gain = 1.0 / (config.num_groups * config.blocks_per_group) ** 2
        # The released dVAE's 1x1 input convolution: one-hot codes (or VQ code vectors) to
        # ``decoder_init_width`` channels; 0 keeps the layout of older folders (straight to
        # the first group's width).
        n_init = config.decoder_init_width or widths[0]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, n_init, 1)]
        n_in = n_init
        for g, width in enumerate(widths):
            for _ in range(config.blocks_per_group):
                layers.append(DecoderBlock(n_in, width, post_gain))
                n_in = width
            if g < len(widths) - 1:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        layers += [nn.ReLU(), nn.Conv2d(n_in, 2 * config.channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


# --- Quantisers ----------------------------------------------------------------------------


def code_statistics(tokens: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """Perplexity of the code histogram and the fraction of codes used, over ``tokens``."""
    return histogram_statistics(torch.bincount(tokens.flatten(), minlength=codebook_size).float())


def histogram_statistics(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Perplexity and fraction of codes used of a code histogram ``counts [K]`` (float)."""
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return entropy.exp(), (counts > 0).float().mean()


class GumbelQuantizer(nn.Module):
    """Categorical posterior over the codebook, relaxed with Gumbel-softmax while training."""

    def __init__(self, codebook_size: int, straight_through: bool = False):
        super().__init__()
        self.codebook_size = codebook_size
        self.straight_through = straight_through
        # The source of the Gumbel noise: None, the global random stream.  A data-parallel
        # training loop gives each process a generator of its own: the processes start from
        # one seed, so on the global stream every slice of the batch would get the same noise.
        self.generator: torch.Generator | None = None

    def forward(self, logits: Tensor, temperature: float) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``logits [B, K, g, g]`` -> (soft one-hot codes ``[B, K, g, g]``, KL summed per image ``[B]``, metrics)."""
        log_q = F.log_softmax(logits, dim=1)
        # KL(q || uniform) = sum_k q_k log q_k + log K, for each grid position.
        kl = (log_q.exp() * log_q).sum(dim=1) + math.log(self.codebook_size)
        if self.training and self.generator is None:
            codes = F.gumbel_softmax(logits, tau=temperature, hard=self.straight_through, dim=1)
        elif self.training:
            codes = gumbel_softmax(logits, temperature, self.straight_through, self.generator)
        else:
            codes = self.one_hot(logits.argmax(dim=1))
        perplexity, usage = code_statistics(logits.detach().argmax(dim=1), self.codebook_size)
        metrics = {"kl": kl.detach().mean(), "perplexity": perplexity, "usage": usage}
        return codes, kl.flatten(1).sum(1), metrics

    def one_hot(self, tokens: Tensor) -> Tensor:
        return F.one_hot(tokens, self.codebook_size).permute(0, 3, 1, 2).float()


def gumbel_softmax(logits: Tensor, temperature: float, hard: bool, generator: torch.Generator) -> Tensor:
    """``F.gumbel_softmax`` over dim 1 with the noise drawn from ``generator``."""
    gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()
    soft = ((logits + gumbels) / temperature).softmax(dim=1)
    if not hard:
        return soft
    one_hot = torch.zeros_like(logits).scatter_(1, soft.argmax(dim=1, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft  # the one-hot sample forward, the relaxation's gradient


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantiser with an EMA codebook and dead-code restarts (VQ-VAE).

    The codebook is not trained by gradients: ``embed = ema_sum / ema_count`` where the
    running sums average the encoder outputs assigned to each code.  A code whose EMA
    count falls below :data:`VQ_DEAD_CODE_COUNT` is re-initialised from a random encoder
    output of the current batch, so the codebook never collapses onto a few entries.

    Data-parallel training (``data_parallel = True``, set by the training loop on every
    process) keeps one codebook on all processes, equal to the one a single process
    with the whole batch would keep: see :meth:`update_codebook`.
    """

    def __init__(self, codebook_size: int, code_dim: int, decay: float = VQ_EMA_DECAY):
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.decay = decay
        embed = torch.randn(codebook_size, code_dim)
        self.register_buffer("embed", embed)
        # Counts start at zero: every code is "dead" at the first training step and is
        # restarted from that batch's encoder outputs (a data-dependent initialisation).
        self.register_buffer("ema_count", torch.zeros(codebook_size))
        self.register_buffer("ema_sum", embed.clone())
        self.data_parallel = False

    def nearest(self, z: Tensor) -> Tensor:
        """``z [N, D]`` -> index of the nearest codebook vector ``[N]``."""
        dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ self.embed.t() + self.embed.pow(2).sum(1)[None]
        return dist.argmin(dim=1)

    def lookup(self, tokens: Tensor) -> Tensor:
        """``tokens [B, g, g]`` -> code vectors ``[B, D, g, g]``."""
        return F.embedding(tokens, self.embed).permute(0, 3, 1, 2)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """``z [B, D, g, g]`` -> (quantised codes with straight-through gradient, tokens, commitment loss, metrics)."""
        with torch.autocast(z.device.type, enabled=False):  # distances and EMA sums in fp32
            return self._quantise(z.float())

    def _quantise(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        b, d, g, _ = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        tokens = self.nearest(flat.detach())
        if self.training:
            self.update_codebook(flat.detach(), tokens)
        quantised = F.embedding(tokens, self.embed)
        commitment = (flat - quantised).pow(2).mean()
        quantised = flat + (quantised - flat).detach()  # straight-through estimator
        codes = quantised.reshape(b, g, g, d).permute(0, 3, 1, 2)
        tokens = tokens.reshape(b, g, g)
        perplexity, usage = code_statistics(tokens, self.codebook_size)
        metrics = {"commitment": commitment.detach(), "perplexity": perplexity, "usage": usage}
        return codes, tokens, commitment, metrics

    @torch.no_grad()
    def update_codebook(self, flat: Tensor, tokens: Tensor) -> None:
        """EMA step of the codebook on encoder outputs ``flat [N, D]`` and their codes ``tokens [N]``.

        With ``data_parallel`` each process passes its contiguous slice of the batch (the
        processes in rank order make the whole batch, in order; equal slices).  The
        assignment counts and sums are added up over processes before the EMA step, and a
        dead code restart draws from the fit errors of the whole batch with the random
        stream every process holds in the same state, so all processes restart the same
        codes on the same encoder outputs.  ``ema_count`` is then bitwise what one process
        computes (sums of whole counts); ``ema_sum`` and ``embed`` equal it up to the order
        of float additions.
        """
        error = (flat - self.embed[tokens]).pow(2).sum(1)  # before the codebook moves
        one_hot = F.one_hot(tokens, self.codebook_size).type_as(flat)
        counts, sums = one_hot.sum(0), one_hot.t() @ flat
        if self.data_parallel:
            counts, sums = _sum_over_processes(counts, sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        dead = self.ema_count < VQ_DEAD_CODE_COUNT  # the same on every process, as ema_count is
        n_dead = int(dead.sum())
        if n_dead:
            if self.data_parallel:
                error = _gather_over_processes(error)  # the whole batch's, in its order
            # Restart dead codes on encoder outputs of this batch, drawn in proportion to
            # how badly the codebook fits them (as k-means++ seeds): the black background
            # fills most positions and is already well served by a code or two.
            weights = error + 1e-12 * error.max().clamp_min(1e-12)
            pick = torch.multinomial(weights, n_dead, replacement=n_dead > len(weights))
            seeds = _rows_over_processes(flat, pick) if self.data_parallel else flat[pick]
            self.ema_sum[dead] = seeds * VQ_RESTART_COUNT
            self.ema_count[dead] = VQ_RESTART_COUNT
        self.embed.copy_(self.ema_sum / self.ema_count.clamp_min(1e-5)[:, None])


# Collectives of a data-parallel VQ codebook update (used only with ``data_parallel``: a
# single process never imports torch.distributed here).  Every process calls them in the
# same order, on slices of equal size.


def _sum_over_processes(counts: Tensor, sums: Tensor) -> tuple[Tensor, Tensor]:
    """``counts [K]`` and ``sums [K, D]`` added up over processes (one all-reduce)."""
    import torch.distributed as dist

    packed = torch.cat([counts[:, None], sums], dim=1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return packed[:, 0], packed[:, 1:]


def _gather_over_processes(values: Tensor) -> Tensor:
    """The processes' ``values [N]`` concatenated in rank order ``[world * N]``."""
    import torch.distributed as dist

    parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def _rows_over_processes(flat: Tensor, pick: Tensor) -> Tensor:
    """Rows ``pick`` (indices into the whole batch) of the processes' ``flat [N, D]`` slices.

    Each process fills in the rows it holds and zeros elsewhere; the sum over processes
    is then every row exactly (x + 0 = x), at the cost of ``len(pick) x D`` numbers
    rather than gathering all encoder outputs.
    """
    import torch.distributed as dist

    n = len(flat)
    local = pick - dist.get_rank() * n
    mine = (local >= 0) & (local < n)
    rows = torch.zeros(len(pick), flat.shape[1], dtype=flat.dtype, device=flat.device)
    rows[mine] = flat[local[mine]]
    dist.all_reduce(rows, op=dist.ReduceOp.SUM)
    return rows


# --- The model -----------------------------------------------------------------------------


class DiscreteVAE(nn.Module):
    """Image tokenizer: ``encode`` images to ``[B, g, g]`` tokens, ``decode`` tokens to images."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        check_config(config)
        self.config = config
        if config.quantizer == "gumbel":
            self.quantizer: GumbelQuantizer | VectorQuantizer = GumbelQuantizer(
                config.codebook_size, config.straight_through
            )
            code_channels = config.codebook_size
        else:
            self.quantizer = VectorQuantizer(config.codebook_size, config.code_dim)
            code_channels = config.code_dim
        self.encoder = Encoder(config, code_channels)
        self.decoder = Decoder(config, code_channels)
        self.apply(init_conv)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    # -- boundaries --

    def _check_images(self, images: Tensor) -> None:
        c, s = self.config.channels, self.config.image_size
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1:] != (c, s, s):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"expected images of shape [B, {c}, {s}, {s}], got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}; divide uint8 images by 255")
        lo, hi = torch.aminmax(images.detach())
        if lo < 0 or hi > 1:
            raise ValueError(f"image values must lie in [0, 1], got range [{float(lo):.3g}, {float(hi):.3g}]")

    def _check_tokens(self, tokens: Tensor) -> None:
        g, k = self.grid_size, self.codebook_size
        if not isinstance(tokens, Tensor) or tokens.dim() != 3 or tokens.shape[1:] != (g, g):
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"expected tokens of shape [B, {g}, {g}], got {shape}")
        if tokens.dtype != torch.long:
            raise ValueError(f"expected tokens of dtype torch.long, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= k):
            raise ValueError(f"token ids must lie in [0, {k}), got [{int(tokens.min())}, {int(tokens.max())}]")

    # -- public API --

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> tokens ``[B, g, g]`` (argmax / nearest code; no noise)."""
        self._check_images(images)
        z = self.encoder(map_pixels(images))
        if isinstance(self.quantizer, GumbelQuantizer):
            return z.argmax(dim=1)
        b, d, g, _ = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).reshape(b, g, g)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens ``[B, g, g]`` -> images ``[B, 3, H, W]`` in [0, 1]."""
        self._check_tokens(tokens)
        if isinstance(self.quantizer, GumbelQuantizer):
            codes = self.quantizer.one_hot(tokens)
        else:
            codes = self.quantizer.lookup(tokens)
        return self.stats_to_image(self.decoder(codes.to(self.decoder.net[0].weight.dtype)))

    def stats_to_image(self, stats: Tensor) -> Tensor:
        """Decoder output ``[B, 6, H, W]`` -> the distribution's median in pixel space."""
        return unmap_pixels(torch.sigmoid(stats[:, : self.config.channels].float()))

    def forward(self, images: Tensor, temperature: float = 1.0, kl_weight: float = 0.0) -> DVAEOutput:
        """Training objective on a batch: see the module docstring for its normalisation.

        In training mode the Gumbel quantiser samples (so ``recon`` and the ``psnr``
        metric are those of the relaxed codes); in eval mode it takes the argmax.

        ``temperature`` is the Gumbel-softmax temperature and ``kl_weight`` the paper's
        beta; both are ignored by the VQ quantiser (whose posterior is deterministic, so
        its KL to the uniform prior is the constant log K), which adds its commitment
        loss instead.
        """
        self._check_images(images)
        c = self.config.channels
        x = map_pixels(images)
        z = self.encoder(x).float()
        # The quantiser's softmax, KL and distances stay in fp32 under bf16 autocast.
        with torch.autocast(device_type=z.device.type, enabled=False):
            if isinstance(self.quantizer, GumbelQuantizer):
                codes, kl, metrics = self.quantizer(z, temperature)
                regulariser = kl_weight * kl.mean() / images[0].numel()
                tokens = z.detach().argmax(dim=1)
            else:
                codes, tokens, commitment, metrics = self.quantizer(z)
                regulariser = VQ_COMMITMENT * commitment
        stats = self.decoder(codes).float()
        loc, log_scale = stats[:, :c], stats[:, c:]
        if self.config.recon_loss == "mse":
            # In the mapped space, unclamped, so a pixel predicted black still gets a gradient.
            nll = (torch.sigmoid(loc) - x).pow(2).mean() / (1 - 2 * PIXEL_EPS) ** 2
        else:
            nll = logit_laplace_nll(x, loc, log_scale).mean()
        loss = nll + regulariser
        recon = self.stats_to_image(stats)
        with torch.no_grad():
            mse = (recon - images).pow(2).mean()
        metrics = {"nll": nll.detach(), "mse": mse, "psnr": psnr_from_mse(mse), **metrics}
        return DVAEOutput(loss=loss, recon=recon, metrics=metrics, tokens=tokens)

    # -- persistence --

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
        from dalle.io import save_module

        return save_module(folder, self, self.config, dtype=dtype)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "DiscreteVAE":
        from dalle.io import load_module

        model, _ = load_module(folder, cls, DVAEConfig, device=device)
        return model


def load_image_tokenizer(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The image tokenizer of a ``dvae/`` folder: our dVAE, or a converted taming VQGAN.

    A converted VQGAN's config says ``"architecture": "taming-vqgan"`` (``dalle convert
    vqgan``); it has the same interface (``encode``, ``decode``, ``grid_size``,
    ``codebook_size``, ``config.image_size``).
    """
    from dalle.io import folder_architecture

    if folder_architecture(folder) == "taming-vqgan":
        from dalle.vqgan import VQGAN

        return VQGAN.from_pretrained(folder, device=device)
    return DiscreteVAE.from_pretrained(folder, device=device)


def psnr_from_mse(mse: Tensor) -> Tensor:
    """PSNR in dB of images in [0, 1]."""
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def check_config(config: DVAEConfig) -> None:
    """Raise ``ValueError`` naming the field of ``config`` that the dVAE cannot be built with."""
    if config.quantizer not in ("gumbel", "vq"):
        raise ValueError(f"dvae.quantizer must be 'gumbel' or 'vq', got {config.quantizer!r}")
    if len(config.width_multipliers) != config.num_groups:
        raise ValueError(
            f"dvae.width_multipliers has {len(config.width_multipliers)} entries but num_groups={config.num_groups}"
        )
    for name in ("image_size", "hidden_width", "blocks_per_group", "num_groups", "codebook_size", "code_dim"):
        if getattr(config, name) < 1:
            raise ValueError(f"dvae.{name} must be positive, got {getattr(config, name)}")
    if config.decoder_init_width < 0:
        raise ValueError(f"dvae.decoder_init_width must be positive (or 0: the first group's width), got {config.decoder_init_width}")
    if config.image_size % config.downsample:
        raise ValueError(
            f"dvae.image_size={config.image_size} is not divisible by the down-sampling factor {config.downsample}"
        )
