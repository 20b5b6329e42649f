#!/usr/bin/env python3
"""A gallery PNG: held-out captions of a data set, the real image beside the model's drawings.

For the first ``--rows`` items of the data's held-out split (the last items of the set, the
split every ``dalle train`` stage kept out of training, by the model's own ``dalle.json``),
one row: the caption, the real held-out image, then the ``--keep`` best of ``--candidates``
generated images after CLIP reranking (best first).  Images are scaled ``--scale`` times
(nearest neighbour) so 64 px pictures stay readable.

    .venv/bin/python scripts/gallery.py --model M --data DIR --out docs/gallery.png
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from dalle.config import DalleConfig, load_config
from dalle.data.datasets import open_dataset
from dalle.pipeline import DallePipeline
from dalle.training.state import holdout

PAD = 4
TEXT_WIDTH = 260
BACKGROUND = (255, 255, 255)


def held_out_items(model: Path, data: str, rows: int) -> list[tuple[str, Image.Image]]:
    """``(caption, image)`` of the first ``rows`` held-out items (first caption of each)."""
    config = load_config(DalleConfig, model / "dalle.json")
    dataset = open_dataset(data)
    _, val = holdout(len(dataset), config.train, warn=False)
    if not val:
        raise SystemExit(f"error: {data} is too small to have a held-out split")
    items = []
    for i in list(val)[:rows]:
        sample = dataset[i]
        items.append((sample.captions[0], sample.image.convert("RGB")))
    return items


def render(rows: list[tuple[str, Image.Image, list[Image.Image]]], size: int, scale: int) -> Image.Image:
    cell = size * scale
    keep = len(rows[0][2])
    width = TEXT_WIDTH + (1 + keep) * (cell + PAD) + PAD * 3
    header = 20
    height = header + len(rows) * (cell + PAD) + PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((PAD, 4), "held-out caption", fill=(0, 0, 0), font=font)
    draw.text((TEXT_WIDTH + PAD, 4), "real", fill=(0, 0, 0), font=font)
    draw.text((TEXT_WIDTH + 2 * PAD + cell + PAD * 2, 4), f"generated, best {keep} after CLIP reranking",
              fill=(0, 0, 0), font=font)
    for r, (caption, real, generated) in enumerate(rows):
        y = header + r * (cell + PAD)
        lines = textwrap.wrap(caption, width=40)[: max(1, cell // 12)]
        draw.multiline_text((PAD, y + 4), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=2)
        x = TEXT_WIDTH + PAD
        sheet.paste(real.resize((cell, cell), Image.NEAREST), (x, y))
        x += cell + PAD * 3  # a wider gap between the real image and the generated ones
        for image in generated:
            sheet.paste(image.resize((cell, cell), Image.NEAREST), (x, y))
            x += cell + PAD
    return sheet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="model folder (dalle train --out)")
    p.add_argument("--data", required=True, help="the data set the model was trained on (its held-out split is shown)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--rows", type=int, default=12, help="held-out captions shown (default 12)")
    p.add_argument("--candidates", type=int, default=32, help="images sampled a caption (default 32)")
    p.add_argument("--keep", type=int, default=4, help="best-ranked images shown a caption (default 4)")
    p.add_argument("--scale", type=int, default=2, help="pixel scale of the images (default 2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 1 <= args.keep <= args.candidates:
        p.error(f"--keep must be between 1 and --candidates ({args.candidates})")
    pipe = DallePipeline.from_pretrained(args.model, device="cpu")
    rows = []
    for caption, real in held_out_items(args.model, args.data, args.rows):
        result = pipe(caption, candidates=args.candidates, keep=args.keep, seed=args.seed)
        rows.append((caption, real.resize((pipe.image_size, pipe.image_size), Image.BICUBIC), result.images))
        print(f"{caption!r}: CLIP scores of the kept images {[round(s, 3) for s in result.scores]}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet = render(rows, pipe.image_size, args.scale)
    # 256 colours: a few hundred KB instead of twice that, with no visible change at this scale
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({len(rows)} held-out captions)")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
