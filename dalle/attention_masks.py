"""The DALL-E transformer's attention masks (Ramesh et al. 2021, appendix B.1 and figure 11).

The transformer reads one stream: ``text_len`` text positions, then the ``grid x grid``
image tokens in raster order (row by row, left to right).  A mask is a boolean
``[S, S]`` matrix, ``S = text_len + grid**2``; ``mask[q, k]`` is True when the query
at position ``q`` may attend to the key at position ``k``.

Every kind shares the same text part:

* a text position attends causally to text (itself and the text before it);
* an image position attends to *all* text positions;
* no text position attends to an image position (the stream is causal).

The kinds differ only in which *image* tokens an image token sees.  Writing image
token ``j`` as ``(r, c) = divmod(j, grid)``, query ``(r, c)`` may attend to key
``(r', c')`` with raster index ``j' <= j`` (always causal) when:

* ``full``:   always (dense causal attention).
* ``row``:    ``j - grid < j' <= j`` -- the previous ``grid`` tokens in raster order,
  itself included: a causal window one image row wide.  This is the Sparse
  Transformer's "local" pattern with stride = row width, and what the paper's
  figure 11(a) draws as a band of width one row.
* ``column``: ``c' == c`` and ``r' <= r`` -- the same column, from the top row down to
  itself (figure 11(b); the paper transposes image states to make this a row
  pattern on hardware, which changes nothing about *which* tokens are attended).
* ``conv``:   ``|r' - r| <= k // 2`` and ``|c' - c| <= k // 2`` for the odd kernel size
  ``k`` -- the causal half of the ``k x k`` neighbourhood centred on the token
  (figure 11(d); the paper uses ``k = 11``).

The paper's schedule (:func:`layer_schedule`): layer ``i`` (0-based) uses ``column``
when ``(i - 2) % 4 == 0``, ``conv`` in the last layer and ``row`` elsewhere.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, NamedTuple

import torch

MASK_KINDS = ("full", "row", "column", "conv")
ATTENTION_MODES = ("sparse", "full")


def layer_schedule(n_layers: int, attention: str = "sparse") -> list[str]:
    """The mask kind of each layer: the paper's row/column/conv schedule, or ``full`` everywhere.

    >>> layer_schedule(8)
    ['row', 'row', 'column', 'row', 'row', 'row', 'column', 'conv']
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if n_layers < 1:
        raise ValueError(f"n_layers must be at least 1, got {n_layers}")
    if attention == "full":
        return ["full"] * n_layers
    kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(n_layers)]
    kinds[-1] = "conv"
    return kinds


def _check(kind: str, text_len: int, grid: int, conv_kernel: int) -> None:
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; choose one of {MASK_KINDS}")
    if text_len < 1 or grid < 1:
        raise ValueError(f"text_len and grid must be positive, got text_len={text_len}, grid={grid}")
    if kind == "conv" and (conv_kernel < 1 or conv_kernel % 2 == 0):
        raise ValueError(f"conv_kernel must be a positive odd number, got {conv_kernel}")


def image_mask(kind: str, grid: int, conv_kernel: int = 11) -> torch.Tensor:
    """The image-to-image block ``[grid**2, grid**2]`` of the mask (True = may attend).

    Pictures on a 4 x 4 grid (rows = queries, columns = keys, both in raster order,
    ``x`` = may attend).  ``row``::

        x . . . . . . . . . . . . . . .
        x x . . . . . . . . . . . . . .
        x x x . . . . . . . . . . . . .
        x x x x . . . . . . . . . . . .
        . x x x x . . . . . . . . . . .     token (1,0) sees (0,1) (0,2) (0,3) (1,0)
        . . x x x x . . . . . . . . . .
        . . . x x x x . . . . . . . . .
        ...                                 (a band of width grid)

    ``column``::

        x . . . . . . . . . . . . . . .
        . x . . . . . . . . . . . . . .
        . . x . . . . . . . . . . . . .
        . . . x . . . . . . . . . . . .
        x . . . x . . . . . . . . . . .     token (1,0) sees (0,0) (1,0)
        . x . . . x . . . . . . . . . .
        ...
        x . . . x . . . x . . . x . . .     token (3,0) sees its whole column so far

    ``conv`` with ``k = 3`` (the causal half of the 3 x 3 neighbourhood)::

        token (2,2) sees the keys marked on the grid:
            . . . .
            . x x x
            . x x .
            . . . .
    """
    _check(kind, 1, grid, conv_kernel)
    n = grid * grid
    j = torch.arange(n)
    q, k = j[:, None], j[None, :]
    causal = k <= q
    if kind == "full":
        return causal
    if kind == "row":
        return causal & (k > q - grid)
    r, c = j // grid, j % grid
    if kind == "column":
        return causal & (c[:, None] == c[None, :])
    h = conv_kernel // 2
    near_r = (r[:, None] - r[None, :]).abs() <= h
    near_c = (c[:, None] - c[None, :]).abs() <= h
    return causal & near_r & near_c


