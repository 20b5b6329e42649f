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
from typing import Any

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
