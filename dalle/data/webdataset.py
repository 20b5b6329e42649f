"""WebDataset ``.tar`` shards (img2dataset's output): streamed, or indexed for random access.

* :class:`WebDatasetShards` streams the shards, also from ``http(s)://`` URLs
  and compressed tars, for data that cannot be indexed (read with the standard
  library's ``tarfile``; the ``webdataset`` package is not needed).
* :class:`IndexedShards` gives random access to local uncompressed shards: each
  shard's member headers are read once; ``dataset[i]`` then reads just that
  sample's bytes.

Both group members into samples and decode them with the same code, so they
see the same samples.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
import urllib.request
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any, Container, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dalle.data.images import (
    DEFAULT_MAX_BAD_FRACTION,
    DEFAULT_MAX_PIXELS,
    BadImageError,
    DataError,
    MapDataset,
    PathLike,
    Sample,
    SkipCounter,
    Skipped,
    load_image,
    parse_caption_lines,
)

log = logging.getLogger("dalle.data")


class StreamingOnlyError(DataError, TypeError):
    """``len()`` or ``dataset[i]`` of a reader that can only stream (URLs, compressed shards).

    Also a :class:`TypeError`, the error ``len()`` of an unsized object raises, so
    code that probes for a length (``list()``, ``tqdm``, ``len(loader)``) still
    treats the reader as a plain iterable.
    """


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


def is_url(s: str) -> bool:
    return re.match(r"^(https?|file)://", s) is not None


def expand_shards(urls_or_glob: PathLike | Sequence[PathLike]) -> list[str]:
    """The list of shards named by paths, URLs, globs, brace patterns or folders (of ``*.tar``)."""
    specs = [urls_or_glob] if isinstance(urls_or_glob, (str, os.PathLike)) else list(urls_or_glob)
    shards: list[str] = []
    for spec in specs:
        for item in expand_braces(os.fspath(spec)):
            if is_url(item):
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
    if is_url(shard):
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
        urls = [s for s in self.shards if is_url(s)]
        packed = [(s, c) for s in self.shards if not is_url(s) and (c := shard_compression(s))]
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
                    keys: set[str] = set()
                    for key, group in iter_tar_groups(stream, shard):
                        keys.add(key)
                        if not by_shard:
                            position += 1
                            if (position - 1) % consumers != consumer:
                                continue
                        try:
                            yield sample_from_group(key, group, self.max_pixels, self.caption_key)
                        except BadImageError as e:
                            yield Skipped(f"{shard}:{e.key or key}", e.reason)
                    if (hidden := _hidden_after_stream(shard, stream, keys)) and (by_shard or consumer == 0):
                        error = "corrupt shard: an unreadable tar header hides the samples after it"
                        yield Skipped(shard, _broken_shard_reason(shard, error, len(keys), hidden), hidden)
            except (tarfile.TarError, OSError, EOFError) as e:
                read, lost = samples_lost_in_shard(shard)
                error = f"corrupt or unreadable shard: {type(e).__name__}: {e}"
                yield Skipped(shard, _broken_shard_reason(shard, error, read, lost), lost)

    def __iter__(self) -> Iterator[Sample]:
        items = self._shuffled(self.iter_items()) if self.shuffle_buffer > 0 else self.iter_items()
        for item in items:
            if isinstance(item, Skipped):
                self.skipped.skip(item.key, item.reason, count=item.count)
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
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError) as e:
        return groups, f"corrupt or unreadable shard: {type(e).__name__}: {e}"
    if key is not None:
        groups.append((key, group))
    # tarfile ends an archive quietly at a damaged header: samples past it would be lost unsaid.
    if end + 1024 < file_size and _sample_keys_after(shard, end, file_size) - {k for k, _ in groups}:
        return groups, f"corrupt shard: an unreadable tar header at byte {end} hides the samples after it"
    return groups, None


def _sample_keys_after(shard: str, start: int, file_size: int) -> set[str]:
    """Keys of the samples whose member headers lie at or after byte ``start`` of a local tar.

    Used past the point where a shard breaks: every 512-byte block is tried as a tar
    header (the checksum tells real ones from data), and a header's data is stepped over.
    """
    keys: set[str] = set()
    offset = start - start % 512
    with open(shard, "rb") as f:
        while offset + 512 <= file_size:
            f.seek(offset)
            try:
                member = tarfile.TarInfo.frombuf(f.read(512), "utf-8", "surrogateescape")
            except tarfile.HeaderError:
                offset += 512
                continue
            if (named := _tar_sample_member(member)) is not None:
                keys.add(named[0])
            offset += 512 + (member.size + 511) // 512 * 512
    return keys


def _hidden_after_stream(shard: str, stream: IO[bytes], read: set[str]) -> int:
    """Samples of a local plain tar that a stream ended before (tarfile stops quietly at a damaged header)."""
    if is_url(shard) or shard_compression(shard):
        return 0
    try:
        position, size = stream.tell(), os.path.getsize(shard)
    except (OSError, ValueError):
        return 0
    if position + 1024 >= size:
        return 0
    return len(_sample_keys_after(shard, max(0, position - 20 * 512), size) - read)


def samples_lost_in_shard(shard: str) -> tuple[int, int]:
    """``(samples read whole, samples lost)`` of a broken shard; lost counts at least the one cut.

    A local uncompressed shard is indexed up to the break and scanned past it for the
    headers of the samples that could not be read; elsewhere only the cut sample is known.
    """
    if is_url(shard) or shard_compression(shard) or not os.path.isfile(shard):
        return 0, 1
    size = os.path.getsize(shard)
    groups, _ = _index_tar(shard, size)
    read = {key for key, _ in groups}
    end = max((at + n for _, group in groups for at, n in group.values()), default=0)
    return len(groups), max(1, len(_sample_keys_after(shard, end, size) - read))


def _broken_shard_reason(shard: str, error: str, read: int, lost: int, estimated: bool = False) -> str:
    about = "about " if estimated else ""
    return (f"{error}; {read} sample(s) read before the break, {about}{lost} lost (counted as bad items): "
            f"fix or re-download {os.path.basename(shard)}")


class IndexedShards(MapDataset):
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
            if is_url(shard):
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
        broken_shards: list[tuple[str, str, int]] = []
        whole_counts: list[int] = []
        for s, shard in enumerate(self.shards):
            size = os.path.getsize(shard)
            self._sizes.append(size)
            groups, broken = _index_tar(shard, size)
            if broken:
                broken_shards.append((shard, broken, len(groups)))
            else:
                whole_counts.append(len(groups))
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
        typical = sorted(whole_counts)[len(whole_counts) // 2] if whole_counts else 0  # shards are usually equal
        for shard, error, read in broken_shards:
            _, found = samples_lost_in_shard(shard)
            lost = max(found, typical - read)
            self.skipped.skip(shard, _broken_shard_reason(shard, error, read, lost, estimated=lost > found),
                              check=False, count=lost)
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



__all__ = [
    "IndexedShards",
    "StreamingOnlyError",
    "WebDatasetShards",
    "captions_from_group",
    "distributed_rank_and_world",
    "expand_braces",
    "expand_shards",
    "is_url",
    "iter_tar_groups",
    "sample_from_group",
    "shard_compression",
]
