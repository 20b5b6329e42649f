"""A program that judges whether an image shows what a shapes-set caption says.

It reads only pixels, never the generator's scene, so it applies equally to the
set's own images and to a model's samples (which at 64 px are blurry, noisy,
slightly off-colour and ragged). The numbers it relies on are the contract in
/work/shared/SHAPES.md, restated here on purpose rather than imported from
``dalle.data.shapes``: a renderer and a checker written separately must agree.

How an image is read (:func:`detect_objects`):

1. Foreground: pixels whose brightest channel is at least ``FOREGROUND_THRESHOLD``
   (64 of 255; every palette colour has a channel of 200 or more, the background is 0).
2. Objects: 8-connected components of the foreground (min-label propagation in
   NumPy). Each is re-thresholded at half its own typical brightness, which puts
   a blurred edge back where it was, and kept if that leaves ``MIN_OBJECT_AREA``
   (16) pixels or more: the smallest legal object (a 10 px triangle) has 60, so a
   16-pixel blob is debris, not an object.
3. Colour: the nearest palette entry (RGB distance) to the median colour of the
   object's bright interior, with two caps so that a blend is not read as the
   palette colour between its parts (a disc half red, half yellow has an orange
   median): the median lies within ``COLOUR_MAX_DISTANCE`` (60; the palette's two
   closest entries, orange and yellow, are 91 apart) of the entry, and at least
   ``MIN_COLOUR_SHARE`` (2/3) of the interior's pixels have that entry as their own
   nearest one.  Otherwise the colour is "off-palette" or "mixed" and fails any
   caption.  The set's own images are flat (distance 0, share 1).
4. Shape: from the fill ratio of the bounding box (square ~1.0, circle ~0.79,
   triangle ~0.55) and the share of the mass in the lower half of the box
   (triangle ~0.72, others 0.5), with bands wide enough for blur and noise; see
   :func:`classify_shape`. Boxes far from square (aspect > 1.5) are "unknown".
5. Size: bounding-box side (the larger of width and height): below 18 px is
   small (drawn 10-14), 18 or more is large (drawn 22-28); 18 is the midpoint
   of the gap. Over 36 px is "oversized", no object of the set, and fails any
   caption.
6. Region: the 3x3 grid cell holding the bounding box's centre.

Relations, read between the box centres of the two objects named: "A to the left
of B" holds when B's centre is at least ``RELATION_MIN_DISTANCE`` (10) px right
of A's and the horizontal offset exceeds the vertical one (likewise for the
others). The set draws them 20+ px apart along, at most 12 px across.

An image passes a caption when the objects found are exactly the objects named
(same number, each with its colour and shape, and size, region or relation where
named), in some matching.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
from PIL import Image

# --- The contract, restated ---------------------------------------------------
IMAGE_SIZE = 64
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
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
HELD_OUT = frozenset(
    {("purple", "triangle"), ("orange", "circle"), ("cyan", "square"), ("yellow", "triangle")}
)
REGIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
CATEGORIES = ("single", "single_size", "single_region", "pair", "pair_relation", "zero_shot")

# --- The judge's own tolerances -------------------------------------------------
FOREGROUND_THRESHOLD = 64
MIN_OBJECT_AREA = 16
SIZE_SPLIT_PX = 18  # side < 18: small; >= 18: large
MAX_SIDE_PX = 36  # larger than any object of the set (28) by a wide margin: "oversized"
MAX_ASPECT = 1.5
RELATION_MIN_DISTANCE = 10.0
COLOUR_MAX_DISTANCE = 60.0  # median interior colour to its palette entry, RGB distance
MIN_COLOUR_SHARE = 2 / 3  # of the interior's pixels, nearest to the object's palette entry

_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[c] for c in _PALETTE_NAMES], dtype=np.float32)

# --- Caption grammar ---------------------------------------------------------------
# caption := [prefix] body [suffix]
# body    := object [region] | object "and" object | object relation object
# object  := ("a" | "an") [size] colour shape
_PREFIXES = ("a picture of ", "an image of ", "a drawing of ", "a photo of ")
_SUFFIXES = (" on a black background",)
_RELATION_WORDS = {
    ("to", "the", "left", "of"): "left of",
    ("to", "the", "right", "of"): "right of",
    ("above",): "above",
    ("below",): "below",
}


def _region_phrases() -> dict[str, str]:
    phrases: dict[str, str] = {}
    for region in REGIONS:
        if " " in region:  # a corner
            for prep in ("in the", "at the"):
                phrases[f"{prep} {region}"] = region
                phrases[f"{prep} {region} corner"] = region
        elif region == "center":
            for word in ("center", "centre", "middle"):
                phrases[f"in the {word}"] = region
        elif region in ("top", "bottom"):
            for prep in ("at the", "near the"):
                phrases[f"{prep} {region}"] = region
        else:  # left, right
            for prep in ("on the", "at the"):
                phrases[f"{prep} {region}"] = region
    return phrases


REGION_PHRASES: dict[str, str] = _region_phrases()


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str
    size: str | None = None
    region: str | None = None

    def describe(self) -> str:
        words = [w for w in (self.size, self.colour, self.shape) if w]
        return " ".join(words) + (f" ({self.region})" if self.region else "")


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for; ``relation`` reads ``objects[0] <relation> objects[1]``."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None


def _grammar_help() -> str:
    return (
        "captions look like 'a red circle', 'a small red circle', 'a red circle in the top left corner', "
        "'a red circle and a blue square', 'a red circle to the left of / to the right of / above / "
        f"below a blue square'; colours: {', '.join(PALETTE)}; shapes: {', '.join(SHAPES)}"
    )


def _parse_object(words: list[str], i: int, caption: str) -> tuple[ObjectSpec, int]:
    def fail(what: str) -> ValueError:
        return ValueError(f"cannot parse caption {caption!r}: {what}; {_grammar_help()}")

    if i >= len(words) or words[i] not in ("a", "an"):
        got = words[i] if i < len(words) else "the end"
        raise fail(f"expected 'a' or 'an' before an object, got {got!r}")
    i += 1
    size = None
    if i < len(words) and words[i] in SIZES:
        size, i = words[i], i + 1
    if i >= len(words) or words[i] not in PALETTE:
        got = words[i] if i < len(words) else "the end"
        raise fail(f"expected a colour, got {got!r}")
    colour, i = words[i], i + 1
    if i >= len(words) or words[i] not in SHAPES:
        got = words[i] if i < len(words) else "the end"
        raise fail(f"expected a shape after {colour!r}, got {got!r}")
    return ObjectSpec(colour, words[i], size), i + 1


def parse_caption(caption: str) -> CaptionSpec:
    """Read a caption of the shapes grammar; ValueError (saying what is wrong) otherwise."""
    if not isinstance(caption, str):
        raise ValueError(f"a caption must be a string, got {type(caption).__name__}")
    text = " ".join(caption.lower().replace(",", " ").split()).rstrip(".").strip()
    if not text:
        raise ValueError(f"cannot parse an empty caption; {_grammar_help()}")
    for prefix in _PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    for suffix in _SUFFIXES:
        if text.endswith(suffix):
            text = text[: -len(suffix)]
            break
    words = text.split()
    first, i = _parse_object(words, 0, caption)
    rest = words[i:]
    if not rest:
        return CaptionSpec((first,))
    if rest[0] == "and":
        second, j = _parse_object(words, i + 1, caption)
        if j != len(words):
            raise ValueError(
                f"cannot parse caption {caption!r}: unexpected {' '.join(words[j:])!r} at the end"
            )
        return CaptionSpec((first, second))
    for phrase, relation in _RELATION_WORDS.items():
        if tuple(rest[: len(phrase)]) == phrase:
            second, j = _parse_object(words, i + len(phrase), caption)
            if j != len(words):
                raise ValueError(
                    f"cannot parse caption {caption!r}: unexpected {' '.join(words[j:])!r} at the end"
                )
            return CaptionSpec((first, second), relation)
    region = REGION_PHRASES.get(" ".join(rest))
    if region is None:
        raise ValueError(
            f"cannot parse caption {caption!r}: {' '.join(rest)!r} after the object is neither a region "
            f"(e.g. 'in the top left corner', 'at the bottom', 'in the center'), 'and' + an object, "
            f"nor a relation + an object; {_grammar_help()}"
        )
    return CaptionSpec((ObjectSpec(first.colour, first.shape, first.size, region),))


def caption_category(caption: str) -> str:
    """The caption's evaluation category: zero_shot when it names a held-out pair."""
    spec = parse_caption(caption)
    if any((o.colour, o.shape) in HELD_OUT for o in spec.objects):
        return "zero_shot"
    if len(spec.objects) == 2:
        return "pair_relation" if spec.relation else "pair"
    obj = spec.objects[0]
    if obj.region:
        return "single_region"
    return "single_size" if obj.size else "single"


