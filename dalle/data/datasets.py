"""Readers for users' captioned-image data, and safe image loading.

Three layouts are read, each into :class:`Sample` items (an RGB PIL image, all
of its captions, a key naming it):

* :class:`FolderDataset` - image files with a same-named ``.txt`` beside each,
  one caption a line (the layout ``dalle data shapes`` writes);
* :class:`CocoDataset` - MS-COCO ``captions_*.json`` plus a folder of images;
* :class:`IndexedShards` - WebDataset ``.tar`` shards as img2dataset writes
  them, local and uncompressed, with random access (each shard's member
  headers are read once; ``dataset[i]`` then reads just that sample's bytes);
* :class:`WebDatasetShards` - the same shards streamed, also from ``http(s)://``
  URLs and compressed tars, for data that cannot be indexed (read with the
  standard library's ``tarfile``; the ``webdataset`` package is not needed).

:func:`open_dataset` picks the reader from what a path holds.  The dVAE and
CLIP loops draw batches by index, so they need one of the map-style readers;
a stream raises :class:`StreamingOnlyError` saying so.

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

import glob
import io
import json
import logging
import os
import re
import tarfile
import urllib.request
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Container, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset, get_worker_info

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


class StreamingOnlyError(DataError, TypeError):
    """``len()`` or ``dataset[i]`` of a reader that can only stream (URLs, compressed shards).

    Also a :class:`TypeError`, the error ``len()`` of an unsized object raises, so
    code that probes for a length (``list()``, ``tqdm``, ``len(loader)``) still
    treats the reader as a plain iterable.
    """


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

    def skip(self, key: str, reason: str, check: bool = True) -> None:
        self.seen += 1
        self.skipped += 1
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
            f"more than {limit} allows: {self._listing()}. Fix or remove these files, or raise the "
            "limit if this share of bad files is expected."
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


class _MapDataset(Dataset):
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


class FolderDataset(_MapDataset):
    """Images with a same-named ``.txt`` caption file beside each, found recursively.

    ``root/a.png`` + ``root/a.txt``, ``root/sub/b.jpg`` + ``root/sub/b.txt``, ...
    Sub-folders are searched (users' data is often sharded into folders); hidden
    files and folders (names starting with ``.``) are ignored.  Items are in
    sorted path order; ``key`` is the path relative to ``root`` without the
    extension.  An image without its ``.txt`` is counted as skipped when the
    data set is opened (and the threshold checked over all images found).
    Caption files are read when their item is, so opening a large folder is fast.
    """

    def __init__(
        self,
        root: PathLike,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bad_fraction: float | None = DEFAULT_MAX_BAD_FRACTION,
        max_bad: int | None = None,
    ):
        super().__init__(max_pixels, max_bad_fraction, max_bad)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a directory; FolderDataset needs a folder of images with .txt captions")
        images = _find_images(self.root)
        self._items: list[tuple[str, str]] = []  # (image path, caption path), relative to root
        for rel in images:
            txt = os.path.splitext(rel)[0] + ".txt"
            if (self.root / txt).is_file():
                self._items.append((rel, txt))
            else:
                self.skipped.skip(rel, f"no captions file {txt}", check=False)
        if not self._items:
            what = f"{len(images)} image(s) but none has a same-named .txt" if images else "no image files"
            raise DataError(
                f"{self.root}: found {what}; a folder data set needs image files "
                f"({', '.join(IMAGE_EXTENSIONS)}) each with a .txt of the same name holding one caption a line"
            )
        if self.skipped.skipped:
            self.skipped.ok(len(self._items))
            self.skipped.check(final=True)

    def __len__(self) -> int:
        return len(self._items)

    def key(self, index: int) -> str:
        return os.path.splitext(self._items[index][0])[0]

    def load(self, index: int) -> Sample:
        rel_image, rel_txt = self._items[self._check_index(index)]
        try:
            captions = read_captions_file(self.root / rel_txt)
            image = load_image(self.root / rel_image, self.max_pixels)
        except BadImageError as e:
            raise BadImageError(e.reason, key=rel_image) from None
        return Sample(image=image, captions=captions, key=os.path.splitext(rel_image)[0])


def _find_images(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(name if rel_dir == "." else Path(rel_dir, name).as_posix())
    return sorted(found)


class CocoDataset(_MapDataset):
    """MS-COCO captions: ``captions_*.json`` (``images`` and ``annotations``) and the image folder.

    All captions of an image are grouped into one :class:`Sample` (COCO has about
    five).  Images without any caption are left out (not counted as bad: test
    splits have none); if no image has a caption, opening fails.  Items follow
    the order of the JSON's ``images`` list; ``key`` is the file name without
    extension.  Missing image files are found when loaded (counted as skipped).
    """

    def __init__(
        self,
        captions_json: PathLike,
        image_dir: PathLike,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bad_fraction: float | None = DEFAULT_MAX_BAD_FRACTION,
        max_bad: int | None = None,
    ):
        super().__init__(max_pixels, max_bad_fraction, max_bad)
        self.captions_json = Path(captions_json)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DataError(f"COCO image folder {self.image_dir} does not exist")
        try:
            data = json.loads(self.captions_json.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"COCO captions file {self.captions_json} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.captions_json} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list
        ):
            raise DataError(
                f"{self.captions_json}: expected a COCO captions object with lists 'images' "
                "([{id, file_name}]) and 'annotations' ([{image_id, caption}])"
            )
        files: dict[Any, str] = {}
        order: list[Any] = []
        for n, entry in enumerate(data["images"]):
            try:
                image_id, file_name = entry["id"], entry["file_name"]
            except (TypeError, KeyError):
                raise DataError(f"{self.captions_json}: images[{n}] lacks 'id' or 'file_name'") from None
            if image_id not in files:
                order.append(image_id)
            files[image_id] = str(file_name)
        captions: dict[Any, list[str]] = {}
        self.orphan_captions = 0  # annotations naming an image id absent from 'images'
        for n, ann in enumerate(data["annotations"]):
            try:
                image_id, caption = ann["image_id"], ann["caption"]
            except (TypeError, KeyError):
                raise DataError(f"{self.captions_json}: annotations[{n}] lacks 'image_id' or 'caption'") from None
            if image_id not in files:
                self.orphan_captions += 1
                continue
            if isinstance(caption, str) and caption.strip():
                captions.setdefault(image_id, []).append(caption.strip())
        self._items = [(files[i], captions[i]) for i in order if i in captions]
        if not self._items:
            raise DataError(f"{self.captions_json}: no image has a caption (is this a test split without annotations?)")

    def __len__(self) -> int:
        return len(self._items)

    def key(self, index: int) -> str:
        return os.path.splitext(self._items[index][0])[0]

    def load(self, index: int) -> Sample:
        file_name, captions = self._items[self._check_index(index)]
        try:
            image = load_image(self.image_dir / file_name, self.max_pixels)
        except BadImageError as e:
            raise BadImageError(e.reason, key=file_name) from None
        return Sample(image=image, captions=list(captions), key=os.path.splitext(file_name)[0])


# --- WebDataset shards -------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` ranges (zero-padded to the first bound's width) and ``{a,b}`` lists."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    inner, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", inner)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if hi < lo:
            raise DataError(f"brace range {{{inner}}} in {pattern!r} runs backwards")
        width = len(rng.group(1))
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    elif "," in inner:
        options = inner.split(",")
    else:
        raise DataError(f"cannot expand {{{inner}}} in {pattern!r}: use {{000..099}} or {{a,b,c}}")
    return [out for opt in options for out in expand_braces(head + opt + tail)]


def _is_url(s: str) -> bool:
    return re.match(r"^(https?|file)://", s) is not None


def expand_shards(urls_or_glob: PathLike | Sequence[PathLike]) -> list[str]:
    """The list of shards named by paths, URLs, globs, brace patterns or folders (of ``*.tar``)."""
    specs = [urls_or_glob] if isinstance(urls_or_glob, (str, os.PathLike)) else list(urls_or_glob)
    shards: list[str] = []
    for spec in specs:
        for item in expand_braces(os.fspath(spec)):
            if _is_url(item):
                shards.append(item)
            elif any(c in item for c in "*?["):
                matches = sorted(glob.glob(item))
                if not matches:
                    raise DataError(f"no shard matches the pattern {item!r}")
                shards.extend(matches)
            elif os.path.isdir(item):
                tars = sorted(str(p) for p in Path(item).glob("*.tar"))
                if not tars:
                    raise DataError(f"folder {item} holds no .tar shards")
                shards.extend(tars)
            elif os.path.isfile(item):
                shards.append(item)
            else:
                raise DataError(f"shard {item} does not exist")
    if not shards:
        raise DataError(f"no shards in {urls_or_glob!r}")
    return shards


# Compressed files' first bytes.  bzip2 is matched with its block magic too
# (below), so a tar whose first member is named "BZh..." is not taken for one.
_COMPRESSION_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


def shard_compression(shard: PathLike) -> str | None:
    """``"gzip"``, ``"bzip2"``, ``"xz"`` or ``"zstd"`` when a local shard is compressed (sniffed), else None."""
    try:
        with open(shard, "rb") as f:
            head = f.read(10)
    except OSError:
        return None
    for magic, name in _COMPRESSION_MAGIC:
        if head.startswith(magic):
            return name
    if re.match(rb"BZh[1-9](\x31\x41\x59\x26\x53\x59|\x17\x72\x45\x38\x50\x90)", head):
        return "bzip2"
    return None


def _open_stream(shard: str) -> IO[bytes]:
    if _is_url(shard):
        return urllib.request.urlopen(shard)  # noqa: S310 - the user names the URL
    return open(shard, "rb")


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset naming: the key is the path up to the first dot of the file name."""
    name = name[2:] if name.startswith("./") else name
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _tar_sample_member(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """``(key, extension)`` of a member that belongs to a sample, None for the rest.

    Directories, links, hidden files (``.x``, macOS's ``._x.jpg``) and
    extension-less names belong to no sample.  Shared by the streaming and the
    indexed reader, so both see the same samples.
    """
    if not member.isfile() or os.path.basename(member.name).startswith("."):
        return None
    k, ext = _split_member(member.name)
    if not ext:
        return None
    return k, ext


def iter_tar_groups(
    stream: IO[bytes], shard: str, read: Container[str] | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream ``(key, {extension: bytes})`` groups from a tar; files of one sample are adjacent.

    A sample is a run of adjacent members with the same key (a key that comes
    back later starts another sample).  ``read`` limits which extensions' bytes
    are read; the others are listed with ``b""`` (their data is still passed over).
    """
    key: str | None = None
    group: dict[str, bytes] = {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            named = _tar_sample_member(member)
            if named is None:
                continue
            k, ext = named
            if k != key:
                if key is not None:
                    yield key, group
                key, group = k, {}
            if read is not None and ext not in read:
                group[ext] = b""
                continue
            f = tar.extractfile(member)
            group[ext] = f.read() if f is not None else b""
    if key is not None:
        yield key, group


_TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")  # in order of preference when a sample has several
_TAR_CAPTION_EXTS = ("txt", "json")


def sample_from_group(key: str, group: dict[str, bytes], max_pixels: int, caption_key: str = "caption") -> Sample:
    """Build a :class:`Sample` from one tar group (``jpg|png|webp`` + ``txt`` and/or ``json``)."""
    image_bytes = next((group[e] for e in _TAR_IMAGE_EXTS if e in group), None)
    if image_bytes is None:
        raise BadImageError(f"no image ({'/'.join(_TAR_IMAGE_EXTS)}) among {sorted(group)}", key=key)
    captions = captions_from_group(key, group, caption_key)
    try:
        image = load_image(image_bytes, max_pixels)
    except BadImageError as e:
        raise BadImageError(e.reason, key=key) from None
    return Sample(image=image, captions=captions, key=key)


def captions_from_group(key: str, group: dict[str, bytes], caption_key: str = "caption") -> list[str]:
    """The captions of one tar group: ``txt`` lines, then the ``json`` field ``caption_key``, repeats dropped."""
    captions: list[str] = []
    if "txt" in group:
        try:
            captions += parse_caption_lines(group["txt"].decode("utf-8-sig"))
        except UnicodeDecodeError:
            raise BadImageError("txt caption is not UTF-8", key=key) from None
    if "json" in group:
        try:
            meta = json.loads(group["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadImageError("json metadata is not valid JSON", key=key) from None
        value = meta.get(caption_key) if isinstance(meta, dict) else None
        values = value if isinstance(value, list) else [value]
        captions += [v.strip() for v in values if isinstance(v, str) and v.strip()]
    captions = list(dict.fromkeys(captions))  # txt and json often repeat the same caption
    if not captions:
        raise BadImageError(f"no caption (looked for a .txt, or a .json with a {caption_key!r} field)", key=key)
    return captions


def distributed_rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else ``torch.distributed`` if initialised, else ``RANK``/``WORLD_SIZE`` (torchrun), else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


class WebDatasetShards(IterableDataset):
    """Streams WebDataset tar shards (img2dataset's output): ``KEY.jpg|png|webp`` + ``KEY.txt``/``KEY.json``.

    Nothing but the current sample is held in memory, so data larger than memory
    (or than the disk, over ``http(s)://``) works.  Shards are divided among all
    consumers - ``world_size`` ranks times the DataLoader's workers - so that each
    sample is read by exactly one of them: consumer ``c`` of ``C`` reads shards
    ``c, c + C, ...``.  With fewer shards than consumers every consumer streams
    all shards and keeps samples ``c, c + C, ...`` instead (correct, but each
    shard is read ``C`` times: write more shards).

    ``rank``/``world_size`` default to ``torch.distributed`` when initialised
    (build the data set after ``init_process_group``), else torchrun's
    ``RANK``/``WORLD_SIZE``, else a single process.  ``shuffle_shards`` orders the
    shards by a permutation of ``(seed, epoch)`` (the same on every rank; call
    :meth:`set_epoch` each epoch); ``shuffle_buffer`` > 0 shuffles samples within
    a buffer of that many.  A corrupt shard is counted as skipped (key = the
    shard) from the point it breaks.
    """

    def __init__(
        self,
        urls_or_glob: PathLike | Sequence[PathLike],
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_shards: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        caption_key: str = "caption",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bad_fraction: float | None = DEFAULT_MAX_BAD_FRACTION,
        max_bad: int | None = None,
    ):
        super().__init__()
        self.shards = expand_shards(urls_or_glob)
        self.rank, self.world_size = distributed_rank_and_world(rank, world_size)
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0
        self.caption_key = caption_key
        self.max_pixels = max_pixels
        self.skipped = SkipCounter(max_bad_fraction, max_bad)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # A stream has no length and no dataset[i].  Both raise a StreamingOnlyError
    # (a TypeError too) that says what to use instead, rather than Python's bare
    # "object has no len()" from deep inside a training loop.
    def __len__(self) -> int:
        raise self._random_access_error()

    def __getitem__(self, index: int) -> Sample:
        raise self._random_access_error()

    def __bool__(self) -> bool:  # truth must not go through __len__
        return True

    def _random_access_error(self) -> StreamingOnlyError:
        urls = [s for s in self.shards if _is_url(s)]
        packed = [(s, c) for s in self.shards if not _is_url(s) and (c := shard_compression(s))]
        if urls:
            why, fix = f"its shards are URLs ({urls[0]}{', ...' if len(urls) > 1 else ''})", "download them first"
        elif packed:
            why = f"its shards are compressed ({packed[0][0]} is {packed[0][1]}{', ...' if len(packed) > 1 else ''})"
            fix = "decompress them to plain .tar, e.g. gunzip, xz -d, bunzip2 or zstd -d"
        else:
            why = "it was opened for streaming (WebDatasetShards, or open_dataset(..., streaming=True))"
            fix = "open them with open_dataset(path) or IndexedShards(path)"
        return StreamingOnlyError(
            "this step needs random access to the data (len(dataset), dataset[i]: dVAE and CLIP training draw "
            "each batch by index from (seed, step), which is what makes resuming exact), but this WebDataset source "
            f"can only be streamed: {why}. Use local uncompressed .tar shards ({fix}) or a folder of images with "
            "same-named .txt captions. Tokenizer training and the transformer's token cache can stream."
        )

    def iter_captions(self, limit: int | None = None) -> Iterator[str]:
        """Captions of the first ``limit`` samples (all shards in order: no split, no shuffle), images not decoded.

        For training the tokenizer, which one process does.  Samples without an
        image or a caption, and the rest of a corrupt shard, are passed over.
        """
        seen = 0
        for shard in self.shards:
            try:
                with _open_stream(shard) as stream:
                    for key, group in iter_tar_groups(stream, shard, read=_TAR_CAPTION_EXTS):
                        if limit is not None and seen >= limit:
                            return
                        seen += 1
                        if not any(e in group for e in _TAR_IMAGE_EXTS):
                            continue
                        try:
                            captions = captions_from_group(key, group, self.caption_key)
                        except BadImageError:
                            continue
                        yield from captions
            except (tarfile.TarError, OSError, EOFError) as e:
                log.warning("reading captions: skipping the rest of %s: %s: %s", shard, type(e).__name__, e)

    def _consumer(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _shard_order(self) -> list[str]:
        if not self.shuffle_shards:
            return list(self.shards)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return [self.shards[i] for i in torch.randperm(len(self.shards), generator=g).tolist()]

    def iter_items(self) -> Iterator[Sample | Skipped]:
        """This consumer's share: good samples and :class:`Skipped` markers, unshuffled."""
        consumer, consumers = self._consumer()
        shards = self._shard_order()
        by_shard = len(shards) >= consumers
        mine = shards[consumer::consumers] if by_shard else shards
        position = 0  # sample index over all shards, for splitting by sample
        for shard in mine:
            try:
                with _open_stream(shard) as stream:
                    for key, group in iter_tar_groups(stream, shard):
                        if not by_shard:
                            position += 1
                            if (position - 1) % consumers != consumer:
                                continue
                        try:
                            yield sample_from_group(key, group, self.max_pixels, self.caption_key)
                        except BadImageError as e:
                            yield Skipped(f"{shard}:{e.key or key}", e.reason)
            except (tarfile.TarError, OSError, EOFError) as e:
                yield Skipped(shard, f"corrupt or unreadable shard: {type(e).__name__}: {e}")

    def __iter__(self) -> Iterator[Sample]:
        items = self._shuffled(self.iter_items()) if self.shuffle_buffer > 0 else self.iter_items()
        for item in items:
            if isinstance(item, Skipped):
                self.skipped.skip(item.key, item.reason)
            else:
                self.skipped.ok()
                yield item
        self.skipped.check(final=True)
        if self.skipped.skipped:
            log.warning("WebDataset pass: %s", self.skipped.summary())

    def _shuffled(self, items: Iterable[Sample | Skipped]) -> Iterator[Sample | Skipped]:
        consumer, _ = self._consumer()
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 7919 + consumer)
        buffer: list[Sample | Skipped] = []
        for item in items:
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                j = int(torch.randint(len(buffer), (1,), generator=g))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
        while buffer:
            j = int(torch.randint(len(buffer), (1,), generator=g))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()


# Columns of IndexedShards' table: one row per sample, byte ranges in its shard
# (-1: member absent).
_SHARD, _IMAGE_EXT, _IMAGE_AT, _IMAGE_SIZE, _TXT_AT, _TXT_SIZE, _JSON_AT, _JSON_SIZE = range(8)
_MERGE_SLACK = 64 * 1024  # read a sample's members in one call unless it would pull this much extra


def _index_tar(shard: str, file_size: int) -> tuple[list[tuple[str, dict[str, tuple[int, int]]]], str | None]:
    """``(key, {extension: (data offset, size)})`` for each sample of an uncompressed tar, in tar order.

    Only the 512-byte member headers are read (tarfile seeks over the data).
    Samples are grouped exactly as :func:`iter_tar_groups` groups them.  The
    second value says why the shard was cut short (None when it was read whole);
    as when streaming, the sample being read where the shard breaks is lost.
    """
    groups: list[tuple[str, dict[str, tuple[int, int]]]] = []
    key: str | None = None
    group: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for member in tar:
                truncated = member.offset_data + member.size > file_size
                named = _tar_sample_member(member)
                if named is None:
                    if truncated:
                        raise tarfile.ReadError(f"unexpected end of data in {member.name}")
                    continue
                k, ext = named
                if k != key:
                    if key is not None:
                        groups.append((key, group))
                    key, group = k, {}
                if truncated:  # after the key test: the previous sample is whole, this one is lost
                    raise tarfile.ReadError(f"unexpected end of data in {member.name}")
                if member.issparse():  # its data is not one byte range; never written by img2dataset
                    raise tarfile.ReadError(f"{member.name} is a GNU sparse member, which cannot be read by offset")
                group[ext] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        return groups, f"corrupt or unreadable shard: {type(e).__name__}: {e}"
    if key is not None:
        groups.append((key, group))
    return groups, None


class IndexedShards(_MapDataset):
    """Random access to local, uncompressed WebDataset ``.tar`` shards: ``len(ds)``, ``ds[i]``.

    Opening reads every member header once (not the data; thousands of headers
    a second, see ``benchmarks/bench_data.py``) and keeps, per sample, where its
    image and caption members lie in its shard.  ``ds[i]`` then reads just those
    bytes and decodes them with the streaming reader's code, so both readers see
    the same samples (same grouping by key, same captions, same pixels) in the
    same order: shards as :func:`expand_shards` lists them, samples in tar order.
    The dVAE and CLIP loops need this: they draw the batch of step ``s`` by index
    from ``(seed, s)``.

    Bad items are handled as by the other map-style readers (``dataset[i]``
    substitutes the next good item, ``load(i)`` raises; ``skipped`` counts them,
    under the key ``"SHARD:KEY"`` the streaming reader uses).  A corrupt or
    truncated shard is counted once when opened, keeping the samples before
    the break.  Files are opened lazily and kept open (at most
    ``max_open_files``, least recently used closed first) per process, so
    DataLoader workers each read through their own handles; :meth:`close`
    closes them.  Use :class:`WebDatasetShards` for URLs, compressed shards, or
    data that should only be streamed.
    """

    def __init__(
        self,
        urls_or_glob: PathLike | Sequence[PathLike],
        *,
        caption_key: str = "caption",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bad_fraction: float | None = DEFAULT_MAX_BAD_FRACTION,
        max_bad: int | None = None,
        max_open_files: int = 16,
    ):
        super().__init__(max_pixels, max_bad_fraction, max_bad)
        if max_open_files < 1:
            raise ValueError(f"max_open_files must be >= 1, got {max_open_files}")
        self.shards = expand_shards(urls_or_glob)
        for shard in self.shards:
            if _is_url(shard):
                raise DataError(
                    f"{shard} is a URL, but random access needs local files: download the shards first, "
                    "or stream them with WebDatasetShards (open_dataset(..., streaming=True))"
                )
            packed = shard_compression(shard)
            if packed:
                raise DataError(
                    f"{shard} is {packed}-compressed, but random access needs plain .tar shards: decompress it "
                    "(gunzip, xz -d, bunzip2 or zstd -d), or stream it with WebDatasetShards"
                )
        self.caption_key = caption_key
        self.max_open_files = max_open_files
        self._sizes: list[int] = []
        self._keys: list[str] = []
        self._imageless: dict[int, list[str]] = {}  # index -> member extensions, for the "no image" message
        rows: list[tuple[int, ...]] = []
        for s, shard in enumerate(self.shards):
            size = os.path.getsize(shard)
            self._sizes.append(size)
            groups, broken = _index_tar(shard, size)
            if broken:
                self.skipped.skip(shard, broken, check=False)
            for key, group in groups:
                image = next((e for e in _TAR_IMAGE_EXTS if e in group), None)
                if image is None:
                    self._imageless[len(self._keys)] = sorted(group)
                image_at, image_size = group[image] if image else (-1, -1)
                txt_at, txt_size = group.get("txt", (-1, -1))
                json_at, json_size = group.get("json", (-1, -1))
                code = _TAR_IMAGE_EXTS.index(image) if image else -1
                rows.append((s, code, image_at, image_size, txt_at, txt_size, json_at, json_size))
                self._keys.append(key)
        if not self._keys:
            raise DataError(
                f"no sample in {len(self.shards)} shard(s) ({self.shards[0]}{', ...' if len(self.shards) > 1 else ''}): "
                "a WebDataset shard holds KEY.jpg|png|webp with KEY.txt and/or KEY.json"
            )
        self._rows = np.asarray(rows, dtype=np.int64).reshape(len(rows), 8)
        if self.skipped.skipped:
            self.skipped.ok(len(self._keys))
            self.skipped.check(final=True)
        self._handles: OrderedDict[int, IO[bytes]] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"IndexedShards({len(self)} samples in {len(self.shards)} shards)"

    def key(self, index: int) -> str:
        return self._keys[index]

    def shard_of(self, index: int) -> str:
        """The shard file holding item ``index``."""
        return self.shards[int(self._rows[index, _SHARD])]

    def load(self, index: int) -> Sample:
        index = self._check_index(index)
        key = self._keys[index]
        try:
            return sample_from_group(key, self._group(index), self.max_pixels, self.caption_key)
        except BadImageError as e:
            raise BadImageError(e.reason, key=f"{self.shard_of(index)}:{e.key or key}") from None

    def iter_captions(self, limit: int | None = None) -> Iterator[str]:
        """Captions of the first ``limit`` items, read without the images (for training the tokenizer).

        Items without an image or a usable caption are passed over.
        """
        n = len(self) if limit is None else min(limit, len(self))
        for i in range(n):
            if self._rows[i, _IMAGE_EXT] < 0:
                continue
            try:
                captions = captions_from_group(self._keys[i], self._group(i, image=False), self.caption_key)
            except BadImageError:
                continue
            yield from captions

    def _group(self, index: int, image: bool = True) -> dict[str, bytes]:
        """Item ``index``'s members as :func:`sample_from_group` takes them (only image, txt and json are read)."""
        row = self._rows[index].tolist()
        parts: list[tuple[str, int, int]] = []
        if image and row[_IMAGE_EXT] >= 0:
            parts.append((_TAR_IMAGE_EXTS[row[_IMAGE_EXT]], row[_IMAGE_AT], row[_IMAGE_SIZE]))
        for ext, at, size in (("txt", row[_TXT_AT], row[_TXT_SIZE]), ("json", row[_JSON_AT], row[_JSON_SIZE])):
            if at >= 0:
                parts.append((ext, at, size))
        group = dict.fromkeys(self._imageless.get(index, ()), b"")
        if not parts:
            return group
        shard = row[_SHARD]
        start = min(at for _, at, _ in parts)
        end = max(at + size for _, at, size in parts)
        wanted = sum(size for _, _, size in parts)
        if end - start <= wanted + _MERGE_SLACK:  # the usual case: adjacent members, one read
            blob = self._read(shard, start, end - start, index)
            for ext, at, size in parts:
                group[ext] = blob[at - start : at - start + size]
        else:
            for ext, at, size in parts:
                group[ext] = self._read(shard, at, size, index)
        return group

    def _read(self, shard: int, offset: int, size: int, index: int) -> bytes:
        f = self._handle(shard)
        if hasattr(os, "pread"):  # no shared file position: safe from threads too
            data = os.pread(f.fileno(), size, offset)
            while 0 < len(data) < size:
                more = os.pread(f.fileno(), size - len(data), offset + len(data))
                if not more:
                    break
                data += more
        else:  # pragma: no cover - Windows
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise BadImageError(
                f"{self.shards[shard]} ended before this item's data (was it changed after it was indexed?)",
                key=f"{self.shards[shard]}:{self._keys[index]}",
            )
        return data

    def _handle(self, shard: int) -> IO[bytes]:
        """This process's open file for ``shard``; a forked DataLoader worker opens its own."""
        if self._pid != os.getpid():
            # Handles inherited through fork share a file position (and are the
            # parent's to close); dropping them closes only this process's copies.
            self._handles = OrderedDict()
            self._pid = os.getpid()
        f = self._handles.pop(shard, None)
        if f is None:
            f = open(self.shards[shard], "rb", buffering=0)
            size = os.fstat(f.fileno()).st_size
            if size != self._sizes[shard]:
                f.close()
                raise DataError(
                    f"{self.shards[shard]} changed after it was indexed ({self._sizes[shard]} bytes then, {size} now): "
                    "open the data set again"
                )
            while len(self._handles) >= self.max_open_files:
                self._handles.popitem(last=False)[1].close()
        self._handles[shard] = f  # most recently used last
        return f

    def close(self) -> None:
        """Close the shard files this process opened (later reads reopen them)."""
        handles, self._handles = self._handles, OrderedDict()
        if self._pid == os.getpid():
            for f in handles.values():
                f.close()

    def __getstate__(self) -> dict[str, Any]:  # copies (spawned DataLoader workers) open their own files
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown; the OS closes the files
            pass


# --- Auto-detection ----------------------------------------------------------------------------


def _coco_image_dir(captions_json: Path) -> Path:
    """Guess the image folder of ``.../annotations/captions_train2017.json`` (-> ``.../train2017``)."""
    split = captions_json.stem[len("captions_") :] if captions_json.stem.startswith("captions_") else ""
    here, up = captions_json.parent, captions_json.parent.parent
    candidates = [up / split, here / split, up / "images" / split, here / "images" / split, up / "images", here / "images"]
    candidates = [c for c in candidates if c.name]  # drop the split-less ones when split is empty
    for c in candidates:
        if c.is_dir():
            return c
    raise DataError(
        f"cannot find the image folder for {captions_json}: tried {', '.join(str(c) for c in candidates)}; "
        "use CocoDataset(captions_json, image_dir) to name it"
    )


# Options only the streaming reader has: asking for one asks for a stream.
_STREAM_OPTIONS = ("rank", "world_size", "shuffle_shards", "shuffle_buffer", "seed")


def _open_shards(spec: PathLike | Sequence[PathLike], streaming: bool | None, kwargs: dict[str, Any]) -> Dataset:
    shards = expand_shards(spec)
    if streaming is None:
        streaming = any(k in kwargs for k in _STREAM_OPTIONS) or any(
            _is_url(s) or shard_compression(s) for s in shards
        )
    return WebDatasetShards(shards, **kwargs) if streaming else IndexedShards(shards, **kwargs)


def open_dataset(path: PathLike | Sequence[PathLike], *, streaming: bool | None = None, **kwargs: Any) -> Dataset:
    """Open ``path`` with the reader its contents call for; ``kwargs`` go to the reader.

    * a ``.json`` file, or a folder with ``annotations/captions_*.json`` or
      ``captions_*.json`` (exactly one) -> :class:`CocoDataset` (images in the
      folder named after the split, e.g. ``train2017/``, or ``images/``);
    * WebDataset shards - a ``.tar`` (or ``.tar.gz``, ``.tgz``) file, a list of
      them, a glob or brace pattern (``shard-{000..009}.tar``), a ``http(s)://``
      URL, or a folder holding ``*.tar`` -> :class:`IndexedShards` (random
      access) when every shard is a local uncompressed tar, else
      :class:`WebDatasetShards` (a stream);
    * a folder with image files and same-named ``.txt`` -> :class:`FolderDataset`.

    ``streaming`` picks the shard reader: True streams even local tars, False
    requires random access (a clear :class:`DataError` for URLs or compressed
    shards), None (default) decides as above; passing a streaming-only option
    (``rank``, ``world_size``, ``shuffle_shards``, ``shuffle_buffer``, ``seed``)
    also streams.  Folders and COCO are always map-style.
    """
    if not isinstance(path, (str, os.PathLike)):
        return _open_shards(path, streaming, kwargs)
    text = os.fspath(path)
    p = Path(text)
    if _is_url(text) or "{" in text or any(c in text for c in "*?[") or text.endswith((".tar", ".tar.gz", ".tgz")):
        return _open_shards(text, streaming, kwargs)
    if p.is_file() and p.suffix == ".json":
        return CocoDataset(p, _coco_image_dir(p), **kwargs)
    if not p.exists():
        raise DataError(f"data set path {p} does not exist")
    if p.is_dir():
        coco = sorted(p.glob("annotations/captions_*.json")) + sorted(p.glob("captions_*.json"))
        if len(coco) == 1:
            return CocoDataset(coco[0], _coco_image_dir(coco[0]), **kwargs)
        if len(coco) > 1:
            raise DataError(
                f"{p} holds several COCO caption files ({', '.join(c.name for c in coco)}); "
                "pass the one to use (e.g. annotations/captions_train2017.json)"
            )
        if any(p.glob("*.tar")):
            return _open_shards(p, streaming, kwargs)
        if _has_captioned_image(p):
            return FolderDataset(p, **kwargs)
    raise DataError(
        f"no data set found at {p}: looked for (1) image files ({', '.join(IMAGE_EXTENSIONS)}) with a same-named "
        ".txt of captions, (2) MS-COCO annotations/captions_*.json or captions_*.json, (3) WebDataset .tar shards"
    )


def _has_captioned_image(root: Path) -> bool:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = set(filenames)
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.splitext(name)[0] + ".txt" in names:
                return True
    return False


def iter_samples(dataset: Dataset | Iterable[Sample]) -> Iterator[Sample]:
    """Every usable sample of ``dataset`` once, in order (map-style: bad ones skipped, not substituted)."""
    if isinstance(dataset, _MapDataset):
        for i in range(len(dataset)):
            try:
                sample = dataset.load(i)
            except BadImageError as e:
                dataset.skipped.skip(e.key or dataset.key(i), e.reason)
                continue
            dataset.skipped.ok()
            yield sample
        dataset.skipped.check(final=True)
    elif isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        yield from dataset  # type: ignore[misc]
    else:
        for i in range(len(dataset)):  # type: ignore[arg-type]
            yield dataset[i]


__all__ = [
    "BadImageError",
    "CocoDataset",
    "DataError",
    "DEFAULT_MAX_PIXELS",
    "FolderDataset",
    "IMAGE_EXTENSIONS",
    "IndexedShards",
    "Sample",
    "SkipCounter",
    "Skipped",
    "StreamingOnlyError",
    "TooManyBadImagesError",
    "WebDatasetShards",
    "captions_from_group",
    "distributed_rank_and_world",
    "expand_braces",
    "expand_shards",
    "iter_samples",
    "load_image",
    "open_dataset",
    "parse_caption_lines",
    "read_captions_file",
    "sample_from_group",
    "shard_compression",
]