@lru_cache(maxsize=64)
def _build_mask_cpu(kind: str, text_len: int, grid: int, conv_kernel: int) -> torch.Tensor:
    n = grid * grid
    s = text_len + n
    mask = torch.zeros(s, s, dtype=torch.bool)
    mask[:text_len, :text_len] = torch.ones(text_len, text_len, dtype=torch.bool).tril()
    mask[text_len:, :text_len] = True
    mask[text_len:, text_len:] = image_mask(kind, grid, conv_kernel)
    return mask


_DEVICE_CACHE: dict[tuple, Any] = {}


def build_mask(
    kind: str, text_len: int, grid: int, conv_kernel: int = 11, device: torch.device | str | None = None
) -> torch.Tensor:
    """The full ``[S, S]`` boolean mask of one kind (True = may attend), cached per kind and device.

    The returned tensor is shared between callers: do not modify it in place.
    """
    _check(kind, text_len, grid, conv_kernel)
    if kind != "conv":
        conv_kernel = 0  # irrelevant; keeps the cache from holding copies
    mask = _build_mask_cpu(kind, text_len, grid, conv_kernel)
    if device is None or torch.device(device) == mask.device:
        return mask
    key = (kind, text_len, grid, conv_kernel, str(torch.device(device)))
    if key not in _DEVICE_CACHE:
        _DEVICE_CACHE[key] = mask.to(device)
    return _DEVICE_CACHE[key]


def allowed_keys(
    kind: str, text_len: int, grid: int, conv_kernel: int = 11, device: torch.device | str | None = None
) -> list[torch.Tensor]:
    """For each query position ``p`` of the stream, the key positions it may attend to (``LongTensor``).

    The rows of :func:`build_mask` as index lists, cached per kind and device: a decoder
    holding a key/value cache reads just these keys for a sparse layer.
    """
    _check(kind, text_len, grid, conv_kernel)
    if kind != "conv":
        conv_kernel = 0
    key = ("keys", kind, text_len, grid, conv_kernel, str(torch.device(device or "cpu")))
    if key not in _DEVICE_CACHE:
        mask = _build_mask_cpu(kind, text_len, grid, conv_kernel)
        _DEVICE_CACHE[key] = [row.nonzero().flatten().to(device or "cpu") for row in mask]
    return _DEVICE_CACHE[key]


# --- FlexAttention: masks that skip work ---------------------------------------------------
#
# A dense boolean mask only *hides* scores: the kernel still computes every (query, key)
# pair.  FlexAttention (``torch.nn.attention.flex_attention``) takes the mask as a function
# of (query, key) and a *block mask* -- which 128 x 128 tiles hold any allowed pair -- and
# computes only those tiles.  At the paper's 256 + 32x32 layout a row layer touches about a
# third of the tiles a dense kernel computes.
#
# A column layer is sparse in a way raster order hides: a query's allowed keys are one in
# every ``grid``, so every tile below the diagonal holds some.  The paper transposes the image
# states for these layers (appendix B.1); we do the same by reordering the stream before the
# attention -- text first, then the image tokens column by column -- where a column is a
# contiguous run and the pattern becomes a narrow band of tiles.  The reordering relabels
# queries and keys, so the result, put back in raster order, is exactly the same attention.