# --- Reading an image -----------------------------------------------------------------
@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str  # circle, square, triangle or "unknown"
    size: str
    region: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    centre: tuple[float, float]
    area: int
    fill: float  # area / bbox area
    lower_mass: float  # share of the area in the lower half of the bbox
    rgb: tuple[int, int, int]  # median colour of the interior
    colour_distance: float  # RGB distance from the median to the nearest palette entry
    colour_share: float  # share of interior pixels whose nearest palette entry is that one

    def describe(self) -> str:
        return f"{self.size} {self.colour} {self.shape} ({self.region})"


def to_rgb_array(image: Any) -> np.ndarray:
    """A uint8 [64, 64, 3] array from a PIL image, an HWC array, or a CHW tensor in [0, 1].

    Square images of another size are resized to 64x64 (bilinear), since the
    judge's pixel tolerances are for 64 px.
    """
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"))
    elif hasattr(image, "detach"):  # a torch tensor, without importing torch
        t = image.detach().cpu().float()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"expected a [3, H, W] image tensor in [0, 1], got shape {tuple(t.shape)}")
        arr = (t.clamp(0, 1) * 255).round().numpy().astype(np.uint8).transpose(1, 2, 0)
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an [H, W, 3] RGB array, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            # Float arrays are taken to be in [0, 1], like the project's tensors.
            arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    else:
        raise ValueError(f"expected a PIL image, a NumPy array or a torch tensor, got {type(image).__name__}")
    h, w = arr.shape[:2]
    if h != w:
        raise ValueError(f"expected a square image, got {w}x{h}")
    if h != IMAGE_SIZE:
        arr = np.asarray(Image.fromarray(arr).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
    return np.ascontiguousarray(arr)


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean [H, W] mask, as arrays of flat pixel indices.

    Each foreground pixel starts labelled with its own flat index; labels shrink
    to the smallest in the 3x3 neighbourhood (a separable min: rows, then
    columns) and jump to their label's label, until nothing changes. Work is
    done on the mask's bounding box only.
    """
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return []
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    sub = mask[r0:r1, c0:c1]
    sh, sw = sub.shape
    none = sh * sw
    labels = np.where(sub, np.arange(none).reshape(sh, sw), none)
    background = ~sub
    while True:
        horiz = labels.copy()
        np.minimum(horiz[:, 1:], labels[:, :-1], out=horiz[:, 1:])
        np.minimum(horiz[:, :-1], labels[:, 1:], out=horiz[:, :-1])
        new = horiz.copy()
        np.minimum(new[1:], horiz[:-1], out=new[1:])
        np.minimum(new[:-1], horiz[1:], out=new[:-1])
        new[background] = none
        flat = new.ravel()
        fg = flat < none
        for _ in range(3):  # pointer jumping: a label is a pixel whose label is <= it
            flat[fg] = flat[flat[fg]]
        if np.array_equal(new, labels):
            break
        labels = new
    flat = labels.ravel()
    local = np.flatnonzero(flat < none)
    order = np.argsort(flat[local], kind="stable")
    local = local[order]
    _, starts = np.unique(flat[local], return_index=True)
    # Back to flat indices of the full [H, W] mask.
    full = (local // sw + r0) * w + (local % sw + c0)
    return np.split(full, starts[1:])


def classify_shape(fill: float, lower_mass: float, aspect: float) -> str:
    """Circle, square or triangle from box fill and lower-half mass; "unknown" if none fits.

    Drawn: square 1.0 / 0.5, circle 0.78-0.81 / 0.5, triangle 0.54-0.60 / 0.70-0.73.
    Blur fattens a small triangle (fill up to ~0.8) but keeps its mass low (>= ~0.62),
    so the lower-half share is what tells triangles apart; fill then splits the
    symmetric shapes. A box far from square, a top-heavy blob, or a fill below
    any shape's is "unknown" (and fails any caption).
    """
    if aspect > MAX_ASPECT:
        return "unknown"
    if lower_mass >= 0.6:
        return "triangle" if fill < 0.85 else "unknown"
    if lower_mass < 0.4:
        return "unknown"
    if fill >= 0.89:
        return "square"
    if fill >= 0.66:
        return "circle"
    return "unknown"


def colour_of(pixels: np.ndarray, k: int, median_distance: float) -> tuple[str, float]:
    """``(colour, share)`` of an object whose interior ``pixels`` ([N, 3] RGB) have their
    median nearest to palette entry ``k``, at ``median_distance``: the entry's name, or
    "off-palette" / "mixed" when a cap fails (see the module docstring)."""
    to_palette = np.linalg.norm(pixels[:, None, :] - _PALETTE_RGB[None], axis=2)  # [N, palette]
    own = to_palette.argmin(axis=1) == k
    share = float(own.mean()) if len(pixels) else 0.0
    if median_distance > COLOUR_MAX_DISTANCE:
        return "off-palette", share
    if share < MIN_COLOUR_SHARE:
        return "mixed", share
    return _PALETTE_NAMES[k], share


def _size_label(side: int) -> str:
    if side > MAX_SIDE_PX:
        return "oversized"
    return "small" if side < SIZE_SPLIT_PX else "large"


def detect_objects(image: Any) -> list[DetectedObject]:
    """The objects in an image, read from pixels only (see the module docstring)."""
    rgb = to_rgb_array(image)
    bright = rgb.max(axis=2).astype(np.float32)
    flat_rgb = rgb.reshape(-1, 3)
    flat_bright = bright.ravel()
    found = []
    for comp in connected_components(bright >= FOREGROUND_THRESHOLD):
        b = flat_bright[comp]
        ref = float(np.percentile(b, 75))
        body = comp[b >= 0.5 * ref]
        if body.size < MIN_OBJECT_AREA:
            continue
        ys, xs = np.divmod(body, IMAGE_SIZE)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        w, h = x1 - x0, y1 - y0
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        fill = body.size / (w * h)
        row_centre = ys + 0.5
        lower = float(np.sum(row_centre > cy) + 0.5 * np.sum(row_centre == cy)) / body.size
        aspect = max(w, h) / min(w, h)
        interior = comp[b >= 0.75 * ref]
        pixels = flat_rgb[interior if interior.size else body].astype(np.float32)
        median = np.median(pixels, axis=0)
        dist = np.linalg.norm(_PALETTE_RGB - median, axis=1)
        k = int(np.argmin(dist))
        colour, share = colour_of(pixels, k, float(dist[k]))
        col = min(2, int(cx * 3 // IMAGE_SIZE))
        row = min(2, int(cy * 3 // IMAGE_SIZE))
        found.append(
            DetectedObject(
                colour=colour,
                shape=classify_shape(fill, lower, aspect),
                size=_size_label(max(w, h)),
                region=REGIONS[3 * row + col],
                bbox=(x0, y0, x1, y1),
                centre=(cx, cy),
                area=int(body.size),
                fill=float(fill),
                lower_mass=lower,
                rgb=tuple(int(round(v)) for v in median),
                colour_distance=float(dist[k]),
                colour_share=share,
            )
        )
    return found


# --- Judging ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Judgement:
    passed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.passed


def _mismatches(want: ObjectSpec, got: DetectedObject) -> list[str]:
    out = []
    if got.size not in SIZES:  # fails whether or not the caption names a size
        w, h = got.bbox[2] - got.bbox[0], got.bbox[3] - got.bbox[1]
        out.append(f"{got.size} ({w}x{h} px; the set's largest object is 28 px)")
    for attr, wanted, seen in (
        ("colour", want.colour, got.colour),
        ("shape", want.shape, got.shape),
        ("size", want.size, got.size),
        ("region", want.region, got.region),
    ):
        if wanted is not None and wanted != seen:
            out.append(f"{attr} {seen} instead of {wanted}")
    return out


def relation_holds(relation: str, a: DetectedObject, b: DetectedObject) -> bool:
    """Whether ``a <relation> b`` holds between the two box centres."""
    dx = b.centre[0] - a.centre[0]  # > 0: b right of a
    dy = b.centre[1] - a.centre[1]  # > 0: b below a
    main, cross = {
        "left of": (dx, dy),
        "right of": (-dx, dy),
        "above": (dy, dx),
        "below": (-dy, dx),
    }[relation]
    return main >= RELATION_MIN_DISTANCE and abs(cross) < main


def judge(image: Any, caption: str) -> Judgement:
    """Pass when the image holds exactly the objects the caption names, as named."""
    spec = parse_caption(caption)
    found = detect_objects(image)
    seen = ", ".join(o.describe() for o in found) or "nothing"
    if len(found) != len(spec.objects):
        return Judgement(
            False, f"caption names {len(spec.objects)} object(s), image shows {len(found)}: {seen}"
        )
    best = None
    for order in itertools.permutations(found):
        problems = []
        for want, got in zip(spec.objects, order):
            problems += [f"{want.describe()}: {p}" for p in _mismatches(want, got)]
        if not problems and spec.relation and not relation_holds(spec.relation, *order):
            a, b = order
            problems.append(
                f"{a.describe()} is not {spec.relation} {b.describe()} "
                f"(centres {a.centre} and {b.centre})"
            )
        if not problems:
            return Judgement(True, f"ok: {seen}")
        if best is None or len(problems) < len(best):
            best = problems
    return Judgement(False, "; ".join(best) + f" (image shows {seen})")


def evaluate_images(
    pairs: Iterable[tuple[Any, str]], failures: list[tuple[str, str]] | None = None
) -> dict[str, float]:
    """Pass rate per caption category over (image, caption) pairs.

    Only categories that occur are reported, in CATEGORIES order. Failing
    (caption, reason) pairs are appended to ``failures`` when it is given.
    """
    passed: dict[str, int] = {}
    total: dict[str, int] = {}
    for image, caption in pairs:
        cat = caption_category(caption)
        verdict = judge(image, caption)
        total[cat] = total.get(cat, 0) + 1
        passed[cat] = passed.get(cat, 0) + int(verdict.passed)
        if failures is not None and not verdict.passed:
            failures.append((caption, verdict.reason))
    return {c: passed[c] / total[c] for c in CATEGORIES if c in total}


def real_image_pairs(split: str = "test", count: int = 1000, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """(image, caption) for every caption of the first ``count`` items of a shapes split."""
    from dalle.data.shapes import ShapesDataset  # only this helper uses the generator

    ds = ShapesDataset(split, count, seed)
    return [(s.image, c) for s in ds for c in s.captions]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pass rate of the shapes judge on real shapes images.")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--count", type=int, default=2000, help="images (all their captions are judged)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show-failures", type=int, default=5)
    args = parser.parse_args(argv)
    failures: list[tuple[str, str]] = []
    rates = evaluate_images(real_image_pairs(args.split, args.count, args.seed), failures)
    print(json.dumps(rates, indent=2))
    for caption, reason in failures[: args.show_failures]:
        print(f"FAIL {caption!r}: {reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
