"""Sampling image tokens from the transformer, with a key/value cache.

Each new image token costs one token's work: every layer keeps the keys and values
of the tokens already fed in a preallocated ``[B, heads, S - 1, head_dim]`` buffer,
written in place, and a new token's query attends over the filled prefix only, under
its layer's mask row -- so the row / column / conv masks hold exactly as in training.

Completion (the paper's figure 2 and image-to-image translation) is the same loop:
``keep_mask`` marks the tokens to keep; those are teacher-forced, the others sampled
in raster order.  Runs of kept tokens are fed in one multi-token step, and the text
plus the kept prefix before the first sampled token are prefilled in one pass.
Prompts repeated across the batch (many candidates of one caption) have their text
prefilled once and the cache copied, since text is identical across candidates.

Decoding a sparse layer reads only the keys its mask allows (an index list per
position), not the whole prefix.  On the CPU, :func:`prepare_for_sampling` makes an
inference copy with pre-packed weights that decodes ~1.6x faster; the per-step
work is otherwise a few small matrix products, so at small batch sizes a decoding
step is bound by memory traffic of the weights, not by arithmetic.

On a GPU that loop is bound by something else: a step is hundreds of small kernels
launched one by one from Python.  At 32x32 image tokens (benchmarks/bench_gpu.py: 12
layers, d_model 1024, batch 32) it did not finish one batch within 30 s on an H200.
There the sampler uses :class:`StaticDecoder` instead
(``decoder="auto"``): every step has the same shapes and is replayed as one CUDA graph
(0.078 s an image on that H200).  It draws the same random numbers in the same order,
so both decoders sample the same tokens from a generator, up to float rounding of the
logits.

Classifier-free guidance (beyond the paper; Ho & Salimans 2022): a model trained with the
caption replaced by the null caption (every text position its padding token) a fraction
of the time (``TransformerConfig.null_caption_fraction``) predicts both p(image | text)
and p(image).  With ``guidance`` s every image token is drawn from
``uncond + s * (cond - uncond)`` of the two streams' logits: s = 1 is plain sampling,
s = 0 ignores the caption, s > 1 follows it more closely.  Both streams run as one
batch of 2B rows through the same key/value cache (one forward a step, the prompt's
and the null caption's text prefilled once each); the token drawn for a candidate is fed
to both of its rows.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from dalle.attention_masks import allowed_keys, build_mask
from dalle.transformer import DalleTransformer, KVCache, MaskArgs

DECODERS = ("auto", "static", "cached")


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight is stored pre-packed in oneDNN's blocked layout.

    A plain CPU matrix product packs its weight operand into a blocked layout on every
    call; at sampling's few rows (one token per candidate) that copy of the whole weight
    costs as much as the product itself.  The weight may be stored in bf16 while the
    activations stay in their own dtype ("weight-only" bf16: half the bytes to read per
    token, and the CPU's bf16 dot-product instructions).
    """

    def __init__(self, linear: nn.Linear, weight_dtype: torch.dtype, batch_hint: int = 8):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_dtype = weight_dtype
        weight = linear.weight.detach().to(weight_dtype)
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint))
        bias = None if linear.bias is None else linear.bias.detach().to(weight_dtype).clone()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.weight_dtype), self.packed_weight, self.bias, "none", [], "")
        return y.to(x.dtype)


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` does bf16 matrix products natively (CUDA with bf16, AVX512-BF16/AMX CPUs)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def prepare_for_sampling(model: DalleTransformer, weight_dtype: torch.dtype | None = None) -> DalleTransformer:
    """An inference-only copy of ``model`` made for fast sampling; ``model`` is left untouched.

    ``weight_dtype`` (default: bf16 where the device does bf16 natively, else the model's
    dtype) is the precision of the matrix weights.  On the CPU each linear layer becomes a
    :class:`PackedLinear` whose activations, attention and key/value cache stay in the
    model's dtype (fp32): only weights are rounded, as bf16 autocast does in training.
    On CUDA the whole copy is cast to ``weight_dtype``.  Measured on our 2-core CPU at
    8x8 tokens, batch 8: ~2.3x faster decoding than the plain fp32 model (~1.6x with
    fp32 weights).  The copy is for :func:`generate_images_tokens` only: it cannot be
    trained or saved.
    """
    param = next(model.parameters())
    if weight_dtype is None:
        weight_dtype = torch.bfloat16 if native_bf16(param.device) else param.dtype
    fast = copy.deepcopy(model).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    packable = (param.device.type == "cpu" and torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and (weight_dtype == torch.float32 or (weight_dtype == torch.bfloat16 and native_bf16("cpu"))))
    if packable:
        for module in list(fast.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, PackedLinear(child, weight_dtype))
    else:
        fast = fast.to(weight_dtype)
    fast.prepared_for_sampling = True
    return fast


def region_mask(grid: int, row: int, col: int) -> torch.Tensor:
    """Keep mask that regenerates the rectangle from token ``(row, col)`` to the bottom-right corner.

    Returns a ``[grid, grid]`` bool tensor, True = keep (every token outside the rectangle).
    """
    if not (0 <= row < grid and 0 <= col < grid):
        raise ValueError(f"region start ({row}, {col}) lies outside the {grid}x{grid} token grid; "
                         f"row and col must be in 0..{grid - 1}")
    keep = torch.ones(grid, grid, dtype=torch.bool)
    keep[row:, col:] = False
    return keep


def keep_rows_mask(grid: int, rows: int) -> torch.Tensor:
    """Keep mask that keeps the top ``rows`` token rows and regenerates the rest (True = keep)."""
    if not 0 <= rows < grid:
        raise ValueError(f"rows to keep must be in 0..{grid - 1} for a {grid}x{grid} token grid "
                         f"(at least one row must be regenerated), got {rows}")
    keep = torch.zeros(grid, grid, dtype=torch.bool)
    keep[:rows] = True
    return keep


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to ``-inf`` every logit outside the top-k and outside the nucleus of mass ``top_p``.

    The nucleus is the smallest set of most likely tokens whose probability sums to at
    least ``top_p``; the most likely token always survives.  ``logits``: ``[B, V]``.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``logits [B, V]``; ``temperature == 0`` picks the most likely token."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    probs = filter_logits(logits, top_k, top_p).softmax(dim=-1)
    # Inverse-CDF sampling: one uniform number per row (torch.multinomial draws one
    # exponential per vocabulary entry, ~10% of a small model's decoding step).
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def check_guidance(model: DalleTransformer, guidance: float) -> None:
    """ValueError unless ``model`` can be sampled with classifier-free guidance ``guidance``.

    A model trained without null captions never learned p(image) for the null caption, so its
    "unconditional" logits are meaningless: it is refused rather than guided into noise.
    """
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number (1 = no guidance), got {guidance!r}")
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0 (1 = no guidance, 0 = ignore the caption), got {guidance:g}")
    if guidance != 1 and getattr(model.config, "null_caption_fraction", 0.0) <= 0:
        raise ValueError(f"guidance {guidance:g} needs a transformer trained with null captions, and this one was "
                         "not (transformer.null_caption_fraction is 0): use guidance 1, or retrain with "
                         "--set transformer.null_caption_fraction=0.1")


def null_caption_ids(model: DalleTransformer, rows: int, device: torch.device | str) -> torch.Tensor:
    """``[rows, text_len]`` null captions: every text position holds its own padding id
    (what the tokenizer makes of the empty caption)."""
    ids = torch.arange(model.pad_start, model.config.text_vocab, device=device)
    return ids.expand(rows, -1)


def guided_logits(logits: torch.Tensor, guidance: float) -> torch.Tensor:
    """``[2B, V]`` logits, the captioned rows then their null-caption rows -> ``[B, V]``
    ``uncond + guidance * (cond - uncond)`` (in fp32)."""
    b = logits.shape[0] // 2
    cond, uncond = logits[:b].float(), logits[b:2 * b].float()
    return uncond + guidance * (cond - uncond)


def _draw(logits: torch.Tensor, guidance: float, temperature, top_k, top_p, generator) -> torch.Tensor:
    """Tokens for every row of ``logits``; guided, one token per candidate fed to both of its rows."""
    if guidance == 1:
        return sample_logits(logits, temperature, top_k, top_p, generator)
    return sample_logits(guided_logits(logits, guidance), temperature, top_k, top_p, generator).repeat(2)


def _check_args(model: DalleTransformer, text_ids, temperature, top_k, top_p, generator, known_tokens, keep_mask):
    cfg = model.config
    g = cfg.image_grid
    model.check_tokens(text_ids)
    device = next(model.parameters()).device
    if text_ids.device != device:
        raise ValueError(f"text_ids are on {text_ids.device} but the model is on {device}; move them with .to()")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"the generator is on {generator.device} but sampling runs on {device}; "
                         f"create it with torch.Generator(device={str(device)!r})")
    if keep_mask is None:
        if known_tokens is not None:
            raise ValueError("known_tokens given without keep_mask: say which tokens to keep "
                             "(see region_mask / keep_rows_mask)")
        return
    if keep_mask.dtype != torch.bool or tuple(keep_mask.shape) != (g, g):
        raise ValueError(f"keep_mask must be a bool tensor [{g}, {g}], got {keep_mask.dtype} {list(keep_mask.shape)}")
    if bool(keep_mask.any()):
        if known_tokens is None:
            raise ValueError("keep_mask keeps some tokens but known_tokens is None; pass the image's tokens")
        if tuple(known_tokens.shape) != (text_ids.shape[0], g, g) or known_tokens.dtype != torch.long:
            raise ValueError(f"known_tokens must be a long tensor [{text_ids.shape[0]}, {g}, {g}], "
                             f"got {known_tokens.dtype} {list(known_tokens.shape)}")
        kept = known_tokens[:, keep_mask.to(known_tokens.device)]
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= cfg.image_vocab):
            raise ValueError(f"kept image tokens must lie in [0, {cfg.image_vocab})")


def _cache_dtype(model: DalleTransformer, device: torch.device) -> torch.dtype:
    """The dtype keys/values come out in (autocast, packed bf16 weights...): asked of the first layer."""
    param = next(model.parameters())
    probe = torch.zeros(1, 1, model.config.d_model, device=device, dtype=param.dtype)
    return model.blocks[0].attn.qkv(probe).dtype


class StaticDecoder:
    """Image-token decoding whose every step has the same shapes, replayed as a CUDA graph on the GPU.

    At 32x32 image tokens a decoding step is a few hundred small kernels; launched one by
    one from Python the GPU mostly waits for the launches.  This decoder keeps one
    zero-initialised key/value cache ``[B, heads, S - 1, head_dim]`` per layer, feeds
    image token ``j`` at stream position ``text_len + j`` through
    :meth:`DalleTransformer.decode_static` (attention over the whole cache under each
    layer's mask row), and on CUDA captures that step once as a CUDA graph, so a step
    is one graph launch.  Each step reads every cached key, not only the allowed ones, which costs
    memory traffic on a sparse layer but keeps the shapes fixed.

    Usage (the caller samples; ``model`` in eval mode, e.g. a ``prepare_for_sampling`` copy)::

        decoder = StaticDecoder(model, batch=32)
        logits = decoder.prefill(text_ids)             # predicts image token 0
        for j in range(grid * grid - 1):
            tokens[:, j] = sample(logits)
            logits = decoder.step(tokens[:, j], j)     # predicts image token j + 1
        tokens[:, -1] = sample(logits)

    The returned logits live in a buffer the next ``step`` overwrites: copy them to keep them.
    :func:`generate_images_tokens` drives it (``decoder="auto"`` on CUDA), with completion
    and padded batches; :func:`static_decoder_for` makes one to reuse.
    """

    @torch.inference_mode()
    def __init__(self, model: DalleTransformer, batch: int, cuda_graph: bool | None = None, warmup: int = 2):
        if model.training:
            raise ValueError("StaticDecoder needs the model in eval mode (model.eval())")
        self.model = model
        cfg = model.config
        param = next(model.parameters())
        self.device, self.batch = param.device, batch
        self.dtype = _cache_dtype(model, self.device)
        length = cfg.seq_len - 1
        self.cache: KVCache = model.new_cache(batch, self.device, self.dtype, zeros=True)
        # Mask rows of every layer kind (True = may attend), indexed by the fed token's position.
        self.tables = {kind: build_mask(kind, cfg.text_len, cfg.image_grid, cfg.conv_kernel, self.device)[:length, :length]
                       for kind in set(model.kinds)}
        self.positions = model.image_positions().to(self.dtype if self.dtype.is_floating_point else param.dtype)
        self.token = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.position = torch.full((1,), cfg.text_len, dtype=torch.long, device=self.device)
        self.graph = None
        self.logits: torch.Tensor | None = None
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph:
            if self.device.type != "cuda":
                raise ValueError("cuda_graph=True needs the model on a CUDA device")
            # Warm up on a side stream (lazy initialisations must not be captured), then capture.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self._step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (e.g. a compiler's) do not break the capture.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.logits = self._step()
            for k, v in self.cache:  # the warm-up wrote image position 0; start clean
                k.zero_()
                v.zero_()

    def _step(self) -> torch.Tensor:
        return self.model.decode_static(self.token, self.position, self.cache, self.tables, self.positions)

    @torch.inference_mode()
    def prefill(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Run the text (an ordinary batched pass into the cache); returns logits ``[B, image_vocab]`` of image token 0."""
        if tuple(text_ids.shape) != (self.batch, self.model.config.text_len):
            raise ValueError(f"text_ids must be [{self.batch}, {self.model.config.text_len}] for this decoder, "
                             f"got {list(text_ids.shape)}")
        self.model.check_tokens(text_ids)
        h = self.model.hidden_states(self.model.embed_text(text_ids.to(self.device)), 0, self.cache)
        return self.model.image_head(h[:, -1])

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, j: int) -> torch.Tensor:
        """Feed image token ``j`` (``tokens [B]``); returns logits ``[B, image_vocab]`` of image token ``j + 1``."""
        n = self.model.config.image_len
        if not 0 <= j < n - 1:
            raise ValueError(f"image token index must be in [0, {n - 1}) (the last token is never fed), got {j}")
        self.token.copy_(tokens)
        self.position.fill_(self.model.config.text_len + j)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        assert self.logits is not None
        return self.logits


def use_static_decoder(decoder: str | StaticDecoder, device: torch.device | str) -> bool:
    """Whether ``decoder`` (see :func:`generate_images_tokens`) decodes with a :class:`StaticDecoder` on ``device``."""
    if isinstance(decoder, StaticDecoder):
        return True
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS} or a StaticDecoder, got {decoder!r}")
    return decoder == "static" or (decoder == "auto" and torch.device(device).type == "cuda")


def static_decoder_for(model: DalleTransformer, batch: int, decoder: str = "auto") -> StaticDecoder | None:
    """The :class:`StaticDecoder` that ``decoder`` asks for on ``model``'s device, or None for the cached loop.

    Build it once and pass it to :func:`generate_images_tokens` for every batch of up to
    ``batch`` rows, so that its CUDA graph is captured once.  With ``"auto"`` a decoder that
    cannot be built (a CUDA graph capture that fails) warns and gives None: the cached
    loop is slower on a GPU but does the same.
    """
    if not use_static_decoder(decoder, next(model.parameters()).device):
        return None
    was_training = model.training
    model.eval()
    try:
        return StaticDecoder(model, batch)
    except Exception as e:  # noqa: BLE001 - "auto" only asked for speed
        if decoder != "auto":
            raise
        warnings.warn(f"StaticDecoder unavailable ({type(e).__name__}: {str(e)[:300]}); "
                      "sampling with the cached loop", stacklevel=2)
        return None
    finally:
        model.train(was_training)


def generate_images_tokens(
    model: DalleTransformer,
    text_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    known_tokens: torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
    decoder: str | StaticDecoder = "auto",
    guidance: float = 1.0,
) -> torch.Tensor:
    """Sample the image tokens for each row of ``text_ids [B, text_len]``; returns ``[B, grid, grid]``.

    Rows of ``text_ids`` may repeat (candidates of one prompt).  With ``keep_mask``
    (``[grid, grid]`` bool, True = keep) the tokens it marks are copied from
    ``known_tokens [B, grid, grid]`` and the others are sampled in raster order,
    conditioned on everything before them.  Pass a ``torch.Generator`` for
    reproducible samples, and for speed on the CPU a :func:`prepare_for_sampling` copy
    of the model (made once, reused for every call).

    ``decoder`` chooses how each token is computed (same tokens, different speed):
    ``"cached"``, the key/value-cache loop that reads only each layer's allowed keys (the
    fast CPU path); ``"static"``, a :class:`StaticDecoder` (fixed shapes, one CUDA graph a
    step on a GPU, eager elsewhere); ``"auto"`` (default), static on CUDA, cached elsewhere.
    A ``StaticDecoder`` made for ``model`` (see :func:`static_decoder_for`) may be passed
    to reuse its captured graph across calls; its batch may exceed ``B`` (the rows
    beyond ``B`` are padding whose tokens are never sampled).

    ``guidance`` (default 1, none) is the classifier-free guidance scale (see the module
    docstring); other than 1 it needs a model trained with null captions, and runs ``2B``
    rows (a ``StaticDecoder`` passed in must hold them).
    """
    _check_args(model, text_ids, temperature, top_k, top_p, generator, known_tokens, keep_mask)
    check_guidance(model, guidance)
    b = text_ids.shape[0]
    if guidance != 1:  # the null caption's stream rides in the same batch
        text_ids = torch.cat([text_ids, null_caption_ids(model, b, text_ids.device)])
        if known_tokens is not None:
            known_tokens = torch.cat([known_tokens, known_tokens])
    if isinstance(decoder, StaticDecoder):
        if decoder.model is not model:
            raise ValueError("this StaticDecoder was made for another model; make one with "
                             "static_decoder_for(model, batch) or pass decoder='static'")
        if decoder.batch < text_ids.shape[0]:
            raise ValueError(f"the StaticDecoder holds {decoder.batch} rows but text_ids has {text_ids.shape[0]}; "
                             "make one with a larger batch or split the rows")
        static = decoder
    else:
        static = static_decoder_for(model, text_ids.shape[0], decoder)
    was_training = model.training
    model.eval()
    try:
        if static is None:
            tokens = _generate(model, text_ids, temperature, top_k, top_p, generator, known_tokens, keep_mask,
                               guidance)
        else:
            tokens = _generate_static(static, text_ids, temperature, top_k, top_p, generator, known_tokens, keep_mask,
                                      guidance)
    finally:
        model.train(was_training)
    # Cloned outside inference mode so callers may use the result in autograd (e.g. a loss).
    return tokens[:b].clone()


def _kept(keep_mask: torch.Tensor | None, n: int) -> torch.Tensor:
    """``[n]`` bool on the CPU, True = keep: the raster-order keep mask."""
    return torch.zeros(n, dtype=torch.bool) if keep_mask is None else keep_mask.detach().flatten().cpu()


def _prefill(
    model: DalleTransformer, text_ids: torch.Tensor, tokens: torch.Tensor, first: int, cache: KVCache,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Run the text and the image tokens before ``first`` into ``cache``; returns image token ``first``'s logits."""
    t = model.config.text_len
    b = text_ids.shape[0]
    unique, inverse = torch.unique(text_ids, dim=0, return_inverse=True)
    if unique.shape[0] < b:
        # Repeated prompts: run each distinct text once, copy its keys/values to its candidates,
        # then the image prefix (which may differ between candidates) in one more pass.
        k0 = cache[0][0]
        text_cache = model.new_cache(unique.shape[0], k0.device, k0.dtype, length=t)
        h = model.hidden_states(model.embed_text(unique), 0, text_cache)[:, -1][inverse]
        for (k, v), (tk, tv) in zip(cache, text_cache):
            k[:, :, :t].copy_(tk[inverse])
            v[:, :, :t].copy_(tv[inverse])
        if first > 0:
            h = model.hidden_states(model.embed_image(tokens[:, :first], 0, positions), t, cache)[:, -1]
    else:
        x = model.embed_text(text_ids)
        if first > 0:
            x = torch.cat([x, model.embed_image(tokens[:, :first], 0, positions)], dim=1)
        h = model.hidden_states(x, 0, cache)[:, -1]
    return model.image_head(h)


@torch.inference_mode()
def _generate(model, text_ids, temperature, top_k, top_p, generator, known_tokens, keep_mask,
              guidance: float = 1.0) -> torch.Tensor:
    cfg = model.config
    t, g = cfg.text_len, cfg.image_grid
    n = g * g
    b = text_ids.shape[0]
    device = text_ids.device

    keep = _kept(keep_mask, n)
    tokens = torch.zeros(b, n, dtype=torch.long, device=device)
    if known_tokens is not None:
        tokens.copy_(known_tokens.flatten(1))
    if bool(keep.all()):
        return tokens.view(b, g, g).clone()
    # next_sampled[j]: the first index after j that must be sampled (n if none).
    sampled = (~keep).nonzero().flatten().tolist()
    next_sampled = [n] * n
    for a, c in zip(sampled, sampled[1:]):
        next_sampled[a] = c
    first = sampled[0]

    cache = model.new_cache(b, device, _cache_dtype(model, device))
    positions = model.image_positions()
    # 1. Prefill the text and the kept image prefix before the first sampled token.
    logits = _prefill(model, text_ids, tokens, first, cache, positions)

    # 2. Sample in raster order; feed each sampled token together with the kept run after it.
    # A sparse layer reads only its allowed keys: at 32x32 a row layer's 289 (256 text + 33 image)
    # instead of up to 1279.
    keys = {kind: allowed_keys(kind, t, g, cfg.conv_kernel, device) for kind in set(model.kinds) if kind != "full"}
    # Where a sparse row allows every key so far (a conv kernel as wide as the grid, the first
    # image tokens of a row window) gathering them is pure copying: read the cache like a full layer.
    one_step = {kind: [MaskArgs() if len(index[p]) == p + 1 else MaskArgs(keys=index[p]) for p in range(len(index))]
                for kind, index in keys.items()}
    one_step["full"] = [MaskArgs()] * (t + n)
    j = first
    while True:
        tokens[:, j] = _draw(logits, guidance, temperature, top_k, top_p, generator)
        nxt = next_sampled[j]
        if nxt >= n:
            break  # everything after j is kept (or j was the last token)
        p = t + j  # stream position of image token j
        if nxt == j + 1:
            masks = {kind: rows[p] for kind, rows in one_step.items()}
        else:
            masks = model.mask_args(p, nxt - j, device)
        x = model.embed_image(tokens[:, j:nxt], j, positions)
        h = model.hidden_states(x, p, cache, masks)[:, -1]
        logits = model.image_head(h)
        j = nxt
    return tokens.view(b, g, g)


@torch.inference_mode()
def _generate_static(
    decoder: StaticDecoder, text_ids, temperature, top_k, top_p, generator, known_tokens, keep_mask,
    guidance: float = 1.0,
) -> torch.Tensor:
    """:func:`_generate` through a :class:`StaticDecoder`: one fixed-shape step per image token.

    Same prefill, same sampled positions in the same order, same random draws (only the
    ``B`` real rows are sampled, so padding rows draw nothing); kept tokens after the
    first sampled one are fed one step each rather than in runs.
    """
    model = decoder.model
    g = model.config.image_grid
    n = g * g
    b, rows = text_ids.shape[0], decoder.batch
    keep = _kept(keep_mask, n)
    tokens = torch.zeros(rows, n, dtype=torch.long, device=decoder.device)
    if known_tokens is not None:
        tokens[:b].copy_(known_tokens.flatten(1))
    if bool(keep.all()):
        return tokens[:b].view(b, g, g).clone()
    if rows > b:  # padding: copies of the first row (a repeated prompt adds no text prefill)
        text_ids = torch.cat([text_ids, text_ids[:1].expand(rows - b, -1)])
        tokens[b:] = tokens[:1]
    sample_here = (~keep).tolist()
    sampled = (~keep).nonzero().flatten().tolist()
    first, last = sampled[0], sampled[-1]
    # Written into the decoder's own cache, which its graph reads.  Beyond the prefix it holds
    # the previous call's (finite) keys and values, which its masks give weight zero.
    logits = _prefill(model, text_ids, tokens, first, decoder.cache, model.image_positions())
    for j in range(first, last + 1):
        if sample_here[j]:
            tokens[:b, j] = _draw(logits[:b], guidance, temperature, top_k, top_p, generator)
        if j == last:
            break  # everything after the last sampled token is kept
        logits = decoder.step(tokens[:, j], j)
    return tokens[:b].view(b, g, g)
