"""OpenAI's CLIP (Radford et al. 2021) as a reranker: the released architecture, weights converted.

The paper reranks DALL-E's samples with "a pretrained contrastive model" (section 2.5);
OpenAI later released CLIP itself.  This module rebuilds its architecture with the
released tensor names, so a converted checkpoint (``dalle convert openai-clip``) loads
one to one:

* image tower: a vision transformer (``ViT-B/32`` and relatives: patch convolution, a
  class token, pre- and post-LayerNorm, projection ``proj``) or the modified ResNet
  (``RN50`` and relatives: a three-convolution stem, bottleneck blocks whose strided
  convolutions are replaced by average pooling, and an attention pooling head);
* text tower: a causal transformer over CLIP's own BPE tokens (:mod:`dalle.clip_tokenizer`),
  read at the end-of-text token (the highest id of each sequence), then ``text_projection``;
* blocks: pre-LayerNorm residual attention and an MLP with CLIP's "quick GELU"
  ``x * sigmoid(1.702 x)``.

Images come in as our pipeline makes them (``[B, 3, H, W]`` in [0, 1]); they are
resized to the model's input resolution (bicubic) and normalised with CLIP's pixel
statistics before the image tower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dalle.io import ModelLoadError, load_module, save_module

# CLIP's published pixel normalisation (per channel, on [0, 1] RGB).
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"


@dataclass
class OpenAICLIPConfig:
    """Hyperparameters of a released CLIP (read from its tensors at conversion)."""

    architecture: str = "openai-clip"  # tells load_reranker which model a clip/ folder holds
    embed_dim: int = 512
    image_size: int = 224  # input resolution of the image tower
    vision_width: int = 768
    vision_layers: int = 12  # ViT blocks (ViT only)
    vision_heads: int = 12
    vision_patch_size: int = 32  # ViT only
    # ResNet: bottleneck blocks in each of the four stages, e.g. [3, 4, 6, 3] for RN50;
    # empty for a ViT.
    resnet_layers: tuple[int, ...] = field(default_factory=tuple)
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8

    def __post_init__(self) -> None:
        self.resnet_layers = tuple(self.resnet_layers)  # JSON gives a list

    @property
    def is_resnet(self) -> bool:
        return bool(self.resnet_layers)

    @property
    def text_len(self) -> int:
        return self.context_length


# --- Transformer blocks (shared by both towers) ----------------------------------------------


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input's dtype (as the released model does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with the released names: packed ``in_proj_*``, then ``out_proj``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.normal_(self.in_proj_weight, std=width**-0.5)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, w))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, width]
        for block in self.resblocks:
            x = block(x, self.causal)
        return x


# --- Image towers ----------------------------------------------------------------------------


class VisionTransformer(nn.Module):
    def __init__(self, c: OpenAICLIPConfig):
        super().__init__()
        w, grid = c.vision_width, c.image_size // c.vision_patch_size
        self.conv1 = nn.Conv2d(3, w, c.vision_patch_size, stride=c.vision_patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, w) * w**-0.5)
        self.ln_pre = LayerNorm(w)
        self.transformer = Transformer(w, c.vision_layers, c.vision_heads, causal=False)
        self.ln_post = LayerNorm(w)
        self.proj = nn.Parameter(torch.randn(w, c.embed_dim) * w**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, patches, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
        x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj


class Bottleneck(nn.Module):
    """1x1, 3x3, 1x1 convolutions (x4 channels out); a stride is an average pool before the last one."""

    expansion = 4

    def __init__(self, n_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(n_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample: nn.Sequential | None = None
        if stride > 1 or n_in != planes * self.expansion:
            # The released names: "-1" (the pool, no tensors), "0" (conv), "1" (norm).
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride))
            self.downsample.add_module("0", nn.Conv2d(n_in, planes * self.expansion, 1, bias=False))
            self.downsample.add_module("1", nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """The ResNet's head: the mean feature attends (multi-head) over all positions and itself."""

    def __init__(self, grid: int, width: int, heads: int, out_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) / width**0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        b, n, c = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, h, c // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q_proj(x[:, :1])), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.c_proj(y.transpose(1, 2).reshape(b, c))


