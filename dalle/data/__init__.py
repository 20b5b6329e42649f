"""Data: the procedural shapes set, users' image-text data sets, preprocessing, the token cache.

Names are imported on first use, so ``import dalle.data`` stays cheap (and
``dalle.data.shapes`` does not pull in torch).

* :mod:`dalle.data.shapes` - the shapes set (``ShapesDataset``, ``write_shapes``).
* :mod:`dalle.data.shapes_twins` - hard-negative twins of shapes items, offered to the CLIP loop
  through ``ShapesDataset.hard_negatives``.
* :mod:`dalle.data.datasets` - :func:`open_dataset` (picks the reader a path needs), :func:`iter_samples`.
* :mod:`dalle.data.images` - :class:`Sample`, :func:`load_image`, the bad-image accounting.
* :mod:`dalle.data.folder`, :mod:`dalle.data.coco`, :mod:`dalle.data.webdataset` - one reader per
  format: folders of images with ``.txt`` captions, MS-COCO, WebDataset shards (indexed or streamed).
* :mod:`dalle.data.preprocess` - the paper's crop/resize, batching, :func:`make_loader`.
* :mod:`dalle.data.token_cache` - images encoded once into dVAE tokens on disk.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # readers (datasets: open_dataset; images: what every reader shares; folder, coco, webdataset)
    "BadImageError": "images",
    "CocoDataset": "coco",
    "DataError": "images",
    "DEFAULT_MAX_PIXELS": "images",
    "FolderDataset": "folder",
    "IMAGE_EXTENSIONS": "images",
    "IndexedShards": "webdataset",
    "Sample": "images",
    "SkipCounter": "images",
    "Skipped": "images",
    "StreamingOnlyError": "webdataset",
    "TooManyBadImagesError": "images",
    "WebDatasetShards": "webdataset",
    "expand_shards": "webdataset",
    "iter_samples": "datasets",
    "load_image": "images",
    "open_dataset": "datasets",
    "read_captions_file": "images",
    # preprocess
    "PAPER_CROP_SCALE": "preprocess",
    "SHAPES_CROP_SCALE": "preprocess",
    "StepBatchSampler": "preprocess",
    "collate_batch": "preprocess",
    "derive_seed": "preprocess",
    "eval_transform": "preprocess",
    "make_generator": "preprocess",
    "make_loader": "preprocess",
    "to_tensor": "preprocess",
    "train_transform": "preprocess",
    # token cache
    "StaleCacheError": "token_cache",
    "TokenCache": "token_cache",
    "TokenCacheError": "token_cache",
    "build_token_cache": "token_cache",
    "fingerprint_state_dict": "token_cache",
    # the shapes set (dalle/data/shapes.py)
    "ShapesDataset": "shapes",
    "write_shapes": "shapes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dalle.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dalle.data.{module}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
