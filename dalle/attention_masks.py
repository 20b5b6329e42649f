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
token ``j`` as ``(r, c) = divmod(j, grid)`` and ``d = j - j'`` for the raster distance to
key ``j'``, query ``j`` may attend to key ``j'`` (always causal, ``d >= 0``) when:

* ``full``:   always (dense causal attention).
* ``row``:    ``d <= grid``, i.e. ``j - grid <= j' <= j`` -- a causal window of
  ``grid + 1`` tokens in raster order, itself included.  The caption of the paper's
  figure 11 (a 4 x 4 grid): "each image token attends to the previous 5 image tokens in
  raster order. The extent is chosen to be 5, so that the last token being attended to is
  the one in the same column of the previous row".  The window wraps around the row
  edge: token ``(1, 0)`` sees ``(0, 0) .. (0, 3)`` and itself.
* ``column``: ``c' == c`` and ``r' <= r`` -- the same column, from the top row down to
  itself (figure 11(b); the paper transposes image states to make this a row
  pattern on hardware, which changes nothing about *which* tokens are attended).
* ``conv``:   the causal half of a ``k x k`` kernel (odd ``k``, ``h = k // 2``; the paper's
  model uses 11 x 11, its figure 3 x 3), laid out in raster order: kernel cell
  ``(dr, dc)``, ``-h <= dr <= 0``, ``-h <= dc <= h``, is the key at raster distance
  ``d = -(dr * grid + dc)``.  So ``d = m * grid + e`` for some ``0 <= m <= h`` and
  ``|e| <= h``: ``h + 1`` diagonal bands of the mask, each ``2h + 1`` wide (the first
  cut in half by causality).

  Figure 11(d) is "a causal convolutional attention pattern with wraparound behavior
  (similar to the row attention)".  The row attention's wraparound is raster order
  itself: its window is a fixed run of raster distances, so at the start of a row it
  continues at the end of the previous one.  We read the convolution the same way --
  every kernel cell is a fixed raster distance, the same for every token -- so a kernel
  that leaves the image on the left continues on the right end of the row above, and
  one that leaves it on the right continues on the left end of the row below (never
  past the token itself: causal).  No token's window is clipped: every token far enough
  from the top sees the same ``h * (2h + 1) + h + 1`` keys, as every token past the
  first row sees ``grid + 1`` under the row mask.  (ai-forever's ru-dalle reads the
  wraparound as a torus instead -- row and column taken modulo ``grid``, then causal --
  which also lets the bottom rows see the top ones; we keep the raster reading the
  phrase "similar to the row attention" describes.)

The paper's schedule (:func:`layer_schedule`): layer ``i`` (0-based) uses ``column``
when ``(i - 2) % 4 == 0``, ``conv`` in the last layer and ``row`` elsewhere.
"""

from __future__ import annotations

import warnings
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
        x x x x x . . . . . . . . . . .     token (1,0) sees all of row 0 and itself:
        . x x x x x . . . . . . . . . .     the previous 5 in raster order, the last of
        . . x x x x x . . . . . . . . .     them (0,0) in its column (figure 11(a))
        ...                                 (a band of width grid + 1)

    ``column``::

        x . . . . . . . . . . . . . . .
        . x . . . . . . . . . . . . . .
        . . x . . . . . . . . . . . . .
        . . . x . . . . . . . . . . . .
        x . . . x . . . . . . . . . . .     token (1,0) sees (0,0) (1,0)
        . x . . . x . . . . . . . . . .
        ...
        x . . . x . . . x . . . x . . .     token (3,0) sees its whole column so far

    ``conv`` with ``k = 3``: raster distances 0, 1 (the kernel's own row) and
    grid - 1, grid, grid + 1 (the row above), two bands::

        x . . . . . . . . . . . . . . .
        x x . . . . . . . . . . . . . .
        . x x . . . . . . . . . . . . .
        x . x x . . . . . . . . . . . .
        x x . x x . . . . . . . . . . .     token (1,0) sees (0,0) (0,1) above, and
        x x x . x x . . . . . . . . . .     (0,3) -- its left neighbour, wrapped round
        ...

    On a 5 x 5 grid, ``k = 3``, the keys of (1,1), of (1,4) and of (2,0)::

        x x x . .      . . . x x      . . . . x
        x x . . .      x . . x x      x x . . x
        . . . . .      . . . . .      x . . . .

    (1,4)'s upper-right cell wraps to (1,0); (2,0)'s left cells wrap to the row above's end.
    """
    _check(kind, 1, grid, conv_kernel)
    n = grid * grid
    j = torch.arange(n)
    q, k = j[:, None], j[None, :]
    causal = k <= q
    if kind == "full":
        return causal
    if kind == "row":
        return causal & (q - k <= grid)
    if kind == "column":
        return causal & (q % grid == k % grid)
    return causal & conv_window(q - k, grid, conv_kernel)


