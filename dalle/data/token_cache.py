"""The data set encoded once into dVAE image tokens, stored on disk.

The transformer is trained on (text, image-token) pairs and the dVAE is frozen
by then (the paper's stage two), so encoding every image once is equivalent to
encoding it every step and far cheaper.  The cached images get the
deterministic evaluation transform (centre crop + resize): a cache holds one
encoding per image, so there is no per-step augmentation at this stage.

Layout of a cache folder::

    tokens.npy      (N, g, g) uint16 (int32 for codebooks over 65,536 codes), memory-mapped on read
    captions.jsonl  line i: the JSON list of item i's captions
    meta.json       count, grid, codebook_size, dtype, image_size, source,
                    fingerprint (of the dVAE weights: a stale cache is refused), skipped items

Building is atomic and resumable: the cache is written into ``DIR.partial/``,
which after every batch records how far it got (``progress.json``), and only
renamed to ``DIR`` when complete.  An interrupted build started again with the
same arguments continues where it stopped.  Bad images are left out and counted
in ``meta.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from dalle.data.images import (
    DEFAULT_MAX_BAD_FRACTION,
    BadImageError,
    DataError,
    MapDataset,
    Sample,
    SkipCounter,
    Skipped,
)
from dalle.data.preprocess import eval_transform

log = logging.getLogger("dalle.data")

FORMAT = "dalle-token-cache"
VERSION = 1
_HEADER_BYTES = 128  # fixed npy header size, so the row count can be rewritten in place
_MAX_LISTED_SKIPS = 1000  # skipped items named in meta.json (the count is always exact)

EncodeFn = Callable[[torch.Tensor], torch.Tensor]


class TokenCacheError(RuntimeError):
    """A missing, incomplete or corrupt token cache; the message says what to do."""


class StaleCacheError(TokenCacheError):
    """A cache built with other dVAE weights (or another image size / source) than asked for."""


def fingerprint_state_dict(state: Mapping[str, torch.Tensor] | torch.nn.Module) -> str:
    """A short hash of a module's weights (names, shapes, dtypes, bytes): the cache's staleness key."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _token_dtype(codebook_size: int | None) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size is not None and codebook_size <= 65536 else np.dtype(np.int32)


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """An npy v1.0 header padded to exactly ``_HEADER_BYTES`` (room for any row count)."""
    body = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    pad = _HEADER_BYTES - 10 - len(body) - 1
    if pad < 0:
        raise ValueError(f"npy header for shape {shape} does not fit {_HEADER_BYTES} bytes")
    text = (body + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- Reading ------------------------------------------------------------------------------------


class TokenCache(Dataset):
    """A built cache: ``cache[i] -> (LongTensor [g, g], captions)``; tokens are memory-mapped.

    ``fingerprint`` (optional) is checked against the one the cache was built
    with; a mismatch raises :class:`StaleCacheError` (the dVAE changed: rebuild).
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: str | None = None):
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            partial = self.directory.with_name(self.directory.name + ".partial")
            hint = f" (an unfinished build is in {partial}: run build_token_cache again to finish it)" if partial.is_dir() else ""
            raise TokenCacheError(f"no token cache at {self.directory}: meta.json is missing{hint}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenCacheError(f"{meta_path} is corrupt ({e}); delete {self.directory} and rebuild") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise TokenCacheError(f"{self.directory} is not a token cache (meta.json format is not {FORMAT!r})")
        if meta.get("version") != VERSION:
            raise TokenCacheError(f"{self.directory}: cache version {meta.get('version')} != {VERSION}; rebuild it")
        self.meta: dict[str, Any] = meta
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise StaleCacheError(
                f"token cache {self.directory} was built with dVAE fingerprint {self.fingerprint!r}, "
                f"not {fingerprint!r}: the dVAE changed, so rebuild the cache (delete the folder or pass overwrite=True)"
            )
        count, grid = int(meta["count"]), int(meta["grid"])
        tokens = self._open_tokens()
        if tokens.shape != (count, grid, grid) or tokens.dtype != np.dtype(meta["dtype"]):
            raise TokenCacheError(
                f"{self.directory}/tokens.npy holds {tokens.shape} {tokens.dtype}, meta.json says "
                f"({count}, {grid}, {grid}) {meta['dtype']}: the cache is corrupt; delete it and rebuild"
            )
        self._offsets = self._index_captions(count)

    def _open_tokens(self) -> np.ndarray:
        path = self.directory / "tokens.npy"
        try:
            return np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise TokenCacheError(f"{path} is missing; delete {self.directory} and rebuild") from None
        except (ValueError, OSError) as e:
            raise TokenCacheError(f"{path} is corrupt ({e}); delete {self.directory} and rebuild") from None

    def _index_captions(self, count: int) -> np.ndarray:
        """Byte offset of each line, so captions are read on demand instead of held in memory."""
        path = self.directory / "captions.jsonl"
        if not path.is_file():
            raise TokenCacheError(f"{path} is missing; delete {self.directory} and rebuild")
        offsets = [0]
        with open(path, "rb") as f:
            for line in f:
                offsets.append(offsets[-1] + len(line))
        if len(offsets) - 1 != count:
            raise TokenCacheError(
                f"{path} has {len(offsets) - 1} lines for {count} token grids: the cache is corrupt; delete it and rebuild"
            )
        return np.asarray(offsets, dtype=np.int64)

    def verify(self) -> None:
        """Check the files against the SHA-256 recorded when the cache was built (TokenCacheError if they differ).

        Caches built before the checksums were recorded pass (their shape was checked on opening).
        """
        for name, expected in (self.meta.get("sha256") or {}).items():
            if _sha256(self.directory / name) != expected:
                raise TokenCacheError(f"{self.directory / name} fails its checksum (damaged after it was built); "
                                      f"delete {self.directory} and rebuild")

    # Memory maps are not pickled (DataLoader workers under spawn): reopened on arrival.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_tokens", None)
        return state

    @property
    def tokens(self) -> np.ndarray:
        """The ``(N, g, g)`` token array (memory-mapped, read-only)."""
        if "_tokens" not in self.__dict__:
            self._tokens = self._open_tokens()
        return self._tokens

    @property
    def fingerprint(self) -> str:
        return str(self.meta.get("fingerprint", ""))

    @property
    def grid(self) -> int:
        return int(self.meta["grid"])

    @property
    def codebook_size(self) -> int | None:
        return self.meta.get("codebook_size")

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    def __len__(self) -> int:
        return int(self.meta["count"])

    def captions(self, index: int) -> list[str]:
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        with open(self.directory / "captions.jsonl", "rb") as f:
            f.seek(start)
            line = f.read(end - start)
        try:
            captions = json.loads(line)
        except json.JSONDecodeError as e:
            raise TokenCacheError(f"{self.directory}/captions.jsonl line {index + 1} is corrupt ({e}); rebuild") from None
        return captions

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[str]]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a token cache of {n} items")
        index %= n
        return torch.from_numpy(self.tokens[index].astype(np.int64)), self.captions(index)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, list[list[str]]]:
        """Tokens ``[B, g, g]`` (one fancy-indexed read) and the caption lists of ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self.tokens[idx].astype(np.int64)), [self.captions(int(i)) for i in idx]


