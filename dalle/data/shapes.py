"""The shapes set: procedural 64x64 images of flat coloured objects with captions.

The contract (palette, sizes, margins, relations, held-out pairs) is
/work/shared/SHAPES.md; this module is one implementation of it and
``dalle.evaluation.shapes_judge`` is an independent checker of it.

Everything is a pure function of a NumPy ``Generator``: item ``i`` of split
``s`` with seed ``k`` is drawn from ``np.random.default_rng([k, SPLIT_IDS[s], i])``,
so a data set never needs to be stored to be reproduced. ``ShapesDataset`` serves
items as :class:`Sample` (the package's ``dalle.data.images.Sample``: image,
captions, key; plus the structured ``scene``), and ``write_shapes`` writes a
folder of ``NNNNNN.png`` + ``NNNNNN.txt`` with a ``scenes.jsonl`` for evaluators.

Categories (GenEval-like). Every scene has one ``category``, and *all* of its
captions belong to it, so a per-image category is enough for evaluation:

- ``single``: one object, captions name colour and shape ("a red circle").
- ``single_size``: one object, captions also name its size ("a small red circle").
- ``single_region``: one object, captions name its region, some also its size
  ("a red circle in the top left corner", "a large blue square at the bottom").
- ``pair``: two objects, captions "X and Y" (no relation).
- ``pair_relation``: two objects, captions with one of the four relations
  ("X to the left of Y", "Y to the right of X", "X above Y", "Y below X").
- ``zero_shot``: a scene holding a held-out colour-shape pair (val/test only).
  Its captions use one of the five phrasings above, recorded as ``Scene.kind``;
  for every other scene ``kind == category``.

Splits are disjoint as sets of images, not only as random streams: a scene's
canonical description is hashed into 100 buckets (90 train, 5 val, 5 test) and a
split only keeps scenes whose bucket it owns, so no image of val/test can be
drawn in train however many images are generated.

Captions are held out too, not only images (:data:`HELD_OUT_DESCRIPTIONS`): a fifth
of what each phrasing can describe -- 4 of the 20 colour-shape pairs in the bare
phrasing, 8 of the 40 size-colour-shape triples, 36 of the 180 colour-shape-region
combinations, 38 of the 190 unordered pairs of objects ("X and Y"), and for 76 of the
380 pairs-and-relations one orientation ("X to the left of Y", "X above Y"; its mirror
image, "Y to the left of X", stays in training) -- is described only in val and test,
and every val/test scene of those categories describes one of them.  So no caption of a val/test scene
is ever a caption of a train scene: the evaluation asks for descriptions never seen
in training, each made of parts that were.  :func:`belongs_to` is the rule, for
scenes drawn here and for scenes made from them (hard-negative twins).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from dalle.data.images import Sample as _BaseSample

# --- The contract (SHAPES.md) ------------------------------------------------
IMAGE_SIZE = 64
MARGIN = 2  # min distance from an object to the canvas edge, pixels
MIN_GAP = 4  # min gap between two objects' bounding boxes, pixels
RELATION_MIN_MAIN = 20  # centres differ at least this much along the relation's axis
RELATION_MAX_CROSS = 12  # ... and at most this much across it

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 190, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "cyan": (30, 210, 220),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZE_RANGES: dict[str, tuple[int, int]] = {"small": (10, 14), "large": (22, 28)}  # inclusive
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("orange", "circle"), ("cyan", "square"), ("yellow", "triangle")}
)
# Row-major 3x3 grid: REGIONS[3 * row + col].
REGIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
RELATIONS: tuple[str, ...] = ("left of", "above")  # objects[0] REL objects[1]

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
CATEGORIES: tuple[str, ...] = (
    "single", "single_size", "single_region", "pair", "pair_relation", "zero_shot",
)  # fmt: skip
KINDS: tuple[str, ...] = CATEGORIES[:5]  # caption phrasings

# How often each category is drawn. Relations and regions get more weight because
# they are what a model learns last.
TRAIN_WEIGHTS: dict[str, float] = {
    "single": 0.15, "single_size": 0.15, "single_region": 0.2, "pair": 0.2, "pair_relation": 0.3,
}  # fmt: skip
EVAL_ZERO_SHOT_FRACTION = 0.25  # share of zero_shot scenes in val and test

# A region-captioned object keeps its centre this far from the 3x3 grid lines, so
# that its region is not a matter of one pixel (for a judge of imperfect images).
REGION_CAPTION_MARGIN = 2.0

# Caption paraphrases. A caption is [prefix] body [suffix].
PREFIXES: tuple[str, ...] = ("a picture of ", "an image of ", "a drawing of ")
SUFFIXES: tuple[str, ...] = (" on a black background",)
REGION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "in the top left", "at the top left"),
    "top": ("at the top", "near the top"),
    "top right": ("in the top right corner", "in the top right", "at the top right"),
    "left": ("on the left", "at the left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right"),
    "bottom left": ("in the bottom left corner", "in the bottom left", "at the bottom left"),
    "bottom": ("at the bottom", "near the bottom"),
    "bottom right": ("in the bottom right corner", "in the bottom right", "at the bottom right"),
}
MIN_CAPTIONS, MAX_CAPTIONS = 3, 5


def region_of(cx: float, cy: float, size: int = IMAGE_SIZE) -> str:
    """The 3x3 grid cell that holds the point (cx, cy), in pixel coordinates."""
    col = min(2, max(0, int(cx * 3 // size)))
    row = min(2, max(0, int(cy * 3 // size)))
    return REGIONS[3 * row + col]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --- Scene ----------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeObject:
    """One flat object; ``(x0, y0)`` is its bounding box's top-left pixel."""

    colour: str
    shape: str
    size_px: int
    x0: int
    y0: int

    @property
    def size_label(self) -> str:
        return "small" if self.size_px <= SIZE_RANGES["small"][1] else "large"

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), x1 and y1 exclusive."""
        return (self.x0, self.y0, self.x0 + self.size_px, self.y0 + self.size_px)

    @property
    def centre(self) -> tuple[float, float]:
        """Centre of the bounding box (a triangle's too, not its centroid)."""
        return (self.x0 + self.size_px / 2, self.y0 + self.size_px / 2)

    @property
    def region(self) -> str:
        return region_of(*self.centre)

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT

    def to_dict(self) -> dict[str, Any]:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "size": self.size_label,
            "size_px": self.size_px,
            "bbox": list(self.bbox),
            "centre": list(self.centre),
            "region": self.region,
        }