def conv_window(d: torch.Tensor, grid: int, conv_kernel: int) -> torch.Tensor:
    """Whether raster distance ``d >= 0`` is a cell of the causal ``conv_kernel`` window (see module doc).

    ``d = m * grid + e`` with ``0 <= m <= h`` and ``|e| <= h`` (``h = conv_kernel // 2``):
    ``d`` is at most ``h * grid + h`` and lies within ``h`` of a multiple of ``grid``.
    (When ``grid <= 2h + 1`` the bands touch and the test is the bound alone.)
    Only meaningful for ``d >= 0``; callers combine it with causality.
    """
    h = conv_kernel // 2
    offset = d % grid
    return (d <= h * grid + h) & ((offset <= h) | (offset >= grid - h))


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
# of (query, key) and a *block mask* -- which tiles (128 x 128 by default, see FLEX_TUNING)
# hold any allowed pair -- and computes only those tiles.  At the paper's 256 + 32x32 layout a
# row layer touches about a third of the tiles a dense kernel computes (a quarter with 64 x 64).
#
# A column layer is sparse in a way raster order hides: a query's allowed keys are one in
# every ``grid``, so every tile below the diagonal holds some.  The paper transposes the image
# states for these layers (appendix B.1); we do the same by reordering the stream before the
# attention -- text first, then the image tokens column by column -- where a column is a
# contiguous run and the pattern becomes a narrow band of tiles.  The reordering relabels
# queries and keys, so the result, put back in raster order, is exactly the same attention.