def mask_mod(
    kind: str, text_len: int, grid: int, conv_kernel: int = 11, order: torch.Tensor | None = None
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The mask of :func:`build_mask` as FlexAttention's ``mask_mod(b, h, q, k) -> bool``.

    ``order`` (optional, a LongTensor on the attention's device) maps positions of a
    reordered stream to positions of the raster stream: the returned function is then the
    mask between reordered positions, ``mask[order[q], order[k]]``.
    """
    _check(kind, text_len, grid, conv_kernel)
    half = conv_kernel // 2

    def allowed(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if order is not None:
            q, k = order[q], order[k]
        causal = k <= q
        if kind == "full":
            return causal
        jq, jk = q - text_len, k - text_len  # image raster indices (negative on text positions)
        if kind == "row":
            image = jq - jk < grid
        elif kind == "column":
            image = (jq % grid) == (jk % grid)
        else:  # conv
            image = ((jq // grid - jk // grid).abs() <= half) & ((jq % grid - jk % grid).abs() <= half)
        # A text key is allowed whenever it is causal; an image key (hence an image query) by its kind.
        return causal & ((k < text_len) | image)

    return allowed


def column_major_order(text_len: int, grid: int, length: int) -> torch.Tensor:
    """Stream positions ``0 .. length-1`` reordered: text, then the image tokens column by column.

    ``order[i]`` is the raster-stream position placed at ``i``.  Only the image tokens the
    stream holds (``length - text_len`` of them, in raster order) are reordered.
    """
    if not text_len <= length <= text_len + grid * grid:
        raise ValueError(f"length must be in [{text_len}, {text_len + grid * grid}], got {length}")
    present = torch.arange(length - text_len)
    column_major = sorted(present.tolist(), key=lambda j: (j % grid, j // grid))
    return torch.cat([torch.arange(text_len), text_len + torch.tensor(column_major, dtype=torch.long)])


class FlexMask(NamedTuple):
    """A FlexAttention block mask for one layer kind and stream length, and the stream order it assumes.

    ``order`` / ``inverse``: None for raster order; else queries, keys and values are taken
    in ``order`` and the output is put back with ``inverse`` (``order[inverse] == arange``).
    """

    block_mask: Any
    order: torch.Tensor | None
    inverse: torch.Tensor | None


def flex_available() -> bool:
    """Whether this PyTorch has FlexAttention (``torch.nn.attention.flex_attention``)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_mask(
    kind: str, text_len: int, grid: int, conv_kernel: int, length: int, device: torch.device | str,
    block_size: int = 128,
) -> FlexMask:
    """The :class:`FlexMask` of ``kind`` for queries and keys ``0 .. length-1``, cached per device.

    Column layers are given the column-major order (see the section comment); the others
    keep raster order.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    _check(kind, text_len, grid, conv_kernel)
    if kind != "conv":
        conv_kernel = 0
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must share one entry
        device = torch.device("cuda", torch.cuda.current_device())
    key = ("flex", kind, text_len, grid, conv_kernel, length, str(device), block_size)
    if key not in _DEVICE_CACHE:
        order = inverse = None
        if kind == "column":
            order = column_major_order(text_len, grid, length).to(device)
            inverse = torch.argsort(order)
        mod = mask_mod(kind, text_len, grid, max(conv_kernel, 1), order)
        block_mask = create_block_mask(mod, None, None, length, length, device=str(device), BLOCK_SIZE=block_size)
        _DEVICE_CACHE[key] = FlexMask(block_mask, order, inverse)
    return _DEVICE_CACHE[key]


def tile_fraction(kind: str, text_len: int, grid: int, conv_kernel: int = 11, block_size: int = 128) -> float:
    """Share of the ``block_size`` tiles of the whole (S-1) x (S-1) score matrix a FlexMask computes.

    A dense masked kernel computes 1.0, a causal one about half; the ratio is the work
    FlexAttention saves (CPU-only arithmetic, for reports and tests).
    """
    length = text_len + grid * grid - 1
    mask = build_mask(kind, text_len, grid, conv_kernel)[:length, :length]
    if kind == "column":
        order = column_major_order(text_len, grid, length)
        mask = mask[order][:, order]
    tiles = -(-length // block_size)
    padded = torch.zeros(tiles * block_size, tiles * block_size, dtype=torch.bool)
    padded[:length, :length] = mask
    touched = padded.view(tiles, block_size, tiles, block_size).any(dim=3).any(dim=1)
    return float(touched.sum()) / tiles**2