# --- Building -----------------------------------------------------------------------------------


class _Items(Dataset):
    """Map-style source seen exactly once per index: ``Sample`` or a ``Skipped`` marker, never a substitute."""

    def __init__(self, dataset: Dataset, start: int):
        self.dataset, self.start = dataset, start

    def __len__(self) -> int:
        return len(self.dataset) - self.start  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Sample | Skipped:
        index = self.start + i
        if isinstance(self.dataset, MapDataset):
            try:
                return self.dataset.load(index)
            except BadImageError as e:
                return Skipped(e.key or self.dataset.key(index), e.reason)
        return self.dataset[index]


class _StreamItems(IterableDataset):
    """Iterable source with markers (``iter_items``) when the reader offers them."""

    def __init__(self, dataset: Iterable[Sample]):
        self.dataset = dataset

    def __iter__(self) -> Iterator[Sample | Skipped]:
        items = getattr(self.dataset, "iter_items", None)
        return items() if callable(items) else iter(self.dataset)


class _CacheCollate:
    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, items: Sequence[Sample | Skipped]) -> tuple[torch.Tensor | None, list[list[str]], list[Skipped]]:
        images, captions, skipped = [], [], []
        for item in items:
            if isinstance(item, Skipped):
                skipped.append(item)
                continue
            if not item.captions:
                skipped.append(Skipped(item.key, "no caption"))
                continue
            images.append(eval_transform(item.image, self.image_size))
            captions.append(list(item.captions))
        return (torch.stack(images) if images else None), captions, skipped