class ModifiedResNet(nn.Module):
    def __init__(self, c: OpenAICLIPConfig):
        super().__init__()
        w = c.vision_width
        self.conv1 = nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w // 2)
        self.conv2 = nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w // 2)
        self.conv3 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w)
        self.avgpool = nn.AvgPool2d(2)
        n_in = w
        stages = []
        for i, blocks in enumerate(c.resnet_layers):
            planes = w * 2**i
            layer = [Bottleneck(n_in, planes, stride=1 if i == 0 else 2)]
            n_in = planes * Bottleneck.expansion
            layer += [Bottleneck(n_in, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(c.image_size // 32, n_in, c.vision_heads, c.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


# --- The model -------------------------------------------------------------------------------


class OpenAICLIP(nn.Module):
    """A released CLIP, scoring captions against images like :class:`dalle.clip.CLIP` does.

    ``tokenizer`` (set by :meth:`from_pretrained`) is CLIP's own BPE; the pipeline reads a
    prompt with it rather than with the DALL-E tokenizer.
    """

    def __init__(self, config: OpenAICLIPConfig):
        super().__init__()
        check_config(config)
        self.config = config
        self.visual: nn.Module = ModifiedResNet(config) if config.is_resnet else VisionTransformer(config)
        self.transformer = Transformer(config.text_width, config.text_layers, config.text_heads, causal=True)
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(torch.randn(config.context_length, config.text_width) * 0.01)
        self.ln_final = LayerNorm(config.text_width)
        self.text_projection = nn.Parameter(torch.randn(config.text_width, config.embed_dim) * config.text_width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        self.tokenizer = None  # a dalle.clip_tokenizer.CLIPTokenizer, set by from_pretrained

    # -- raw features (the released model's encode_image / encode_text) --

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B, 3, S, S]`` (S = ``image_size``) -> unnormalised ``[B, embed_dim]``."""
        return self.visual(pixels.to(self.text_projection.dtype))

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP token ids ``[B, L]`` (L <= ``context_length``) -> unnormalised ``[B, embed_dim]``."""
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n]
        x = self.ln_final(self.transformer(x))
        end = tokens.argmax(dim=-1)  # the end-of-text token has the highest id
        return x[torch.arange(x.shape[0], device=x.device), end] @ self.text_projection

    # -- the reranker's interface (as dalle.clip.CLIP) --

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> the image tower's input (resized, normalised)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor [B, 3, H, W] in [0, 1], got {getattr(images, 'shape', type(images))}")
        s = self.config.image_size
        x = images.float().clamp(0.0, 1.0)
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bicubic", antialias=True, align_corners=False).clamp(0.0, 1.0)
        return (x - self.pixel_mean) / self.pixel_std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> ``[B, embed_dim]`` unit vectors."""
        return F.normalize(self.image_features(self.preprocess(images)).float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP token ids ``[B, context_length]`` -> ``[B, embed_dim]`` unit vectors."""
        if tokens.dim() != 2 or tokens.shape[1] > self.config.context_length:
            raise ValueError(f"tokens must be [B, <= {self.config.context_length}] CLIP ids, got {tuple(tokens.shape)}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size:
            raise ValueError(f"CLIP token ids must lie in [0, {self.config.vocab_size}); was the text encoded by CLIP's tokenizer?")
        return F.normalize(self.text_features(tokens.long()).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of ``tokens[i]`` (or one caption for all) and ``images[i]``: ``[B]``."""
        return (self.encode_text(tokens) * self.encode_image(images)).sum(dim=-1)

    # -- persistence --

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
        import shutil

        folder = save_module(folder, self, self.config, dtype=dtype)
        if self.tokenizer is not None and Path(self.tokenizer.vocab_path) != Path(folder) / VOCAB_FILE:
            shutil.copy2(self.tokenizer.vocab_path, Path(folder) / VOCAB_FILE)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "OpenAICLIP":
        from dalle.clip_tokenizer import CLIPTokenizer

        folder = Path(folder)
        vocab = folder / VOCAB_FILE
        if not vocab.is_file():
            raise ModelLoadError(f"{folder} lacks CLIP's vocabulary {VOCAB_FILE}; convert the model again "
                                 "(dalle convert openai-clip MODEL.pt --out DIR)")
        model, config = load_module(folder, cls, OpenAICLIPConfig, device=device)
        model.tokenizer = CLIPTokenizer(vocab, context_length=config.context_length)
        return model


def check_config(c: OpenAICLIPConfig) -> None:
    if c.architecture != "openai-clip":
        raise ValueError(f"clip config: architecture must be 'openai-clip', got {c.architecture!r}")
    if c.is_resnet and len(c.resnet_layers) != 4:
        raise ValueError(f"clip config: resnet_layers must list four stages, got {list(c.resnet_layers)}")
    if not c.is_resnet and c.image_size % c.vision_patch_size:
        raise ValueError(f"clip config: image_size={c.image_size} is not divisible by vision_patch_size={c.vision_patch_size}")
    if c.is_resnet and c.image_size % 32:
        raise ValueError(f"clip config: a ResNet's image_size must be divisible by 32, got {c.image_size}")
    for width, heads, what in ((c.text_width, c.text_heads, "text"), (c.vision_width * (32 if c.is_resnet else 1), c.vision_heads, "vision")):
        if heads < 1 or width % heads:
            raise ValueError(f"clip config: {what} width {width} is not divisible by {heads} heads")
