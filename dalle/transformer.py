"""The DALL-E transformer: a decoder-only model over text tokens then image tokens.

One stream of ``S = text_len + grid**2`` tokens, modelled autoregressively
(Ramesh et al. 2021, section 2.2):

    [t_0 ... t_{T-1}] [i_0 ... i_{N-1}]        T = text_len, N = grid**2 (raster order)

The model is fed the first ``S - 1`` tokens and predicts the next one at every
position: position ``p < T - 1`` predicts text token ``p + 1`` (through the text
head), position ``T - 1 + j`` predicts image token ``j`` (through the image head).
So the first image token is predicted from the last text position, and the first
text token, which has no predecessor, is never predicted -- text only conditions
the image, we never sample it.

Text positions have a learned position embedding; an image token's position is the
sum of a learned row and a learned column embedding.  Text and image tokens have
separate embedding tables and separate (untied) output heads, so the text head can
never emit an image code and vice versa.

Blocks are pre-norm (``x + attn(ln(x))``, ``x + mlp(ln(x))``); each layer's attention
mask kind (full / row / column / conv, :mod:`dalle.attention_masks`) is fixed at
construction.  The same code path serves training (whole sequence, no cache) and
sampling (a preallocated key/value cache, see :mod:`dalle.sampling`).  For decoders
that need fixed shapes (a CUDA graph) the model also offers one decoding step,
:meth:`DalleTransformer.decode_static`; the decoding loops themselves live in
:mod:`dalle.sampling`.

Attention runs on one of two paths (``TransformerConfig.attention_impl``): ``dense``,
PyTorch's scaled-dot-product attention under a boolean mask (the reference, and the CPU
path), or ``flex``, FlexAttention with block masks, where the row, column and conv
layers compute only the tiles their masks allow.  ``auto`` takes flex on CUDA for the
sparse layers of a whole-sequence pass and dense everywhere else (one-token decoding
reads only the allowed keys already).  Full layers always use SDPA's causal kernel.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dalle.attention_masks import build_mask, flex_available, flex_mask, layer_schedule
from dalle.config import ConfigError, TransformerConfig


class MaskArgs(NamedTuple):
    """How one layer attends in one forward call.

    ``mask``: bool ``[L, keys]``, True = may attend (None: no mask); ``is_causal``: let SDPA
    apply the causal mask itself; ``keys``: with a cache, the positions of the cached keys
    to attend to (a sparse layer's allowed keys when decoding one token), instead of the
    whole filled prefix.  ``flex``: a :class:`dalle.attention_masks.FlexMask` for the
    FlexAttention path (whole sequence, no cache); ``mask`` is then kept as the fallback.
    """

    mask: torch.Tensor | None = None
    is_causal: bool = False
    keys: torch.Tensor | None = None
    flex: Any = None


# Per layer (key cache, value cache), each [B, n_heads, S - 1, head_dim], written in place.
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


ATTENTION_IMPLS = ("auto", "dense", "flex")
# Set when a FlexAttention call failed (no Triton, an unsupported GPU...): from then on the
# process uses the dense path, after one warning, instead of failing every step.
_FLEX_BROKEN: list[str] = []


def flex_works_on(device: torch.device) -> bool:
    """Whether ``auto`` may pick FlexAttention on ``device``: CUDA with FlexAttention and Triton."""
    if device.type != "cuda" or _FLEX_BROKEN or not flex_available():
        return False
    try:
        from torch.utils._triton import has_triton

        return bool(has_triton())
    except ImportError:
        return False


# The compiled FlexAttention, by whether it autotunes (see flex_attend).
_compiled_flex: dict[bool, Any] = {}


def flex_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, kernel_options: dict[str, Any] | None = None
) -> torch.Tensor:
    """FlexAttention over ``[B, H, L, D]`` tensors with a block mask.

    On CUDA the kernel must be compiled to be fused (and to skip the empty tiles): the
    function is compiled once per process, or inlined when the caller is already being
    compiled.  On the CPU, PyTorch runs an unfused reference (forward only, no gradient),
    which only serves to check the path against the dense one.

    ``kernel_options``: FlexAttention's tile sizes and launch options (see
    :data:`dalle.attention_masks.FLEX_TUNING`; None = PyTorch's defaults).  They change the
    speed, not the result; the CPU reference ignores them.  Each distinct dict is one more
    compiled kernel.

    A block mask with tiles under 128 is compiled with ``max_autotune``: PyTorch (2.11 to
    2.13 at least, pytorch/pytorch#176025) drops its default backward tile configs that do
    not divide the mask's tiles *before* applying ``kernel_options``, and its default on
    H100/H200 uses 128-wide tiles, so the backward has no kernel left; autotuning adds
    smaller configs, which explicit options then override.  (Inlined into a caller's
    compile, the caller's settings apply.)
    """
    from torch.nn.attention.flex_attention import flex_attention

    options = dict(kernel_options) if kernel_options else None  # a copy: the table stays ours
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, kernel_options=options)
    if q.device.type == "cpu":
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise RuntimeError("attention_impl='flex' cannot train on the CPU (PyTorch's FlexAttention has no "
                               "CPU backward); use attention_impl='auto' or 'dense'")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile": expected here
            return flex_attention(q, k, v, block_mask=block_mask, kernel_options=options)
    autotune = min(getattr(block_mask, "BLOCK_SIZE", (128, 128))) < 128
    if autotune not in _compiled_flex:
        import torch._dynamo as dynamo

        # One compiled kernel per (layer kind, shape, dtype, grad mode, kernel options): training,
        # evaluation and a last partial batch already make ~9; past the limit PyTorch would silently
        # run the unfused reference, which materialises every score.
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        _compiled_flex[autotune] = torch.compile(flex_attention, dynamic=False,
                                                 options={"max_autotune": True} if autotune else None)
    return _compiled_flex[autotune](q, k, v, block_mask=block_mask, kernel_options=options)


def check_config(config: TransformerConfig) -> None:
    """Raise :class:`ConfigError` for a transformer config that cannot be built."""
    problems = []
    for name in ("n_layers", "n_heads", "head_dim", "text_vocab", "text_len", "image_vocab", "image_grid", "mlp_ratio"):
        if int(getattr(config, name)) < 1:
            problems.append(f"{name} must be at least 1 (got {getattr(config, name)})")
    if config.text_vocab < config.text_len:
        problems.append(f"text_vocab={config.text_vocab} must include the {config.text_len} per-position pad ids")
    if config.attention not in ("sparse", "full"):
        problems.append(f"attention must be 'sparse' or 'full' (got {config.attention!r})")
    if config.conv_kernel < 1 or config.conv_kernel % 2 == 0:
        problems.append(f"conv_kernel must be a positive odd number (got {config.conv_kernel})")
    if not 0.0 <= config.dropout < 1.0:
        problems.append(f"dropout must be in [0, 1) (got {config.dropout})")
    impl = getattr(config, "attention_impl", "dense")
    if impl not in ATTENTION_IMPLS:
        problems.append(f"attention_impl must be one of {ATTENTION_IMPLS} (got {impl!r})")
    elif impl == "flex" and config.dropout > 0:
        problems.append("attention_impl='flex' has no attention dropout; set dropout=0 or use 'auto'/'dense'")
    if problems:
        raise ConfigError("transformer config: " + "; ".join(problems))


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, dropout_p: float
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v`` over ``[B, H, L, D]`` tensors; ``attn_mask`` True = may attend.

    Uses ``F.scaled_dot_product_attention`` except for bf16 on the CPU, where PyTorch's
    CPU attention kernels are 2-3x slower than three plain ops at our sizes (measured,
    torch 2.13: training [32, 4, 95, 64] forward+backward, and one-query decoding), so
    we spell it out.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        if is_causal:
            attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        if dropout_p > 0:
            weights = F.dropout(weights, dropout_p)
        return weights @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)


class Attention(nn.Module):
    """Multi-head self-attention whose mask kind is fixed per layer."""

    def __init__(self, config: TransformerConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        d = config.d_model
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.dropout = config.dropout

    def forward(
        self, x: torch.Tensor, mask: MaskArgs, cache: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0
    ) -> torch.Tensor:
        if mask.flex is not None and cache is None:
            if torch.compiler.is_compiling() or x.device.type == "cpu":
                return self._forward_flex(x, mask.flex)
            try:
                return self._forward_flex(x, mask.flex)
            except Exception as e:  # noqa: BLE001 - any kernel/compiler failure: fall back, once, loudly
                _FLEX_BROKEN.append(f"{type(e).__name__}: {e}")
                warnings.warn(f"FlexAttention failed ({type(e).__name__}: {str(e)[:300]}); "
                              "using dense masked attention from now on", stacklevel=2)
        b, length, d = x.shape
        # [B, L, 3, H, D] -> three [B, H, L, D] views
        q, k, v = self.qkv(x).view(b, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:
            # Write this chunk's keys/values in place and attend over the filled prefix only.
            k_cache, v_cache = cache
            end = start + length
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v
            if mask.keys is not None:  # a sparse layer reads only its allowed keys
                k, v = k_cache.index_select(2, mask.keys), v_cache.index_select(2, mask.keys)
            else:
                k, v = k_cache[:, :, :end], v_cache[:, :, :end]
        y = attend(q, k, v, mask.mask, mask.is_causal, self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, length, d))

    def decode_static(
        self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], position: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        """One token ``x [B, 1, d]`` at stream ``position`` (a one-element LongTensor), with static shapes.

        Writes its key/value at ``position`` and attends over the *whole* cache under
        ``allowed [1, keys]`` (its mask row, False beyond ``position``), so every call has
        the same shapes and no host synchronisation: what a CUDA graph needs.  The cache
        must hold finite values everywhere (zeros where unfilled): masked keys get weight
        0, and 0 * NaN would still be NaN.
        """
        b, _, d = x.shape
        q, k, v = self.qkv(x).view(b, 1, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k_cache, v_cache = cache
        k_cache.index_copy_(2, position, k.to(k_cache.dtype))
        v_cache.index_copy_(2, position, v.to(v_cache.dtype))
        scores = (q.to(k_cache.dtype) @ k_cache.transpose(-1, -2)).float() * (self.head_dim ** -0.5)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        y = weights.to(v_cache.dtype) @ v_cache
        return self.proj(y.to(x.dtype).transpose(1, 2).reshape(b, 1, d))

    def _forward_flex(self, x: torch.Tensor, flex: Any) -> torch.Tensor:
        """Whole-sequence attention through FlexAttention, in the mask's stream order."""
        b, length, d = x.shape
        if flex.order is not None:  # e.g. column layers: attend in column-major order
            # Permute the layer input (d wide) rather than q, k and v (3d wide, three gathers).
            x = permute_tokens(x, flex.order, flex.inverse)
        # FlexAttention wants one dtype and contiguous inputs (autocast leaves q, k, v in bf16):
        # one copy of the [3, B, H, L, D] layout, then q, k, v are contiguous slices of it.
        q, k, v = self.qkv(x).view(b, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).contiguous()
        y = flex_attend(q, k, v, flex.block_mask, flex.kernel_options).transpose(1, 2)  # [B, L, H, D], a view
        if flex.inverse is not None:
            # Back to raster order; the gather also merges the heads (its output is contiguous),
            # so this costs one copy, not the transpose's and the permutation's.
            y = permute_tokens(y, flex.inverse, flex.order)
        return self.proj(y.reshape(b, length, d))


class _PermuteTokens(torch.autograd.Function):
    """``x.index_select(1, order)`` whose backward is a gather by ``inverse``, not an ``index_add``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        # y[:, i] = x[:, order[i]], so dx[:, p] = dy[:, inverse[p]]: every position gets exactly one
        # gradient, read by a gather.  (index_select's own backward scatters with atomic adds.)
        return grad.index_select(1, inverse), None, None


def permute_tokens(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Reorder the token axis (dim 1) of ``x [B, L, ...]``: ``out[:, i] = x[:, order[i]]``.

    ``order`` must be a permutation of ``0 .. L-1`` and ``inverse`` its inverse
    (``order[inverse] == arange(L)``); neither is checked here (this runs in every column
    layer).  Values and gradients equal ``x.index_select(1, order)``'s exactly, but the
    backward pass is a gather by ``inverse`` instead of an atomic scatter-add: on a GPU
    that scatter cost as much as the column layer's attention itself.  ``x`` may be a
    strided view; the output is contiguous.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _PermuteTokens.apply(x, order, inverse)
    return x.index_select(1, order)


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        d = config.d_model
        self.fc1 = nn.Linear(d, config.mlp_ratio * d)
        self.fc2 = nn.Linear(config.mlp_ratio * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, config: TransformerConfig, kind: str):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = Attention(config, kind)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, mask: MaskArgs, cache: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), mask, cache, start))
        return x + self.drop(self.mlp(self.ln2(x)))

    def decode_static(
        self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], position: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward` for one token with static shapes (see :meth:`Attention.decode_static`)."""
        x = x + self.attn.decode_static(self.ln1(x), cache, position, allowed)
        return x + self.mlp(self.ln2(x))


class DalleTransformer(nn.Module):
    """Decoder-only transformer over ``[text tokens, image tokens]`` (see the module docstring)."""

    # Parameters that map vocabularies or positions to/from the model width; excluded by
    # ``count_parameters(non_embedding=True)`` (Kaplan et al. 2020 count "non-embedding"
    # parameters; their output projection is tied to the embedding, ours is not, so the
    # two output heads are vocabulary matrices too and are excluded with the embeddings).
    EMBEDDING_PREFIXES = ("text_embedding.", "text_position.", "image_embedding.", "image_row.",
                          "image_column.", "text_head.", "image_head.")

    def __init__(self, config: TransformerConfig):
        super().__init__()
        check_config(config)
        self.config = config
        d = config.d_model
        self.text_embedding = nn.Embedding(config.text_vocab, d)
        self.text_position = nn.Embedding(config.text_len, d)
        self.image_embedding = nn.Embedding(config.image_vocab, d)
        self.image_row = nn.Embedding(config.image_grid, d)
        self.image_column = nn.Embedding(config.image_grid, d)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.kinds = layer_schedule(config.n_layers, config.attention)
        self.blocks = nn.ModuleList(Block(config, kind) for kind in self.kinds)
        self.ln_f = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, config.text_vocab, bias=False)
        self.image_head = nn.Linear(d, config.image_vocab, bias=False)
        # Recompute each block's activations in the backward pass (saves memory, costs ~1/3 more compute).
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.fc2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # --- construction helpers -------------------------------------------------

    @classmethod
    def on_meta(cls, config: TransformerConfig) -> "DalleTransformer":
        """Build on the meta device: shapes only, no weights allocated (e.g. to count the paper model)."""
        with torch.device("meta"):
            return cls(config)

    def count_parameters(self, non_embedding: bool = False) -> int:
        """Number of parameters; ``non_embedding=True`` leaves out embeddings, positions and output heads."""
        return sum(
            p.numel()
            for name, p in self.named_parameters()
            if not (non_embedding and name.startswith(self.EMBEDDING_PREFIXES))
        )

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        from dalle.io import save_module

        if getattr(self, "prepared_for_sampling", False):
            raise RuntimeError("this is a copy made by prepare_for_sampling (packed weights); save the original model")
        save_module(folder, self, self.config, dtype=dtype)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "DalleTransformer":
        from dalle.io import load_module

        model, _ = load_module(folder, cls, TransformerConfig, device=device)
        return model.eval()

    # --- pieces shared by training and sampling --------------------------------

    @property
    def pad_start(self) -> int:
        """First per-position padding id: ids ``[pad_start, text_vocab)`` are pads."""
        return self.config.text_vocab - self.config.text_len

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """``[B, text_len]`` ids -> ``[B, text_len, d]``."""
        positions = self.text_position.weight[: text_ids.shape[1]]
        return self.text_embedding(text_ids) + positions

    def image_positions(self) -> torch.Tensor:
        """``[grid**2, d]`` position embedding of each raster index: its row's plus its column's."""
        g = self.config.image_grid
        return (self.image_row.weight[:, None, :] + self.image_column.weight[None, :, :]).reshape(g * g, -1)

    def embed_image(
        self, image_ids: torch.Tensor, first: int = 0, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, L]`` image ids at raster indices ``first .. first+L-1`` -> ``[B, L, d]``.

        ``positions`` may pass a precomputed :meth:`image_positions` table (the sampler does).
        """
        if positions is None:
            positions = self.image_positions()
        return self.image_embedding(image_ids) + positions[first : first + image_ids.shape[1]]

    def use_flex(self, device: torch.device | str) -> bool:
        """Whether a whole-sequence pass on ``device`` takes the FlexAttention path (see the module docstring)."""
        impl = getattr(self.config, "attention_impl", "dense")
        if impl == "dense" or all(kind == "full" for kind in self.kinds):
            return False
        if impl == "flex":
            return flex_available() and not _FLEX_BROKEN
        # auto: CUDA only, and only without attention dropout (FlexAttention has none).
        return flex_works_on(torch.device(device)) and not (self.training and self.config.dropout > 0)

    def mask_args(
        self, start: int, length: int, device: torch.device, flex: bool = False
    ) -> dict[str, MaskArgs]:
        """Attention arguments of each layer kind for queries ``start .. start+length-1``.

        Keys are the positions ``0 .. start+length-1`` (the filled prefix).  Dense causal
        attention uses SDPA's ``is_causal`` (no mask tensor, fastest kernel) when the
        queries start at 0, and no mask at all for a single query, which may see every key.
        ``flex=True`` (a whole-sequence pass without cache) adds FlexAttention block masks
        for the sparse kinds.
        """
        cfg = self.config
        out: dict[str, MaskArgs] = {}
        for kind in set(self.kinds):
            if kind == "full" and length == 1:
                out[kind] = MaskArgs()
            elif kind == "full" and start == 0:
                out[kind] = MaskArgs(is_causal=True)
            else:
                mask = build_mask(kind, cfg.text_len, cfg.image_grid, cfg.conv_kernel, device)
                sparse = None
                if flex and start == 0 and length > 1:
                    sparse = flex_mask(kind, cfg.text_len, cfg.image_grid, cfg.conv_kernel, length, device)
                out[kind] = MaskArgs(mask[start : start + length, : start + length], flex=sparse)
        return out

    def hidden_states(
        self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None, masks: dict[str, MaskArgs] | None = None
    ) -> torch.Tensor:
        """Run the blocks and the final norm on embedded tokens ``x`` [B, L, d] at positions ``start..``."""
        if masks is None:
            flex = cache is None and x.shape[1] > 1 and self.use_flex(x.device)
            masks = self.mask_args(start, x.shape[1], x.device, flex=flex)
        x = self.drop(x)
        use_checkpoint = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            mask = masks[block.attn.kind]
            if use_checkpoint:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, None if cache is None else cache[i], start)
        return self.ln_f(x)

    def new_cache(
        self, batch: int, device: torch.device | str, dtype: torch.dtype, length: int | None = None,
        zeros: bool = False,
    ) -> KVCache:
        """Preallocated key/value cache; ``length`` defaults to ``S - 1`` (the last image token is never fed).

        ``zeros=True`` fills it with zeros (what :meth:`decode_static` needs), else it is left uninitialised.
        """
        cfg = self.config
        shape = (batch, cfg.n_heads, cfg.seq_len - 1 if length is None else length, cfg.head_dim)
        alloc = torch.zeros if zeros else torch.empty
        return [(alloc(shape, device=device, dtype=dtype), alloc(shape, device=device, dtype=dtype))
                for _ in self.blocks]

    def decode_static(
        self, token: torch.Tensor, position: torch.Tensor, cache: KVCache, masks: dict[str, torch.Tensor],
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """One decoding step with static shapes: image token ``token [B]`` fed at stream ``position``.

        ``position`` is a one-element LongTensor (``text_len + j`` for image token ``j``),
        ``cache`` a zero-filled :meth:`new_cache` of the full length, ``masks`` each layer
        kind's mask table ``[S - 1, S - 1]`` (True = may attend; the row at ``position`` is
        used), ``positions`` the :meth:`image_positions` table in the activations' dtype.
        Every call has the same shapes and reads no value on the host, so it can be
        captured as a CUDA graph (:class:`dalle.sampling.StaticDecoder` does).  Returns
        the logits ``[B, image_vocab]`` of the next image token.
        """
        t = self.config.text_len
        x = self.image_embedding(token)[:, None, :] + positions.index_select(0, position - t)[None]
        rows = {kind: table.index_select(0, position) for kind, table in masks.items()}
        for block, layer_cache in zip(self.blocks, cache):
            x = block.decode_static(x, layer_cache, position, rows[block.attn.kind])
        return self.image_head(self.ln_f(x)[:, 0])

    # --- training interface ------------------------------------------------------

    def check_tokens(self, text_ids: torch.Tensor, image_ids: torch.Tensor | None = None) -> None:
        """Raise ValueError for token tensors of the wrong shape, type or range."""
        cfg = self.config
        if text_ids.dim() != 2 or text_ids.shape[1] != cfg.text_len:
            raise ValueError(f"text_ids must be [B, {cfg.text_len}], got {list(text_ids.shape)}")
        if text_ids.dtype != torch.long:
            raise ValueError(f"text_ids must be int64 (torch.long), got {text_ids.dtype}")
        if text_ids.numel() and (int(text_ids.min()) < 0 or int(text_ids.max()) >= cfg.text_vocab):
            raise ValueError(f"text ids must lie in [0, {cfg.text_vocab}), "
                             f"got [{int(text_ids.min())}, {int(text_ids.max())}]")
        if image_ids is None:
            return
        g = cfg.image_grid
        if image_ids.dim() != 3 or tuple(image_ids.shape[1:]) != (g, g) or image_ids.shape[0] != text_ids.shape[0]:
            raise ValueError(f"image_ids must be [B, {g}, {g}] with B={text_ids.shape[0]}, got {list(image_ids.shape)}")
        if image_ids.dtype != torch.long:
            raise ValueError(f"image_ids must be int64 (torch.long), got {image_ids.dtype}")
        if image_ids.numel() and (int(image_ids.min()) < 0 or int(image_ids.max()) >= cfg.image_vocab):
            raise ValueError(f"image ids must lie in [0, {cfg.image_vocab}), "
                             f"got [{int(image_ids.min())}, {int(image_ids.max())}]")

    def forward(self, text_ids: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits over the whole stream.

        Args:
            text_ids: ``[B, text_len]`` text ids (BPE ids and per-position pads).
            image_ids: ``[B, grid, grid]`` dVAE codes.
        Returns:
            ``text_logits [B, text_len - 1, text_vocab]`` (predicting text tokens 1..T-1) and
            ``image_logits [B, grid**2, image_vocab]`` (predicting image tokens 0..N-1).
        """
        if not torch.compiler.is_compiling():  # the checks read values (a graph break under compile)
            self.check_tokens(text_ids, image_ids)
        t = self.config.text_len
        image_flat = image_ids.flatten(1)
        # The last image token is only a target, never an input.
        x = torch.cat([self.embed_text(text_ids), self.embed_image(image_flat[:, :-1])], dim=1)
        h = self.hidden_states(x)
        return self.text_head(h[:, : t - 1]), self.image_head(h[:, t - 1 :])

    def loss(
        self,
        text_ids: torch.Tensor,
        image_ids: torch.Tensor,
        *,
        text_tokens: torch.Tensor | float | None = None,
        image_tokens: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted cross-entropy ``text_loss_weight * text + image_loss_weight * image``.

        Each term is averaged over its own tokens.  Text targets that are padding ids do
        *not* count: after a caption ends its pads are a fixed function of position, so
        including them would fill the text average with trivially predictable tokens
        (with 32 text positions and ~6-word captions, ~80% of it), shrinking the text
        term's effective weight and inflating text accuracy.  The pads are still fed as
        inputs, so the model sees the same stream either way.

        ``text_tokens`` / ``image_tokens`` replace this batch's counts of real text targets
        and image tokens as the divisors: a step split into micro-batches or across
        processes passes the *whole* step's counts, so the parts' losses add up to exactly
        the whole batch's loss (a mean of per-part means would weigh the text tokens of a
        part with short captions more).

        Returns ``(loss, {"text_loss": ..., "image_loss": ...})`` (the parts detached).
        """
        text_logits, image_logits = self(text_ids, image_ids)
        targets = text_ids[:, 1:]
        real = targets < self.pad_start
        text_sum = F.cross_entropy(
            text_logits.reshape(-1, text_logits.shape[-1]).float(), targets.masked_fill(~real, -100).reshape(-1),
            ignore_index=-100, reduction="sum",
        )
        text_loss = text_sum / (real.sum().clamp(min=1) if text_tokens is None else text_tokens)
        if image_tokens is None:
            image_loss = F.cross_entropy(image_logits.reshape(-1, image_logits.shape[-1]).float(), image_ids.reshape(-1))
        else:
            image_loss = F.cross_entropy(image_logits.reshape(-1, image_logits.shape[-1]).float(), image_ids.reshape(-1),
                                         reduction="sum") / image_tokens
        cfg = self.config
        total = cfg.text_loss_weight * text_loss + cfg.image_loss_weight * image_loss
        return total, {"text_loss": text_loss.detach(), "image_loss": image_loss.detach()}

