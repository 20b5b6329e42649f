"""A real ``DallePipeline`` from randomly initialised ``tiny`` components, built in a fraction of a second.

Its images are noise, but every stage (tokenizer, transformer sampling, dVAE decoding,
CLIP reranking) is the real code, so tests of what wraps the pipeline exercise real behaviour.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from dalle.clip import CLIP
from dalle.config import get_preset
from dalle.dvae import DiscreteVAE
from dalle.pipeline import DallePipeline
from dalle.tokenizer import TextTokenizer
from dalle.transformer import DalleTransformer

CAPTIONS = [
    "a red circle",
    "a small blue square above a green triangle",
    "a large yellow star to the left of a purple circle",
    "an orange triangle below a red square",
]


def build_tiny_pipeline(seed: int = 0) -> DallePipeline:
    """The ``tiny`` preset's four components, randomly initialised from ``seed``, on the CPU."""
    config = get_preset("tiny")
    torch.manual_seed(seed)
    tokenizer = TextTokenizer.train(CAPTIONS, config.tokenizer)
    return DallePipeline(tokenizer, DiscreteVAE(config.dvae), DalleTransformer(config.transformer),
                         CLIP(config.clip), device="cpu")


def shapes_image(size: int = 64, bottom_colour: tuple[int, int, int] = (30, 60, 220)) -> Image.Image:
    """A shapes-like picture: a red circle in the top half, a square of ``bottom_colour`` in the bottom quarter."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    s = size / 64
    draw.ellipse([20 * s, 4 * s, 44 * s, 26 * s], fill=(220, 30, 30))
    draw.rectangle([8 * s, 50 * s, 56 * s, 63 * s], fill=bottom_colour)
    return image