def mask_mod(
    kind: str, text_len: int, grid: int, conv_kernel: int = 11, order: torch.Tensor | None = None,
    column_major: bool = False,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The mask of :func:`build_mask` as FlexAttention's ``mask_mod(b, h, q, k) -> bool``.

    ``order`` (optional, a LongTensor on the attention's device) maps positions of a
    reordered stream to positions of the raster stream: the returned function is then the
    mask between reordered positions, ``mask[order[q], order[k]]``.

    ``column_major=True`` (``kind="column"`` only) is the same mask between the positions of
    :func:`column_major_order` computed without a lookup table, valid for a stream that holds
    at least all but the last image token (training and scoring: every column but the last
    is complete, so reordered image index ``m`` is row ``m % grid`` of column ``m // grid``).
    There a column is a contiguous run whose raster order is the stream order, so the
    pattern is "causal, and the key is text or in the query's run".  The kernel evaluates
    this on every partial tile; arithmetic is cheaper than two gathers per tile.
    """
    _check(kind, text_len, grid, conv_kernel)
    if column_major and (kind != "column" or order is not None):
        raise ValueError("column_major=True is for kind='column' without an order table")

    if column_major:
        def allowed_column_major(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            same_column = (q - text_len) // grid == (k - text_len) // grid
            return (k <= q) & ((k < text_len) | same_column)

        return allowed_column_major

    def allowed(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if order is not None:
            q, k = order[q], order[k]
        causal = k <= q
        if kind == "full":
            return causal
        jq, jk = q - text_len, k - text_len  # image raster indices (negative on text positions)
        if kind == "row":
            image = jq - jk <= grid
        elif kind == "column":
            image = (jq % grid) == (jk % grid)
        else:  # conv
            image = conv_window(jq - jk, grid, conv_kernel)
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
    """A FlexAttention block mask for one layer kind and stream length, and how to run it.

    ``order`` / ``inverse``: None for raster order; else queries, keys and values are taken
    in ``order`` and the output is put back with ``inverse`` (``order[inverse] == arange``).
    ``kernel_options``: FlexAttention's ``kernel_options`` tuned for this mask's block size
    (:data:`FLEX_TUNING`), or None for PyTorch's defaults.
    """

    block_mask: Any
    order: torch.Tensor | None
    inverse: torch.Tensor | None
    kernel_options: dict[str, Any] | None = None


def flex_available() -> bool:
    """Whether this PyTorch has FlexAttention (``torch.nn.attention.flex_attention``)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# --- FlexAttention kernel tuning -------------------------------------------------------------
#
# FlexAttention's Triton kernels take tile sizes and launch options (``kernel_options``) and
# the block mask its own tile size.  They change speed, never which pairs attend: the kernel
# tiles subdivide the mask's tiles.  The defaults are PyTorch's per-GPU heuristics with
# 128 x 128 mask tiles; ``python benchmarks/bench_gpu.py --sweep-flex`` times the
# alternatives at the paper layout and prints a table to paste here.
#
# FLEX_TUNING[device][kind] = {"block_size": int or [q, kv], "kernel_options": {...}}, where
# ``device`` is :func:`flex_device_key` ("sm90": H100/H200).  A kind or device missing from
# the table runs PyTorch's defaults.  Options PyTorch does not know are dropped with a
# warning (they change between releases), so a stale table never stops a model.  Mask tiles
# under 128 need every kernel tile explicit (check_kernel_options), and
# ``dalle.transformer.flex_attend`` compiles them with max_autotune (pytorch/pytorch#176025).
FLEX_TUNING: dict[str, dict[str, dict[str, Any]]] = {}

FLEX_DEFAULT_BLOCK_SIZE = 128  # PyTorch's own default, and what its default kernel tiles fit
# Options that would change the results or assume what these masks do not guarantee:
# PRESCALE_QK rounds differently; ROWS_GUARANTEED_SAFE assumes every *visited tile* holds an
# allowed key for every query row (the text-to-image boundary and the band edges break that:
# NaNs); BLOCKS_ARE_CONTIGUOUS assumes each query tile's key tiles are one run (text + band
# are two).  OUTPUT_* are PyTorch's internal flags.
FLEX_UNSAFE_OPTIONS = ("PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "OUTPUT_LOGSUMEXP",
                       "OUTPUT_MAX")
# Known keys where the running PyTorch has no FlexKernelOptions to list its own (torch 2.13's list).
_FALLBACK_OPTION_KEYS = frozenset({
    "num_warps", "num_stages", "BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2",
    "PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "WRITE_DQ", "FORCE_USE_FLEX_ATTENTION",
    "USE_TMA", "kpack", "matrix_instr_nonkdim", "waves_per_eu", "BACKEND",
})
_FWD_TILES, _BWD_TILES = ("BLOCK_M", "BLOCK_N"), ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")
_WARNED: set[str] = set()


def flex_device_key(device: torch.device | str) -> str:
    """The :data:`FLEX_TUNING` key of ``device``: ``"sm90"`` for an H100/H200, else the device type."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm{major}{minor}"
    return device.type


def flex_option_keys() -> frozenset[str]:
    """The ``kernel_options`` keys (without ``fwd_`` / ``bwd_`` prefix) the running PyTorch documents."""
    try:
        from torch.nn.attention.flex_attention import FlexKernelOptions
    except ImportError:
        return _FALLBACK_OPTION_KEYS
    return frozenset(FlexKernelOptions.__optional_keys__) | frozenset(FlexKernelOptions.__required_keys__)


def normalize_block_size(block_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``block_size`` as ``(query tile, key tile)``; an int means a square tile."""
    q, kv = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    for size in (q, kv):
        if not isinstance(size, int) or size < 16 or size & (size - 1):
            raise ValueError(f"a FlexAttention block size must be a power of two >= 16, got {block_size!r}")
    return q, kv


def check_kernel_options(options: dict[str, Any], block_size: int | tuple[int, int] = FLEX_DEFAULT_BLOCK_SIZE,
                         known: frozenset[str] | None = None) -> None:
    """Raise ``ValueError`` unless ``options`` are FlexAttention kernel options safe for our masks.

    Checked: every key (less its ``fwd_`` / ``bwd_`` prefix) is one this PyTorch knows
    (``known``, default :func:`flex_option_keys`); none changes the results
    (:data:`FLEX_UNSAFE_OPTIONS`); kernel tiles are powers of two that divide the mask's
    ``(query, key)`` block size (``BLOCK_M``, ``BLOCK_M1``, ``BLOCK_M2`` along queries, the
    ``N`` ones along keys); the backward's ``BLOCK_N1 % BLOCK_M1 == 0`` and
    ``BLOCK_M2 % BLOCK_N2 == 0`` (static asserts in PyTorch's flex_backwards template).  Mask
    blocks under 128 need every kernel tile explicit: PyTorch's default tiles go up to 128.
    """
    q_block, kv_block = normalize_block_size(block_size)
    known = flex_option_keys() if known is None else known
    problems = []
    for key in options:
        base = key[4:] if key.startswith(("fwd_", "bwd_")) else key
        if base not in known:
            problems.append(f"{key!r} is not a FlexAttention kernel option of torch {torch.__version__}")
        elif base in FLEX_UNSAFE_OPTIONS:
            problems.append(f"{key!r} would change the results or assume what these masks do not guarantee")

    def tile(name: str, prefix: str) -> Any:
        return options.get(prefix + name, options.get(name))

    missing = []
    for prefix, names in (("fwd_", _FWD_TILES), ("bwd_", _BWD_TILES)):
        for name in names:
            size = tile(name, prefix)
            if size is None:
                missing.append(prefix + name)
                continue
            along, limit = ("query", q_block) if name.startswith("BLOCK_M") else ("key", kv_block)
            if not isinstance(size, int) or size < 16 or size & (size - 1) or limit % size:
                problems.append(f"{prefix}{name}={size!r} must be a power of two >= 16 dividing the mask's "
                                f"{along} block {limit}")
    if missing and min(q_block, kv_block) < FLEX_DEFAULT_BLOCK_SIZE:
        problems.append(f"mask block {q_block}x{kv_block} needs explicit {', '.join(missing)} "
                        f"(PyTorch's default tiles go up to {FLEX_DEFAULT_BLOCK_SIZE})")
    m1, n1, m2, n2 = (tile(name, "bwd_") for name in _BWD_TILES)
    if isinstance(m1, int) and isinstance(n1, int) and m1 > 0 and n1 % m1:
        problems.append(f"bwd BLOCK_N1={n1} must be a multiple of BLOCK_M1={m1}")
    if isinstance(m2, int) and isinstance(n2, int) and n2 > 0 and m2 % n2:
        problems.append(f"bwd BLOCK_M2={m2} must be a multiple of BLOCK_N2={n2}")
    for key in ("num_warps", "num_stages"):
        for name in (key, "fwd_" + key, "bwd_" + key):
            value = options.get(name)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"{name}={value!r} must be a positive int")
    if problems:
        raise ValueError("FlexAttention kernel options: " + "; ".join(problems))


def flex_tuning(kind: str, device: torch.device | str) -> tuple[tuple[int, int], dict[str, Any] | None]:
    """``(block size, kernel_options or None)`` of ``kind`` on ``device`` from :data:`FLEX_TUNING`.

    Keys the running PyTorch does not know are dropped with one warning; the rest is used
    as written (the table is checked by the tests, :func:`check_kernel_options`).
    """
    entry = FLEX_TUNING.get(flex_device_key(device), {}).get(kind)
    if not entry:
        return (FLEX_DEFAULT_BLOCK_SIZE, FLEX_DEFAULT_BLOCK_SIZE), None
    block = normalize_block_size(entry.get("block_size", FLEX_DEFAULT_BLOCK_SIZE))
    options = dict(entry.get("kernel_options") or {})
    known = flex_option_keys()
    unknown = [k for k in options if (k[4:] if k.startswith(("fwd_", "bwd_")) else k) not in known]
    if unknown:
        message = (f"FLEX_TUNING[{flex_device_key(device)!r}][{kind!r}]: torch {torch.__version__} has no "
                   f"FlexAttention kernel option {unknown}; ignoring it")
        if message not in _WARNED:
            _WARNED.add(message)
            warnings.warn(message, stacklevel=3)
        options = {k: v for k, v in options.items() if k not in unknown}
    return block, options or None


def flex_mask(
    kind: str, text_len: int, grid: int, conv_kernel: int, length: int, device: torch.device | str,
    block_size: int | tuple[int, int] | None = None,
) -> FlexMask:
    """The :class:`FlexMask` of ``kind`` for queries and keys ``0 .. length-1``, cached per device.

    Column layers are given the column-major order (see the section comment); the others
    keep raster order.  ``block_size=None`` takes the block size and kernel options tuned for
    ``kind`` on ``device`` (:func:`flex_tuning`; PyTorch's defaults where none are); an
    explicit block size comes with PyTorch's default kernel options (``kernel_options=None``).
    """
    _check(kind, text_len, grid, conv_kernel)
    if kind != "conv":
        conv_kernel = 0
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must share one entry
        device = torch.device("cuda", torch.cuda.current_device())
    options = None
    if block_size is None:
        block, options = flex_tuning(kind, device)
    else:
        block = normalize_block_size(block_size)
    key = ("flex", kind, text_len, grid, conv_kernel, length, str(device), block,
           tuple(sorted((options or {}).items())))
    if key not in _DEVICE_CACHE:
        base = _block_mask(kind, text_len, grid, conv_kernel, length, device, block)
        _DEVICE_CACHE[key] = base._replace(kernel_options=options)
    return _DEVICE_CACHE[key]


def _block_mask(
    kind: str, text_len: int, grid: int, conv_kernel: int, length: int, device: torch.device, block: tuple[int, int]
) -> FlexMask:
    from torch.nn.attention.flex_attention import create_block_mask

    key = ("block_mask", kind, text_len, grid, conv_kernel, length, str(device), block)
    if key not in _DEVICE_CACHE:
        order = inverse = None
        if kind == "column":
            order = column_major_order(text_len, grid, length).to(device)
            inverse = torch.argsort(order)
        if kind == "column" and length >= text_len + grid * grid - 1:
            mod = mask_mod(kind, text_len, grid, column_major=True)  # the same mask, no lookups
        else:
            mod = mask_mod(kind, text_len, grid, max(conv_kernel, 1), order)
        q_block, kv_block = block
        block_mask = create_block_mask(mod, None, None, length, length, device=str(device),
                                       BLOCK_SIZE=block if q_block != kv_block else q_block)
        _DEVICE_CACHE[key] = FlexMask(block_mask, order, inverse)
    return _DEVICE_CACHE[key]


def tile_fraction(
    kind: str, text_len: int, grid: int, conv_kernel: int = 11, block_size: int | tuple[int, int] = 128
) -> float:
    """Share of the score matrix (S-1) x (S-1), padded to whole tiles, that a FlexMask computes.

    ``block_size``: the mask's tile, an int or ``(query, key)``.  A dense masked kernel
    computes 1.0, a causal one about half; the ratio is the work FlexAttention saves
    (CPU-only arithmetic, for reports and tests).
    """
    q_block, kv_block = normalize_block_size(block_size)
    length = text_len + grid * grid - 1
    mask = build_mask(kind, text_len, grid, conv_kernel)[:length, :length]
    if kind == "column":
        order = column_major_order(text_len, grid, length)
        mask = mask[order][:, order]
    q_tiles, kv_tiles = -(-length // q_block), -(-length // kv_block)
    padded = torch.zeros(q_tiles * q_block, kv_tiles * kv_block, dtype=torch.bool)
    padded[:length, :length] = mask
    touched = padded.view(q_tiles, q_block, kv_tiles, kv_block).any(dim=3).any(dim=1)
    return float(touched.sum()) / (q_tiles * kv_tiles)
