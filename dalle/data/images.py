"""One captioned image: the :class:`Sample` every reader yields, safe image loading, bad items.

Shared by the readers (:mod:`dalle.data.folder`, :mod:`dalle.data.coco`,
:mod:`dalle.data.webdataset`): :func:`load_image`, the caption-file parser, the
errors, :class:`SkipCounter`, and :class:`MapDataset`, the base of the
map-style readers.

Bad images
----------
Scraped data always holds some files that cannot be used: truncated downloads,
HTML error pages saved as ``.jpg``, CMYK or 16-bit images, decompression
bombs.  :func:`load_image` converts what can be converted safely and raises
:class:`BadImageError` (with the reason) for the rest.  The readers count such
items in their ``skipped`` :class:`SkipCounter` and leave them out; when the
bad share passes a threshold (``max_bad_fraction``, or ``max_bad`` files) the
run stops with :class:`TooManyBadImagesError` naming the files, because at that
point the data set itself is probably wrong (wrong folder, wrong format) and
training on the remainder would silently waste the run.

A map-style data set cannot drop an index, so ``dataset[i]`` of a bad item
returns the next good item (``i+1``, ``i+2``, ... wrapping round) instead; the
bad index is remembered so it is decoded only once.  Every consumer that indexes
a data set (the trainers' ``dataset[i]``) therefore always gets a usable
:class:`Sample`, at the cost of a neighbour appearing twice as often - harmless
at a small bad share, and the threshold bounds that share.  Code that must see
every item exactly once (the token cache) calls ``dataset.load(i)``, which
raises :class:`BadImageError` instead of substituting.

With DataLoader workers each worker process counts (and checks the threshold
on) its own share of the items; the main process's counter then stays empty.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

log = logging.getLogger("dalle.data")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# 64 Mpx: far above any training image (the paper trains at 256 px) yet well
# below what would exhaust memory when decoded (64 Mpx RGB = 192 MB).
DEFAULT_MAX_PIXELS = 8192 * 8192
DEFAULT_MAX_BAD_FRACTION = 0.05
# The fraction test waits for this many items, so two bad files among the first
# ten do not stop a run of a million.
DEFAULT_MIN_SEEN = 100
_WARN_FIRST = 10  # individual warnings logged per counter before going quiet
_EXIF_ORIENTATION = 0x0112

PathLike = Union[str, os.PathLike]


class DataError(ValueError):
    """A data set that cannot be read as a whole (nothing found, malformed index file)."""


class BadImageError(ValueError):
    """One image that cannot be used; ``reason`` says why, ``key`` names it when known."""

    def __init__(self, reason: str, key: str | None = None):
        super().__init__(f"{key}: {reason}" if key else reason)
        self.reason = reason
        self.key = key


class TooManyBadImagesError(DataError):
    """More bad images than the configured threshold allows."""



@dataclass
class Sample:
    """One captioned image: ``image`` is RGB, ``captions`` has at least one entry."""

    image: Image.Image
    captions: list[str]
    key: str


@dataclass(frozen=True)
class Skipped:
    """Marker for an item left out (yielded by ``iter_items``), with the reason."""

    key: str
    reason: str
    count: int = 1  # items it stands for (the samples lost in a broken shard)

    def __bool__(self) -> bool:  # so ``if item:`` filters markers out
        return False


# --- Counting bad items ------------------------------------------------------------


class SkipCounter:
    """Counts items seen and items skipped (with the reason), and enforces the threshold.

    The run stops when more than ``max_bad`` items were skipped (if set), or when
    the skipped share exceeds ``max_bad_fraction`` once at least ``min_seen``
    items were seen (or at the end of a pass, ``check(final=True)``).
    """

    def __init__(
        self,
        max_bad_fraction: float | None = DEFAULT_MAX_BAD_FRACTION,
        max_bad: int | None = None,
        min_seen: int = DEFAULT_MIN_SEEN,
    ):
        if max_bad_fraction is not None and not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1] or None, got {max_bad_fraction}")
        if max_bad is not None and max_bad < 0:
            raise ValueError(f"max_bad must be >= 0 or None, got {max_bad}")
        self.max_bad_fraction = max_bad_fraction
        self.max_bad = max_bad
        self.min_seen = min_seen
        self.seen = 0
        self.skipped = 0
        self.reasons: dict[str, str] = {}  # key -> reason, each key once

    def policy(self) -> dict[str, Any]:
        """The threshold settings, to build another counter with the same policy."""
        return {"max_bad_fraction": self.max_bad_fraction, "max_bad": self.max_bad, "min_seen": self.min_seen}

    def ok(self, n: int = 1) -> None:
        self.seen += n

    def skip(self, key: str, reason: str, check: bool = True, count: int = 1) -> None:
        """Count ``count`` bad items under one ``key`` (more than one: samples lost in a broken shard)."""
        self.seen += count
        self.skipped += count
        self.reasons[key] = reason
        if self.skipped <= _WARN_FIRST:
            log.warning("skipping %s: %s", key, reason)
            if self.skipped == _WARN_FIRST:
                log.warning("further skipped images are counted but not logged one by one")
        if check:
            self.check()

    def __len__(self) -> int:
        return self.skipped

    @property
    def fraction(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def check(self, final: bool = False) -> None:
        """Raise :class:`TooManyBadImagesError` if the threshold is passed."""
        over_count = self.max_bad is not None and self.skipped > self.max_bad
        over_fraction = (
            self.max_bad_fraction is not None
            and (final or self.seen >= self.min_seen)
            and self.fraction > self.max_bad_fraction
        )
        if not (over_count or over_fraction):
            return
        limit = f"max_bad={self.max_bad}" if over_count else f"max_bad_fraction={self.max_bad_fraction:g}"
        raise TooManyBadImagesError(
            f"{self.skipped} of {self.seen} images ({100 * self.fraction:.1f}%) could not be used, "
            f"more than {limit} allows: {self._listing()}. Fix or remove these files, or, if this share of bad "
            f"files is expected, raise the limit (dalle train --set data.max_bad_fraction="
            f"{min(1.0, math.ceil(100 * self.fraction + 1) / 100):g})."
        )

    def _listing(self, limit: int = 20) -> str:
        items = list(self.reasons.items())
        text = "; ".join(f"{k} ({r})" for k, r in items[:limit])
        if len(items) > limit:
            text += f"; ... and {len(items) - limit} more"
        return text

    def summary(self) -> str:
        """One line for the log: how many were skipped and why."""
        if not self.skipped:
            return f"{self.seen} images read, none skipped"
        return f"{self.seen} images read, {self.skipped} skipped ({100 * self.fraction:.1f}%): {self._listing(5)}"


# --- Loading one image safely -----------------------------------------------------------


def load_image(source: PathLike | bytes | bytearray | IO[bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``source`` (a path, the file's bytes, or a binary file object) to an RGB image.

    Converted where it is safe: grayscale (``1``, ``L``), palette (``P``), CMYK
    and YCbCr become RGB; 16-bit grayscale (``I;16``, ``I``) is scaled from
    0..65535 to 0..255; images with transparency (``LA``, ``RGBA``, ``PA``,
    palette or grayscale with a transparent colour) are composited over
    **black**, because black is the background of the shapes set the models are
    trained on, so a transparent area reads as empty background.  EXIF rotation
    is applied, since captions say left and right.

    Raises :class:`BadImageError` for a missing, unreadable or truncated file, a
    file that is not an image, a float or out-of-range 32-bit image, or one
    whose declared size exceeds ``max_pixels`` (a decompression bomb: the size
    is checked from the header before any pixel is decoded).  Pillow's own
    bomb guard (``Image.MAX_IMAGE_PIXELS``) still applies on top.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        fp: Any = io.BytesIO(bytes(source))
    else:
        fp = source
    try:
        with warnings.catch_warnings():
            # Our own max_pixels test below replaces Pillow's bomb warning; Pillow's
            # hard DecompressionBombError (twice its limit) is caught as a bad image.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", message="Palette images with Transparency")
            with Image.open(fp) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise BadImageError(
                        f"decompression bomb refused: declared size {width}x{height} = {width * height} pixels "
                        f"exceeds max_pixels={max_pixels}"
                    )
                if width < 1 or height < 1:
                    raise BadImageError(f"empty image ({width}x{height})")
                im.load()  # decode now so truncation surfaces here, not later
                if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # rotated photo: captions say left/right
                    im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError("file not found") from None
    except Image.DecompressionBombError as e:
        raise BadImageError(f"decompression bomb refused by Pillow: {e}") from None
    except UnidentifiedImageError:
        raise BadImageError("not an image file Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as e:
        # "image file is truncated", broken chunks, bad headers.
        raise BadImageError(f"cannot decode: {type(e).__name__}: {e}") from None


def _composite_over_black(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size, (0, 0, 0))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_over_black(im)
    if "transparency" in im.info and mode in ("P", "L", "1", "RGB"):
        return _composite_over_black(im)
    if mode == "RGB":
        return im.copy() if im.readonly else im
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "RGBX"):
        # CMYK: Pillow's naive conversion (no ICC colour management); close enough for training.
        return im.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im)
        if mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
            raise BadImageError(f"32-bit integer image with values outside 0..65535 (min {a.min()}, max {a.max()})")
        a8 = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # 16-bit -> 8-bit, rounded
        return Image.fromarray(a8, "L").convert("RGB")
    if mode == "F":
        raise BadImageError("floating-point image (mode F) has no safe mapping to 8-bit RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImageError(f"cannot convert image mode {mode} to RGB: {e}") from None


# --- Captions --------------------------------------------------------------------------


def parse_caption_lines(text: str) -> list[str]:
    """One caption a line: lines split on ``\\n`` (a ``\\r`` before it dropped), stripped, blanks dropped."""
    return [line.strip() for line in text.split("\n") if line.strip()]


def read_captions_file(path: PathLike) -> list[str]:
    """Captions of a ``.txt`` file (UTF-8, a byte-order mark allowed); raises :class:`BadImageError`."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise BadImageError("captions file not found") from None
    except UnicodeDecodeError as e:
        raise BadImageError(f"captions file is not UTF-8 ({e})") from None
    except OSError as e:
        raise BadImageError(f"cannot read captions file: {e}") from None
    captions = parse_caption_lines(text)
    if not captions:
        raise BadImageError("captions file holds no caption (only blank lines)")
    return captions