@dataclass(frozen=True)
class Scene:
    """One image's content.

    ``relation`` is None for one object; for two it is ``"left of"`` or ``"above"``
    and reads ``objects[0] <relation> objects[1]`` (objects[0] is the left or top one).
    ``kind`` is the caption phrasing (one of KINDS); it equals ``category`` except
    for zero_shot scenes.
    """

    objects: tuple[ShapeObject, ...]
    relation: str | None
    category: str
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "kind": self.kind,
            "objects": [o.to_dict() for o in self.objects],
            "relation": self.relation,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        objects = tuple(
            ShapeObject(o["colour"], o["shape"], int(o["size_px"]), int(o["bbox"][0]), int(o["bbox"][1]))
            for o in d["objects"]
        )
        return cls(objects, d.get("relation"), d["category"], d.get("kind", d["category"]))


def check_scene(scene: Scene) -> None:
    """Raise ValueError if ``scene`` breaks the contract (bounds, gaps, relation, held-out)."""
    objs = scene.objects
    if len(objs) not in (1, 2):
        raise ValueError(f"a scene holds one or two objects, got {len(objs)}")
    for o in objs:
        if o.colour not in PALETTE or o.shape not in SHAPES:
            raise ValueError(f"unknown colour or shape: {o.colour} {o.shape}")
        lo, hi = SIZE_RANGES[o.size_label]
        if not lo <= o.size_px <= hi:
            raise ValueError(f"size {o.size_px} px is in neither size range {SIZE_RANGES}")
        x0, y0, x1, y1 = o.bbox
        if min(x0, y0) < MARGIN or max(x1, y1) > IMAGE_SIZE - MARGIN:
            raise ValueError(f"object {o} is closer than {MARGIN} px to the edge")
    if len(objs) == 2:
        a, b = objs
        if (a.colour, a.shape) == (b.colour, b.shape):
            raise ValueError("the two objects must differ in colour or shape")
        gap_x = max(b.x0 - a.bbox[2], a.x0 - b.bbox[2])
        gap_y = max(b.y0 - a.bbox[3], a.y0 - b.bbox[3])
        if max(gap_x, gap_y) < MIN_GAP:
            raise ValueError(f"objects closer than {MIN_GAP} px: {a}, {b}")
        dx = b.centre[0] - a.centre[0]
        dy = b.centre[1] - a.centre[1]
        main, cross = {"left of": (dx, dy), "above": (dy, dx)}.get(scene.relation, (None, None))
        if main is None:
            raise ValueError(f"relation must be one of {RELATIONS}, got {scene.relation!r}")
        if main < RELATION_MIN_MAIN or abs(cross) > RELATION_MAX_CROSS:
            raise ValueError(f"objects do not satisfy {scene.relation!r}: dx={dx}, dy={dy}")
    elif scene.relation is not None:
        raise ValueError("a one-object scene has no relation")
    has_held_out = any(o.held_out for o in objs)
    if has_held_out != (scene.category == "zero_shot"):
        raise ValueError(f"category {scene.category!r} but held-out pair present: {has_held_out}")


