"""A taming-transformers VQGAN (Esser et al. 2021) as the image tokenizer, weights converted.

Many DALL-E reproductions tokenise images with a VQGAN rather than the paper's dVAE.
This module rebuilds the architecture of taming-transformers' ``VQModel`` with its
tensor names, so a converted checkpoint (``dalle convert vqgan``) loads one to one:

* encoder: 3x3 input convolution, one level per entry of ``ch_mult`` (``num_res_blocks``
  residual blocks of GroupNorm(32)-swish-conv3x3 twice, self-attention blocks at the
  resolutions in ``attn_resolutions``, then a stride-2 convolution except after the
  last level), a middle of residual-attention-residual, GroupNorm, swish, 3x3 to
  ``z_channels``, then a 1x1 ``quant_conv`` to the codebook's ``embed_dim``;
* quantiser: the nearest of ``codebook_size`` vectors (squared Euclidean distance);
* decoder: 1x1 ``post_quant_conv``, 3x3 convolution, the middle, then the levels in
  reverse with one more residual block each and nearest 2x up-sampling + 3x3
  convolution between them, GroupNorm, swish, 3x3 to RGB.

Pixels are [-1, 1] inside the model; :meth:`VQGAN.encode` takes and :meth:`VQGAN.decode`
gives [0, 1] images like :class:`dalle.dvae.DiscreteVAE`, whose interface it shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle.io import load_module, save_module


@dataclass
class VQGANConfig:
    architecture: str = "taming-vqgan"  # tells load_image_tokenizer which model a dvae/ folder holds
    image_size: int = 256
    channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    embed_dim: int = 256
    codebook_size: int = 1024
    # The resolution the model was built for: attention sits where the feature map at this
    # input size has a side in attn_resolutions (taming's ddconfig "resolution").
    attn_resolution_base: int = 256

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.norm1 = _norm(n_in)
        self.conv1 = nn.Conv2d(n_in, n_out, 3, padding=1)
        self.norm2 = _norm(n_out)
        self.conv2 = nn.Conv2d(n_out, n_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1 convolutions for q, k, v and the output."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))  # [B, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only, as trained


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: residual blocks, each followed by attention where the resolution asks for it."""

    def __init__(self, n_in: int, n_out: int, blocks: int, attention: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(n_in if i == 0 else n_out, n_out) for i in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(n_out) for _ in range(blocks)) if attention else nn.ModuleList()

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, c: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, n_in = c.attn_resolution_base, c.ch
        for i, mult in enumerate(c.ch_mult):
            level = Level(n_in, c.ch * mult, c.num_res_blocks, res in c.attn_resolutions)
            n_in = c.ch * mult
            if i < len(c.ch_mult) - 1:
                level.downsample = Downsample(n_in)
                res //= 2
            self.down.append(level)
        self.mid = Middle(n_in)
        self.norm_out = _norm(n_in)
        self.conv_out = nn.Conv2d(n_in, c.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, c: VQGANConfig):
        super().__init__()
        n = len(c.ch_mult)
        n_in = c.ch * c.ch_mult[-1]
        res = c.attn_resolution_base // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(c.z_channels, n_in, 3, padding=1)
        self.mid = Middle(n_in)
        levels: list[Level] = []
        for i in reversed(range(n)):  # lowest resolution first
            level = Level(n_in, c.ch * c.ch_mult[i], c.num_res_blocks + 1, res in c.attn_resolutions)
            n_in = c.ch * c.ch_mult[i]
            if i > 0:
                level.upsample = Upsample(n_in)
                res *= 2
            levels.insert(0, level)  # stored by level index (full resolution first), as released
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(n_in)
        self.conv_out = nn.Conv2d(n_in, c.channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
            if hasattr(level, "upsample"):
                x = level.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Codebook(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(size, dim)

    def nearest(self, z: Tensor) -> Tensor:
        """``z [B, D, g, g]`` -> index of the nearest code ``[B, g, g]``."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        e = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return dist.argmin(dim=1).view(b, h, w)


class VQGAN(nn.Module):
    """Image tokenizer: ``encode`` images to ``[B, g, g]`` tokens, ``decode`` tokens to images (as DiscreteVAE)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        check_config(config)
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = Codebook(config.codebook_size, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> tokens ``[B, g, g]``."""
        s = self.config.image_size
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (self.config.channels, s, s):
            raise ValueError(f"expected images of shape [B, {self.config.channels}, {s}, {s}], got {getattr(images, 'shape', images)}")
        return self.quantize.nearest(self.quant_conv(self.encoder(images.float() * 2 - 1)))

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens ``[B, g, g]`` -> images ``[B, 3, H, W]`` in [0, 1]."""
        g, k = self.grid_size, self.codebook_size
        if not isinstance(tokens, Tensor) or tokens.dim() != 3 or tuple(tokens.shape[1:]) != (g, g):
            raise ValueError(f"expected tokens of shape [B, {g}, {g}], got {getattr(tokens, 'shape', tokens)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= k):
            raise ValueError(f"token ids must lie in [0, {k})")
        codes = self.quantize.embedding(tokens).permute(0, 3, 1, 2)
        out = self.decoder(self.post_quant_conv(codes))
        return ((out.float() + 1) / 2).clamp(0.0, 1.0)

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
        return save_module(folder, self, self.config, dtype=dtype)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "VQGAN":
        model, _ = load_module(folder, cls, VQGANConfig, device=device)
        return model


def check_config(c: VQGANConfig) -> None:
    if c.architecture != "taming-vqgan":
        raise ValueError(f"vqgan config: architecture must be 'taming-vqgan', got {c.architecture!r}")
    widths = [c.ch * m for m in c.ch_mult]
    if not c.ch_mult or any(w % 32 for w in widths) or c.z_channels < 1:
        raise ValueError(f"vqgan config: every level's width (ch x ch_mult = {widths}) must be a multiple of 32 (GroupNorm)")
    if c.image_size % c.downsample:
        raise ValueError(f"vqgan config: image_size={c.image_size} is not divisible by {c.downsample}")