# --- Map-style readers -----------------------------------------------------------------


class MapDataset(Dataset):
    """Shared by the map-style readers: ``load(i)`` raises, ``__getitem__(i)`` substitutes."""

    skipped: SkipCounter
    max_pixels: int

    def __init__(self, max_pixels: int, max_bad_fraction: float | None, max_bad: int | None):
        self.max_pixels = max_pixels
        self.skipped = SkipCounter(max_bad_fraction, max_bad)
        self._bad: set[int] = set()

    def __len__(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def key(self, index: int) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def load(self, index: int) -> Sample:  # pragma: no cover - overridden
        """Item ``index``; raises :class:`BadImageError` (with ``key``) if it cannot be used."""
        raise NotImplementedError

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a data set of {n} items")
        return index % n

    def __getitem__(self, index: int) -> Sample:
        index = self._check_index(int(index))
        n = len(self)
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                sample = self.load(i)
            except BadImageError as e:
                self._bad.add(i)
                self.skipped.skip(e.key or self.key(i), e.reason)
                continue
            self.skipped.ok()
            return sample
        raise TooManyBadImagesError(f"no usable image in the whole data set: {self.skipped.summary()}")



__all__ = [
    "BadImageError",
    "DataError",
    "DEFAULT_MAX_BAD_FRACTION",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "MapDataset",
    "Sample",
    "SkipCounter",
    "Skipped",
    "TooManyBadImagesError",
    "load_image",
    "parse_caption_lines",
    "read_captions_file",
]