# --- Sampling --------------------------------------------------------------------
ALLOWED_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
_HELD_OUT_SORTED: tuple[tuple[str, str], ...] = tuple(sorted(HELD_OUT))


# --- Held-out descriptions ---------------------------------------------------------
HELD_OUT_DESCRIPTION_FRACTION = 0.2
_DESCRIPTION_SALT = 15  # seeds the fixed draw of the held-out descriptions below


def _choose(keys: Sequence[Any], fraction: float, salt: int) -> list[Any]:
    """A fixed ``fraction`` of ``keys`` (rounded), drawn once by a seeded permutation."""
    order = np.random.default_rng([_DESCRIPTION_SALT, salt]).permutation(len(keys))
    return [keys[int(i)] for i in order[: round(fraction * len(keys))]]


def _held_out_descriptions() -> dict[str, frozenset]:
    """Per caption phrasing (KINDS), the descriptions only val and test scenes give."""
    f, rng = HELD_OUT_DESCRIPTION_FRACTION, np.random.default_rng([_DESCRIPTION_SALT, 99])
    unordered = [(p, q) for i, p in enumerate(ALLOWED_PAIRS) for q in ALLOWED_PAIRS[i + 1:]]
    # 8 pairs, one size each: the other size of the pair stays in training.
    sized = [(("small", "large")[int(rng.integers(2))], *pair) for pair in _choose(ALLOWED_PAIRS, 2 * f, 1)]
    relations = []
    for p, q, relation in _choose([(p, q, r) for p, q in unordered for r in RELATIONS], f, 4):
        # One orientation of each chosen pair and relation; its mirror image stays in training.
        first, second = (p, q) if rng.random() < 0.5 else (q, p)
        relations.append((first, relation, second))
    return {
        "single": frozenset(_choose(ALLOWED_PAIRS, f, 0)),  # (colour, shape)
        "single_size": frozenset(sized),  # (size, colour, shape)
        "single_region": frozenset(_choose([(*p, r) for p in ALLOWED_PAIRS for r in REGIONS], f, 2)),
        "pair": frozenset(_choose(unordered, f, 3)),  # ((colour, shape), (colour, shape)), sorted
        "pair_relation": frozenset(relations),  # ((colour, shape), relation, (colour, shape))
    }


HELD_OUT_DESCRIPTIONS: dict[str, frozenset] = _held_out_descriptions()