def _check_tokens(tokens: Any, n: int, grid: int | None, codebook_size: int | None) -> np.ndarray:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"encode_fn must return a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise TypeError(f"encode_fn must return integer token ids, got dtype {tokens.dtype}")
    if tokens.dim() != 3 or tokens.shape[0] != n or tokens.shape[1] != tokens.shape[2]:
        raise ValueError(f"encode_fn must return [B={n}, g, g] token grids, got shape {tuple(tokens.shape)}")
    if grid is not None and tokens.shape[1] != grid:
        raise ValueError(f"encode_fn returned a {tokens.shape[1]}x{tokens.shape[1]} grid after {grid}x{grid} ones")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or (codebook_size is not None and hi >= codebook_size):
        raise ValueError(f"encode_fn returned token ids in [{lo}, {hi}], outside the codebook [0, {codebook_size})")
    if codebook_size is None and hi > np.iinfo(np.int32).max:
        raise ValueError(f"token id {hi} does not fit int32")
    return tokens.detach().cpu().numpy()


def build_token_cache(
    dataset: Dataset | Iterable[Sample],
    encode_fn: EncodeFn,
    out_dir: str | os.PathLike,
    image_size: int,
    batch_size: int = 64,
    progress: bool = True,
    *,
    fingerprint: str = "",
    codebook_size: int | None = None,
    source: str | None = None,
    num_workers: int = 0,
    overwrite: bool = False,
    max_bad_fraction: float | None = None,
    max_bad: int | None = None,
) -> TokenCache:
    """Encode every usable image of ``dataset`` once with ``encode_fn`` into a cache at ``out_dir``.

    ``encode_fn(images [B, 3, S, S] float in [0, 1]) -> LongTensor [B, g, g]`` is
    the trained dVAE's ``encode``; it runs under ``torch.no_grad``.
    ``fingerprint`` identifies the dVAE weights (see :func:`fingerprint_state_dict`);
    ``codebook_size`` picks uint16 storage (int32 when above 65,536 or unknown)
    and is checked against every id.  ``source`` (e.g. the data path) is recorded.

    An existing complete cache built with the same fingerprint, image size and
    source is returned as is; a different one raises :class:`StaleCacheError`
    unless ``overwrite``.  Bad images are skipped and counted; past the threshold
    (``max_bad_fraction``/``max_bad``, by default the data set's own) the build
    stops with :class:`~dalle.data.TooManyBadImagesError`, leaving its progress
    so that a rerun after fixing the files continues.
    """
    out_dir = Path(out_dir)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wanted = {"fingerprint": fingerprint, "image_size": image_size, "source": source, "codebook_size": codebook_size}

    if (out_dir / "meta.json").is_file():
        existing = TokenCache(out_dir)
        differs = {k: (existing.meta.get(k), v) for k, v in wanted.items() if existing.meta.get(k) != v}
        if not differs:
            log.info("reusing the token cache at %s", out_dir)
            return existing
        if not overwrite:
            what = ", ".join(f"{k} {old!r} (wanted {new!r})" for k, (old, new) in differs.items())
            raise StaleCacheError(
                f"a token cache at {out_dir} was built with {what}: delete it or pass overwrite=True to rebuild"
            )
    elif out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise TokenCacheError(f"{out_dir} exists and is not a token cache; choose an empty or new folder")

    partial = out_dir.with_name(out_dir.name + ".partial")
    dtype = _token_dtype(codebook_size)
    policy = getattr(dataset, "skipped", None)
    counter = SkipCounter(**policy.policy()) if isinstance(policy, SkipCounter) else SkipCounter(DEFAULT_MAX_BAD_FRACTION)
    if max_bad_fraction is not None:
        counter.max_bad_fraction = max_bad_fraction
    if max_bad is not None:
        counter.max_bad = max_bad

    # Resume an interrupted build made with the same arguments, else start afresh.
    run_id = {**wanted, "batch_size": batch_size, "num_workers": num_workers, "dtype": dtype.str}
    state = _load_progress(partial, run_id)
    if state is None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        state = {"run": run_id, "batches": 0, "count": 0, "grid": None, "captions_bytes": 0, "seen": 0, "reasons": {}}
        with open(partial / "tokens.npy", "wb") as f:
            f.write(_npy_header(dtype, (0, 0, 0)))
        (partial / "captions.jsonl").write_bytes(b"")
    else:
        log.info("resuming the token cache build in %s after %d items", partial, state["count"])
    counter.seen, counter.reasons = state["seen"], dict(state["reasons"])
    counter.skipped = state.get("skipped", len(counter.reasons))
    grid: int | None = state["grid"]
    row_bytes = (grid or 0) ** 2 * dtype.itemsize
    tokens_file = open(partial / "tokens.npy", "r+b")
    captions_file = open(partial / "captions.jsonl", "r+b")
    # Drop anything written after the last recorded batch (a crash mid-batch).
    tokens_file.truncate(_HEADER_BYTES + state["count"] * row_bytes)
    captions_file.truncate(state["captions_bytes"])
    tokens_file.seek(0, os.SEEK_END)
    captions_file.seek(0, os.SEEK_END)

    map_style = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__") and not isinstance(dataset, IterableDataset)
    collate = _CacheCollate(image_size)
    if map_style:
        # Batches are fixed (batch_size consecutive indices), so skip the done ones by index.
        start = state["batches"] * batch_size
        loader: Iterable = DataLoader(_Items(dataset, start), batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
        total = -(-len(dataset) // batch_size)  # type: ignore[arg-type]
        to_skip = 0
    else:
        loader = DataLoader(_StreamItems(dataset), batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
        total = None
        to_skip = state["batches"]  # a stream is re-read from the start; done batches are not re-encoded
    bar = tqdm(total=total, initial=state["batches"], desc="token cache", unit="batch", disable=not progress)
    try:
        for images, captions, skipped in loader:
            if to_skip:
                to_skip -= 1
                continue
            for s in skipped:
                counter.skip(s.key, s.reason, check=False, count=s.count)
            if images is not None:
                with torch.no_grad():
                    tokens = encode_fn(images)
                array = _check_tokens(tokens, len(captions), grid, codebook_size)
                if grid is None:
                    grid = array.shape[1]
                    row_bytes = grid * grid * dtype.itemsize
                tokens_file.write(np.ascontiguousarray(array, dtype=dtype).tobytes())
                lines = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in captions).encode("utf-8")
                captions_file.write(lines)
                counter.ok(len(captions))
                state["count"] += len(captions)
            state["batches"] += 1
            state["grid"] = grid
            for f in (tokens_file, captions_file):
                f.flush()
                os.fsync(f.fileno())
            state["captions_bytes"] = captions_file.tell()
            listed = dict(list(counter.reasons.items())[:_MAX_LISTED_SKIPS])  # bounded: rewritten every batch
            state.update(seen=counter.seen, skipped=counter.skipped, reasons=listed)
            _write_json_atomic(partial / "progress.json", state)
            bar.update(1)
            counter.check()
        counter.check(final=True)
    finally:
        bar.close()
        tokens_file.close()
        captions_file.close()

    if state["count"] == 0:
        raise DataError(f"no usable image to cache: {counter.summary()}")
    with open(partial / "tokens.npy", "r+b") as f:  # the real row count, in the reserved header space
        f.write(_npy_header(dtype, (state["count"], grid, grid)))
        f.flush()
        os.fsync(f.fileno())
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "count": state["count"],
        "grid": grid,
        "codebook_size": codebook_size,
        "dtype": dtype.str,
        "image_size": image_size,
        "source": source,
        "fingerprint": fingerprint,
        "seen": counter.seen,
        "skipped": counter.skipped,
        "skipped_items": dict(list(counter.reasons.items())[:_MAX_LISTED_SKIPS]),
        # The files' own fingerprints: TokenCache.verify() finds a cache damaged after it was built.
        "sha256": {name: _sha256(partial / name) for name in ("tokens.npy", "captions.jsonl")},
    }
    _write_json_atomic(partial / "meta.json", meta)
    (partial / "progress.json").unlink()
    if out_dir.exists():  # overwrite: move the old one aside first so a crash never leaves neither
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(partial, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, out_dir)
    if counter.skipped:
        log.warning("token cache %s: %s", out_dir, counter.summary())
    return TokenCache(out_dir, fingerprint=fingerprint)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_progress(partial: Path, run_id: dict[str, Any]) -> dict[str, Any] | None:
    path = partial / "progress.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(state, dict) or state.get("run") != run_id:
        log.info("discarding an unfinished token cache build in %s made with other arguments", partial)
        return None
    return state


__all__ = [
    "StaleCacheError",
    "TokenCache",
    "TokenCacheError",
    "build_token_cache",
    "fingerprint_state_dict",
]
