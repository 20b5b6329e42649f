"""Users' captioned-image data sets: :func:`open_dataset` picks the reader a path needs.

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

The readers live in one module each (:mod:`dalle.data.folder`,
:mod:`dalle.data.coco`, :mod:`dalle.data.webdataset`); what they share (the
:class:`Sample`, :func:`load_image`, the bad-image accounting) is in
:mod:`dalle.data.images`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from torch.utils.data import Dataset, IterableDataset

from dalle.data.coco import CocoDataset, coco_image_dir
from dalle.data.folder import FolderDataset, has_captioned_image, has_image
from dalle.data.images import IMAGE_EXTENSIONS, BadImageError, DataError, MapDataset, PathLike, Sample
from dalle.data.webdataset import IndexedShards, WebDatasetShards, expand_shards, is_url, shard_compression


# Options only the streaming reader has: asking for one asks for a stream.
_STREAM_OPTIONS = ("rank", "world_size", "shuffle_shards", "shuffle_buffer", "seed")


def _open_shards(spec: PathLike | Sequence[PathLike], streaming: bool | None, kwargs: dict[str, Any]) -> Dataset:
    shards = expand_shards(spec)
    if streaming is None:
        streaming = any(k in kwargs for k in _STREAM_OPTIONS) or any(
            is_url(s) or shard_compression(s) for s in shards
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
    if is_url(text) or "{" in text or any(c in text for c in "*?[") or text.endswith((".tar", ".tar.gz", ".tgz")):
        return _open_shards(text, streaming, kwargs)
    if p.is_file() and p.suffix == ".json":
        return CocoDataset(p, coco_image_dir(p), **kwargs)
    if not p.exists():
        raise DataError(f"data set path {p} does not exist")
    if p.is_dir():
        coco = sorted(p.glob("annotations/captions_*.json")) + sorted(p.glob("captions_*.json"))
        if len(coco) == 1:
            return CocoDataset(coco[0], coco_image_dir(coco[0]), **kwargs)
        if len(coco) > 1:
            raise DataError(
                f"{p} holds several COCO caption files ({', '.join(c.name for c in coco)}); "
                "pass the one to use (e.g. annotations/captions_train2017.json)"
            )
        if any(p.glob("*.tar")):
            return _open_shards(p, streaming, kwargs)
        if has_captioned_image(p) or has_image(p):  # images without captions: the folder reader says so
            return FolderDataset(p, **kwargs)
    raise DataError(
        f"no data set found at {p}: looked for (1) image files ({', '.join(IMAGE_EXTENSIONS)}) with a same-named "
        ".txt of captions, (2) MS-COCO annotations/captions_*.json or captions_*.json, (3) WebDataset .tar shards"
    )



def iter_samples(dataset: Dataset | Iterable[Sample]) -> Iterator[Sample]:
    """Every usable sample of ``dataset`` once, in order (map-style: bad ones skipped, not substituted)."""
    if isinstance(dataset, MapDataset):
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


__all__ = ["iter_samples", "open_dataset"]