def _descriptions(kind: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(train's, val and test's) descriptions of ``kind``, each in a fixed order."""
    if kind == "single":
        every: list[Any] = list(ALLOWED_PAIRS)
    elif kind == "single_size":
        every = [(size, *p) for p in ALLOWED_PAIRS for size in SIZE_RANGES]
    elif kind == "single_region":
        every = [(*p, r) for p in ALLOWED_PAIRS for r in REGIONS]
    elif kind == "pair":
        every = [(p, q) for i, p in enumerate(ALLOWED_PAIRS) for q in ALLOWED_PAIRS[i + 1:]]
    else:
        every = [(p, r, q) for p in ALLOWED_PAIRS for q in ALLOWED_PAIRS if p != q for r in RELATIONS]
    held = HELD_OUT_DESCRIPTIONS[kind]
    return tuple(d for d in every if d not in held), tuple(d for d in every if d in held)


_DESCRIPTION_TABLES = {kind: _descriptions(kind) for kind in KINDS}


def description(scene: "Scene") -> tuple[Any, ...]:
    """What the captions of ``scene`` describe, as a key of :data:`HELD_OUT_DESCRIPTIONS`."""
    objs = scene.objects
    pairs = [(o.colour, o.shape) for o in objs]
    if scene.kind == "single":
        return pairs[0]
    if scene.kind == "single_size":
        return (objs[0].size_label, *pairs[0])
    if scene.kind == "single_region":
        return (*pairs[0], objs[0].region)
    if scene.kind == "pair":
        p, q = sorted(pairs, key=ALL_PAIRS.index)
        return (p, q)
    if scene.kind == "pair_relation":
        return (pairs[0], scene.relation, pairs[1])
    raise ValueError(f"unknown caption kind {scene.kind!r}")


def belongs_to(scene: "Scene", split: str) -> bool:
    """Whether ``split`` may hold ``scene``: its image hashes into the split's buckets
    (:func:`split_owner`) and, for train, it shows no held-out colour-shape pair and its
    captions describe nothing held out; for val and test, it is zero_shot or its captions
    describe a held-out description (:data:`HELD_OUT_DESCRIPTIONS`)."""
    _check_split(split)
    if split_owner(scene.objects) != split:
        return False
    if any(o.held_out for o in scene.objects):
        return split != "train"
    return (description(scene) in HELD_OUT_DESCRIPTIONS[scene.kind]) == (split != "train")


def _check_split(split: str) -> None:
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def split_owner(objects: Sequence[ShapeObject]) -> str:
    """The split that owns the image of these objects (a hash into 90/5/5 buckets)."""
    key = ";".join(
        f"{o.colour},{o.shape},{o.size_px},{o.x0},{o.y0}"
        for o in sorted(objects, key=lambda o: (o.x0, o.y0, o.colour, o.shape, o.size_px))
    )
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % 100
    return "train" if bucket < 90 else ("val" if bucket < 95 else "test")


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _size(rng: np.random.Generator, label: str | None = None) -> int:
    lo, hi = SIZE_RANGES[label or _pick(rng, ("small", "large"))]
    return int(rng.integers(lo, hi + 1))


def _single(rng: np.random.Generator, identity: tuple[str, str], kind: str, size: str | None = None,
            region: str | None = None) -> tuple[ShapeObject, ...]:
    """One object; ``size`` (a label) and ``region`` fix those, else they are drawn."""
    colour, shape = identity
    if kind != "single_region":
        s = _size(rng, size)
        x0, y0 = (int(v) for v in rng.integers(MARGIN, IMAGE_SIZE - MARGIN - s + 1, size=2))
        return (ShapeObject(colour, shape, s, x0, y0),)
    # Region captions: draw the region first (uniform over the 9 cells; uniform
    # positions would favour the center), then a position whose centre sits in it.
    index = REGIONS.index(region) if region is not None else int(rng.integers(9))
    row, col = divmod(index, 3)
    while True:
        s = _size(rng, size)
        ranges = []
        for cell in (col, row):
            lo = cell * IMAGE_SIZE / 3 + (REGION_CAPTION_MARGIN if cell > 0 else -1e9)
            hi = (cell + 1) * IMAGE_SIZE / 3 - (REGION_CAPTION_MARGIN if cell < 2 else -1e9)
            # centre = v + s/2 must lie in [lo, hi); v in [MARGIN, IMAGE_SIZE - MARGIN - s].
            v_lo = max(MARGIN, math.ceil(lo - s / 2))
            v_hi = min(IMAGE_SIZE - MARGIN - s, math.ceil(hi - s / 2) - 1)
            ranges.append((v_lo, v_hi))
        if all(lo <= hi for lo, hi in ranges):
            x0, y0 = (int(rng.integers(lo, hi + 1)) for lo, hi in ranges)
            return (ShapeObject(colour, shape, s, x0, y0),)


def _pair(
    rng: np.random.Generator, first: tuple[str, str], second: tuple[str, str], relation: str | None = None
) -> tuple[tuple[ShapeObject, ...], str]:
    """Two objects in a relation; returns (objects with objects[0] left/top, relation).

    ``relation`` given: ``first`` is placed ``relation`` ``second``; else both the
    relation and the order are drawn.
    """
    if relation is None:
        relation = _pick(rng, RELATIONS)
        if rng.random() < 0.5:
            first, second = second, first
    sa, sb = _size(rng), _size(rng)
    lim = IMAGE_SIZE - MARGIN  # exclusive upper bound of a bbox
    # Along the relation's axis: a's start, then b's start far enough for the gap
    # and the centre distance. Sizes always fit: 28 + 4 + 28 = 60 = 64 - 2 * 2.
    min_offset = max(sa + MIN_GAP, math.ceil(RELATION_MIN_MAIN + sa / 2 - sb / 2))
    a_main = int(rng.integers(MARGIN, lim - sb - min_offset + 1))
    b_main = int(rng.integers(a_main + min_offset, lim - sb + 1))
    # Across it: any start for a, then b's centre within RELATION_MAX_CROSS of a's.
    a_cross = int(rng.integers(MARGIN, lim - sa + 1))
    centre = a_cross + sa / 2
    b_lo = max(MARGIN, math.ceil(centre - RELATION_MAX_CROSS - sb / 2))
    b_hi = min(lim - sb, math.floor(centre + RELATION_MAX_CROSS - sb / 2))
    b_cross = int(rng.integers(b_lo, b_hi + 1))
    if relation == "left of":
        a = ShapeObject(*first, sa, a_main, a_cross)
        b = ShapeObject(*second, sb, b_main, b_cross)
    else:
        a = ShapeObject(*first, sa, a_cross, a_main)
        b = ShapeObject(*second, sb, b_cross, b_main)
    return (a, b), relation


def _category_table(split: str) -> tuple[tuple[str, ...], np.ndarray]:
    names = list(TRAIN_WEIGHTS)
    p = np.array([TRAIN_WEIGHTS[n] for n in names])
    if split != "train":
        names.append("zero_shot")
        p = np.append(p * (1 - EVAL_ZERO_SHOT_FRACTION), EVAL_ZERO_SHOT_FRACTION)
    return tuple(names), np.cumsum(p / p.sum())


_CATEGORY_TABLES = {split: _category_table(split) for split in SPLITS}


def _category(rng: np.random.Generator, split: str) -> str:
    names, cdf = _CATEGORY_TABLES[split]
    return names[min(int(np.searchsorted(cdf, rng.random(), side="right")), len(names) - 1)]


def generate_scene(rng: np.random.Generator, split: str, category: str | None = None) -> Scene:
    """Draw one scene of ``split``; ``category`` forces a category (default: drawn).

    The train split never holds a held-out colour-shape pair nor describes a held-out
    description; val and test mix zero_shot scenes with scenes of held-out descriptions
    (:func:`belongs_to`).
    """
    _check_split(split)
    if category is None:
        category = _category(rng, split)
    elif category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    if category == "zero_shot" and split == "train":
        raise ValueError("the train split holds no zero_shot scenes (held-out pairs)")
    kind = _pick(rng, KINDS) if category == "zero_shot" else category
    while True:
        if category == "zero_shot":
            # The held-out pair alone, or beside any other (different) object.
            first = _pick(rng, _HELD_OUT_SORTED)
            if kind.startswith("single"):
                objects, relation = _single(rng, first, kind), None
            else:
                objects, relation = _pair(rng, first, _pick(rng, [p for p in ALL_PAIRS if p != first]))
        else:
            # A description this split may give (train's or the held-out ones), then a layout.
            train, held = _DESCRIPTION_TABLES[kind]
            d = _pick(rng, train if split == "train" else held)
            relation = None
            if kind == "single":
                objects = _single(rng, d, kind)
            elif kind == "single_size":
                objects = _single(rng, d[1:], kind, size=d[0])
            elif kind == "single_region":
                objects = _single(rng, d[:2], kind, region=d[2])
            elif kind == "pair":
                objects, relation = _pair(rng, *d)
            else:
                objects, relation = _pair(rng, d[0], d[2], relation=d[1])
        if split_owner(objects) == split:
            return Scene(objects, relation, category, kind)


# --- Captions --------------------------------------------------------------------
def noun_phrase(obj: ShapeObject, with_size: bool = False) -> str:
    words = ([obj.size_label] if with_size else []) + [obj.colour, obj.shape]
    return f"{article(words[0])} {' '.join(words)}"


def caption_bodies(scene: Scene) -> list[str]:
    """Every bare caption (no prefix/suffix) true of ``scene`` in its phrasing; [0] is the plainest."""
    objs = scene.objects
    if scene.kind == "single":
        return [noun_phrase(objs[0])]
    if scene.kind == "single_size":
        return [noun_phrase(objs[0], with_size=True)]
    if scene.kind == "single_region":
        o = objs[0]
        phrases = REGION_PHRASES[o.region]
        return [f"{noun_phrase(o, s)} {p}" for s in (False, True) for p in phrases]
    a, b = noun_phrase(objs[0]), noun_phrase(objs[1])
    if scene.kind == "pair":
        return [f"{a} and {b}", f"{b} and {a}"]
    if scene.kind == "pair_relation":
        if scene.relation == "left of":
            return [f"{a} to the left of {b}", f"{b} to the right of {a}"]
        return [f"{a} above {b}", f"{b} below {a}"]
    raise ValueError(f"unknown caption kind {scene.kind!r}")


def all_captions(scene: Scene) -> list[str]:
    """Every caption this generator can write for ``scene``; [0] is the plainest."""
    out = []
    for body in caption_bodies(scene):
        out.append(body)
        out.extend(p + body for p in PREFIXES)
        out.extend(body + s for s in SUFFIXES)
    return out


def captions_for(scene: Scene, rng: np.random.Generator, count: int | None = None) -> list[str]:
    """3 to 5 distinct paraphrases (``count`` to fix it), the plainest first, all true of ``scene``."""
    pool = all_captions(scene)
    if count is None:
        count = int(rng.integers(MIN_CAPTIONS, MAX_CAPTIONS + 1))
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    count = min(count, len(pool))
    rest = rng.choice(len(pool) - 1, size=count - 1, replace=False) + 1
    return [pool[0]] + [pool[int(i)] for i in rest]


# --- Rendering --------------------------------------------------------------------
@lru_cache(maxsize=None)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean [size, size] mask of ``shape``; a pixel is in when its centre is.

    The triangle's half-width at row y is measured at the row's lower edge,
    (y + 1) / 2, so its apex row is never empty and its bbox is exactly size x size.
    """
    v = np.arange(size) + 0.5 - size / 2  # pixel centres relative to the box centre
    if shape == "square":
        m = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        m = v[None, :] ** 2 + v[:, None] ** 2 <= (size / 2) ** 2
    elif shape == "triangle":
        m = np.abs(v)[None, :] <= (np.arange(size)[:, None] + 1) / 2
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    m.setflags(write=False)
    return m


def render_array(scene: Scene) -> np.ndarray:
    """The scene as a uint8 [64, 64, 3] array (black background, flat colours)."""
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for o in scene.objects:
        x0, y0, x1, y1 = o.bbox
        img[y0:y1, x0:x1][shape_mask(o.shape, o.size_px)] = PALETTE[o.colour]
    return img


def render(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB PIL image."""
    # frombytes: several times faster than fromarray for an image this small.
    return Image.frombytes("RGB", (IMAGE_SIZE, IMAGE_SIZE), render_array(scene).tobytes())


# --- Data set ---------------------------------------------------------------------
@dataclass
class Sample(_BaseSample):
    """A :class:`dalle.data.images.Sample` (image, captions, key) with its ``scene``."""

    scene: Scene | None = field(default=None)


def item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The RNG of item ``index`` of ``split``: a function of (seed, split, index) only."""
    _check_split(split)
    return np.random.default_rng([int(seed), SPLIT_IDS[split], int(index)])


def make_item(seed: int, split: str, index: int) -> tuple[Scene, list[str]]:
    rng = item_rng(seed, split, index)
    scene = generate_scene(rng, split)
    return scene, captions_for(scene, rng)


class ShapesDataset:
    """Map-style shapes set: item ``i`` is drawn from (seed, split, i), nothing is stored."""

    def __init__(self, split: str = "train", size: int = 10_000, seed: int = 0) -> None:
        _check_split(split)
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (NumPy seeds are non-negative), got {seed}")
        self.split, self.size, self.seed = split, int(size), int(seed)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} items")
        index %= self.size
        scene, captions = make_item(self.seed, self.split, index)
        key = f"shapes-{self.split}-{self.seed}-{index:06d}"
        return Sample(render(scene), captions, key, scene)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(self.size):
            yield self[i]

    def hard_negatives(self, items: Sequence[Sample], captions: Sequence[str],
                       rng: np.random.Generator) -> tuple[list[Any], list[str]]:
        """The CLIP loop's hook (:class:`dalle.training.clip.HardNegativeSource`): one near-miss
        twin per item (:func:`dalle.data.shapes_twins.hard_negative_twins`), each a scene this
        split may hold (:func:`belongs_to`): a twin never shows a held-out pair, describes a
        held-out description or is an image of another split."""
        from dalle.data.shapes_twins import hard_negative_twins

        return hard_negative_twins(items, captions, rng, accept=lambda scene: belongs_to(scene, self.split))


# --- Writing a folder -------------------------------------------------------------
_WRITE_CHUNK = 500  # items per task handed to a worker process
def _write_range(args: tuple[str, int, int, str, int, int]) -> list[str]:
    """Write items [start, stop) into ``out``; returns their scenes.jsonl lines."""
    out, start, stop, split, seed, digits = args
    folder = Path(out)
    lines = []
    for i in range(start, stop):
        scene, captions = make_item(seed, split, i)
        stem = f"{i:0{digits}d}"
        # compress_level=1: these images are mostly black, so a fast level loses little.
        render(scene).save(folder / f"{stem}.png", compress_level=1)
        (folder / f"{stem}.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
        lines.append(json.dumps({"file": stem, **scene.to_dict()}))
    return lines


def write_shapes(
    out_dir: str | os.PathLike,
    count: int,
    split: str = "train",
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write ``count`` items as ``NNNNNN.png`` + ``NNNNNN.txt`` and a ``scenes.jsonl``.

    Item ``i`` is ``ShapesDataset(split, count, seed)[i]``. ``scenes.jsonl`` holds
    one JSON object per image, in order: ``file`` (the stem), ``category``,
    ``kind``, ``objects`` and ``relation``. ``workers`` defaults to
    min(2, cpu count) processes for large counts.
    """
    _check_split(split)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    digits = max(6, len(str(count - 1)))
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if count >= 2000 else 1
    chunk = _WRITE_CHUNK
    jobs = [(str(out), s, min(s + chunk, count), split, seed, digits) for s in range(0, count, chunk)]

    from tqdm import tqdm

    bar = tqdm(total=count, desc=f"shapes {split}", unit="img", disable=not progress)
    tmp = out / "scenes.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        if workers > 1:
            import multiprocessing as mp

            # spawn: safe whatever threads the parent runs (torch); this module imports fast.
            with mp.get_context("spawn").Pool(workers) as pool:
                for lines in pool.imap(_write_range, jobs):
                    f.write("\n".join(lines) + "\n")
                    bar.update(len(lines))
        else:
            for job in jobs:
                lines = _write_range(job)
                f.write("\n".join(lines) + "\n")
                bar.update(len(lines))
    bar.close()
    os.replace(tmp, out / "scenes.jsonl")
    return out


def read_scenes(folder: str | os.PathLike) -> list[tuple[str, Scene]]:
    """(file stem, Scene) for each line of ``folder/scenes.jsonl``."""
    path = Path(folder) / "scenes.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; write the folder with write_shapes")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                out.append((d["file"], Scene.from_dict(d)))
    return out
