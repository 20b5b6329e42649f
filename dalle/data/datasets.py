"""Readers for users' captioned-image data, and safe image loading.

Three layouts are read, each into :class:`Sample` items (an RGB PIL image, all
of its captions, a key naming it):

* :class:`FolderDataset` - image files with a same-named ``.txt`` beside each,
  one caption a line (the layout ``dalle data shapes`` writes);
* :class:`CocoDataset` - MS-COCO ``captions_*.json`` plus a folder of images;
* :class:`WebDatasetShards` - WebDataset ``.tar`` shards as img2dataset writes
  them, streamed (read with the standard library's ``tarfile``; the
  ``webdataset`` package is not needed).

:func:`open_dataset` picks the reader from what a path holds.

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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence, Union

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


def iter_tar_groups(stream: IO[bytes], shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream ``(key, {extension: bytes})`` groups from a tar; files of one sample are adjacent."""
    key: str | None = None
    group: dict[str, bytes] = {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = _split_member(member.name)
            if os.path.basename(k).startswith(".") or not ext:
                continue
            if k != key:
                if key is not None:
                    yield key, group
                key, group = k, {}
            f = tar.extractfile(member)
            group[ext] = f.read() if f is not None else b""
    if key is not None:
        yield key, group


_TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


def sample_from_group(key: str, group: dict[str, bytes], max_pixels: int, caption_key: str = "caption") -> Sample:
    """Build a :class:`Sample` from one tar group (``jpg|png|webp`` + ``txt`` and/or ``json``)."""
    image_bytes = next((group[e] for e in _TAR_IMAGE_EXTS if e in group), None)
    if image_bytes is None:
        raise BadImageError(f"no image ({'/'.join(_TAR_IMAGE_EXTS)}) among {sorted(group)}", key=key)
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
    try:
        image = load_image(image_bytes, max_pixels)
    except BadImageError as e:
        raise BadImageError(e.reason, key=key) from None
    return Sample(image=image, captions=captions, key=key)


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


def open_dataset(path: PathLike | Sequence[PathLike], **kwargs: Any) -> Dataset:
    """Open ``path`` with the reader its contents call for; ``kwargs`` go to the reader.

    * a ``.json`` file, or a folder with ``annotations/captions_*.json`` or
      ``captions_*.json`` (exactly one) -> :class:`CocoDataset` (images in the
      folder named after the split, e.g. ``train2017/``, or ``images/``);
    * a ``.tar`` file, a list of them, a glob or brace pattern (``shard-{000..009}.tar``),
      a ``http(s)://`` URL, or a folder holding ``*.tar`` -> :class:`WebDatasetShards`;
    * a folder with image files and same-named ``.txt`` -> :class:`FolderDataset`.
    """
    if not isinstance(path, (str, os.PathLike)):
        return WebDatasetShards(path, **kwargs)
    text = os.fspath(path)
    p = Path(text)
    if _is_url(text) or "{" in text or any(c in text for c in "*?[") or text.endswith(".tar"):
        return WebDatasetShards(text, **kwargs)
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
            return WebDatasetShards(p, **kwargs)
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
    elif hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        for i in range(len(dataset)):  # type: ignore[arg-type]
            yield dataset[i]
    else:
        yield from dataset  # type: ignore[misc]


__all__ = [
    "BadImageError",
    "CocoDataset",
    "DataError",
    "DEFAULT_MAX_PIXELS",
    "FolderDataset",
    "IMAGE_EXTENSIONS",
    "Sample",
    "SkipCounter",
    "Skipped",
    "TooManyBadImagesError",
    "WebDatasetShards",
    "distributed_rank_and_world",
    "expand_braces",
    "expand_shards",
    "iter_samples",
    "load_image",
    "open_dataset",
    "parse_caption_lines",
    "read_captions_file",
]
