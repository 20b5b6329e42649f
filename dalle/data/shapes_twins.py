"""Hard-negative twins of shapes-set items, for training and probing the reranking CLIP.

A twin is an item's scene with one attribute its caption names changed (colour,
shape, size, region or relation), rendered, with captions of its own.  Twin and
original are each other's hardest negatives: the image encoder must see the one
attribute that differs and the text encoder must read it, e.g. tell "a red circle
to the left of a blue square" from "a blue square to the left of a red circle".

The CLIP loop (:mod:`dalle.training.clip`) knows nothing of scenes: a data set
offers twins through the hook ``hard_negatives(items, captions, rng)``
(:class:`dalle.training.clip.HardNegativeSource`); :class:`dalle.data.shapes.
ShapesDataset` implements it with :func:`hard_negative_twins`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from dalle.data import shapes

PERTURBATIONS = ("colour", "shape", "size", "region", "relation")
# How often a training twin changes each attribute, relative to the others that apply.
# Colour and size are learned within minutes and region soon after; shape lags.
# (Relations were not learned within ten CPU minutes even at weight 4, so extra
# weight there only took twins from shape.)
TWIN_WEIGHTS = {"colour": 1.0, "shape": 2.0, "size": 1.0, "region": 1.0, "relation": 1.0}
_SIZE_WORD = re.compile(r"\b(small|large)\b")


def perturb_scene(scene: shapes.Scene, caption: str, what: str, rng: np.random.Generator, tries: int = 50,
                  accept: Callable[[shapes.Scene], bool] | None = None) -> shapes.Scene | None:
    """A valid shapes scene that differs from ``scene`` in one attribute ``what`` and so
    contradicts ``caption``; None when ``what`` does not apply to this caption, or when no
    draw within ``tries`` is accepted by ``accept`` (default: any valid scene).

    * colour / shape: one object gets another colour / shape (same box);
    * size: the object switches small <-> large about the same centre (caption must name a size);
    * region: the object moves to another cell of the 3x3 grid (region captions only);
    * relation: the two objects trade colour and shape, so "A left of B" becomes "B left of A".
    """
    objects = scene.objects
    if what == "relation" and scene.kind != "pair_relation":
        return None
    if what == "region" and scene.kind != "single_region":
        return None
    if what == "size" and not _SIZE_WORD.search(caption):
        return None

    def valid(new_objects: tuple) -> shapes.Scene | None:
        held_out = any(o.held_out for o in new_objects)
        new = dataclasses.replace(scene, objects=new_objects,
                                  category="zero_shot" if held_out else scene.kind)
        try:
            shapes.check_scene(new)
        except ValueError:
            return None
        if what == "region" and new_objects[0].region == objects[0].region:
            return None
        if what == "size" and scene.kind == "single_region" and new_objects[0].region != objects[0].region:
            return None  # two attributes changed
        if accept is not None and not accept(new):
            return None
        return new

    if what == "relation":
        a, b = objects
        return valid((dataclasses.replace(a, colour=b.colour, shape=b.shape),
                      dataclasses.replace(b, colour=a.colour, shape=a.shape)))
    for _ in range(tries):
        k = int(rng.integers(len(objects)))
        o = objects[k]
        if what == "colour":
            new = dataclasses.replace(o, colour=str(rng.choice([c for c in shapes.COLOURS if c != o.colour])))
        elif what == "shape":
            new = dataclasses.replace(o, shape=str(rng.choice([t for t in shapes.SHAPES if t != o.shape])))
        elif what == "size":
            lo, hi = shapes.SIZE_RANGES["large" if o.size_label == "small" else "small"]
            size = int(rng.integers(lo, hi + 1))
            cx, cy = o.centre
            clamp = lambda v: int(min(max(round(v - size / 2), shapes.MARGIN), shapes.IMAGE_SIZE - shapes.MARGIN - size))
            new = dataclasses.replace(o, size_px=size, x0=clamp(cx), y0=clamp(cy))
        elif what == "region":
            x0, y0 = (int(v) for v in rng.integers(shapes.MARGIN, shapes.IMAGE_SIZE - shapes.MARGIN - o.size_px + 1, 2))
            new = dataclasses.replace(o, x0=x0, y0=y0)
        else:
            raise ValueError(f"unknown perturbation {what!r}; choose one of {PERTURBATIONS}")
        found = valid(objects[:k] + (new,) + objects[k + 1:])
        if found is not None:
            return found
    return None


@dataclasses.dataclass
class Twin:
    """A hard-negative twin; its image is rendered when first asked for (under torchrun
    every rank draws all twins of the batch but renders only those of its slice)."""

    captions: list[str]
    scene: shapes.Scene
    _image: Image.Image | None = dataclasses.field(default=None, repr=False)

    @property
    def image(self) -> Image.Image:
        if self._image is None:
            self._image = shapes.render(self.scene)
        return self._image


def hard_negative_twins(items: Sequence[Any], captions: Sequence[str], rng: np.random.Generator,
                        accept: Callable[[shapes.Scene], bool] | None = None,
                        weights: dict[str, float] | None = None) -> tuple[list[Twin], list[str]]:
    """One near-miss twin per shapes item: its scene with one attribute its caption names
    changed, rendered, with all its true captions and one of them picked for the batch.

    The attribute is drawn among those that apply to the caption with
    ``weights`` (default :data:`TWIN_WEIGHTS`, which favour what the model learns last).  ``accept`` keeps
    only the twins it approves (training passes :func:`dalle.data.shapes.belongs_to`
    of its split, so a twin never shows what the split holds out).
    """
    twins, twin_captions = [], []
    for item, caption in zip(items, captions):
        options = {what: perturb_scene(item.scene, caption, what, rng, accept=accept) for what in PERTURBATIONS}
        options = {what: scene for what, scene in options.items() if scene is not None}
        if not options:  # colour nearly always applies; a scene with no twin goes without
            continue
        names = sorted(options)
        w = np.array([(weights or TWIN_WEIGHTS)[what] for what in names], dtype=float)
        scene = options[names[int(rng.choice(len(names), p=w / w.sum()))]]
        own = shapes.all_captions(scene)
        # Its caption must be false of the original ("a red circle in the top left"
        # still fits the original of a size twin), else the pair teaches nothing.
        original = set(item.captions).union(shapes.all_captions(item.scene))
        contrasting = [c for c in own if c not in original] or own
        twins.append(Twin(own, scene))
        twin_captions.append(contrasting[int(rng.integers(len(contrasting)))])
    return twins, twin_captions
