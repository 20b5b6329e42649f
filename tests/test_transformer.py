"""The DALL-E transformer: shapes, causality, sparse masks in effect, the loss, counting, saving."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from dalle.config import ConfigError, TransformerConfig, get_preset
from dalle.transformer import DalleTransformer

TEXT_LEN, GRID, TEXT_VOCAB, IMAGE_VOCAB = 6, 4, 30, 20  # ids >= 24 are the 6 per-position pads


def tiny_config(**overrides) -> TransformerConfig:
    base = dict(n_layers=4, n_heads=2, head_dim=8, text_vocab=TEXT_VOCAB, text_len=TEXT_LEN,
                image_vocab=IMAGE_VOCAB, image_grid=GRID, attention="sparse", conv_kernel=3)
    base.update(overrides)
    return TransformerConfig(**base)


def random_batch(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, TEXT_VOCAB - TEXT_LEN, (b, TEXT_LEN), generator=g)
    text[:, 4:] = torch.arange(TEXT_VOCAB - TEXT_LEN + 4, TEXT_VOCAB)  # the caption ends: pads
    images = torch.randint(0, IMAGE_VOCAB, (b, GRID, GRID), generator=g)
    return text, images


def model_for(config: TransformerConfig, seed: int = 0) -> DalleTransformer:
    torch.manual_seed(seed)
    return DalleTransformer(config).eval()


def test_forward_shapes_and_schedule():
    model = model_for(tiny_config())
    text, images = random_batch()
    text_logits, image_logits = model(text, images)
    assert text_logits.shape == (3, TEXT_LEN - 1, TEXT_VOCAB)
    assert image_logits.shape == (3, GRID * GRID, IMAGE_VOCAB)
    assert [b.attn.kind for b in model.blocks] == ["row", "row", "column", "conv"]


@pytest.mark.parametrize("attention", ["full", "sparse"])
def test_predictions_never_depend_on_later_tokens(attention):
    model = model_for(tiny_config(attention=attention))
    text, images = random_batch()
    _, base = model(text, images)
    for j in (0, 5, 15):
        changed = images.clone().flatten(1)
        changed[:, j] = (changed[:, j] + 1) % IMAGE_VOCAB
        _, out = model(text, changed.view_as(images))
        # Logits at index i predict image token i: they may depend on tokens < i only.
        assert torch.allclose(out[:, : j + 1], base[:, : j + 1], atol=1e-6)
        if j < 15:
            assert not torch.allclose(out[:, j + 1 :], base[:, j + 1 :], atol=1e-6)


def test_every_image_prediction_depends_on_the_text():
    model = model_for(tiny_config())
    text, images = random_batch()
    _, base = model(text, images)
    changed = text.clone()
    changed[:, 0] = (changed[:, 0] + 1) % (TEXT_VOCAB - TEXT_LEN)
    _, out = model(changed, images)
    assert ((out - base).abs().amax(dim=-1) > 1e-6).all()


def test_one_conv_layer_sees_only_its_causal_neighbourhood():
    # A one-layer sparse model is a single conv layer (3x3 kernel): the prediction of
    # token j+1 reads from position j = (r, c) only its causal 3x3 half-window.
    model = model_for(tiny_config(n_layers=1))
    assert model.kinds == ["conv"]
    text, images = random_batch(b=1)
    _, base = model(text, images)
    query = 2 * GRID + 2  # position of token (2, 2) predicts token index 11
    for key in range(query + 1):
        changed = images.clone().flatten(1)
        changed[:, key] = (changed[:, key] + 1) % IMAGE_VOCAB
        _, out = model(text, changed.view_as(images))
        (rq, cq), (rk, ck) = divmod(query, GRID), divmod(key, GRID)
        visible = abs(rq - rk) <= 1 and abs(cq - ck) <= 1
        moved = not torch.allclose(out[:, query + 1], base[:, query + 1], atol=1e-6)
        assert moved == visible, (key, visible)


def test_loss_is_the_weighted_mean_of_text_and_image_cross_entropies_without_pads():
    model = model_for(tiny_config())
    text, images = random_batch()
    loss, parts = model.loss(text, images)
    text_logits, image_logits = model(text, images)
    # Targets are text tokens 1..5; tokens 4 and 5 are pads and do not count.
    expected_text = F.cross_entropy(text_logits[:, :3].reshape(-1, TEXT_VOCAB), text[:, 1:4].reshape(-1))
    expected_image = F.cross_entropy(image_logits.reshape(-1, IMAGE_VOCAB), images.reshape(-1))
    assert torch.allclose(parts["text_loss"], expected_text, atol=1e-6)
    assert torch.allclose(parts["image_loss"], expected_image, atol=1e-6)
    assert torch.allclose(loss, expected_text / 8 + expected_image * 7 / 8, atol=1e-6)
    # A batch of captions that are all padding has a zero text term, not NaN.
    pads_only = torch.arange(TEXT_VOCAB - TEXT_LEN, TEXT_VOCAB).expand(3, TEXT_LEN)
    loss, parts = model.loss(pads_only, images)
    assert parts["text_loss"] == 0 and torch.isfinite(loss)


def test_loss_weights_come_from_the_config():
    model = model_for(tiny_config(text_loss_weight=0.0, image_loss_weight=1.0))
    text, images = random_batch()
    loss, parts = model.loss(text, images)
    assert torch.allclose(loss, parts["image_loss"])


def test_activation_checkpointing_gives_the_same_gradients():
    text, images = random_batch()
    grads = []
    for flag in (False, True):
        model = model_for(tiny_config()).train()
        model.gradient_checkpointing = flag
        model.loss(text, images)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_paper_model_counts_12_billion_parameters_on_the_meta_device():
    model = DalleTransformer.on_meta(get_preset("paper").transformer)
    assert all(p.is_meta for p in model.parameters())
    non_embedding = model.count_parameters(non_embedding=True)
    total = model.count_parameters()
    assert abs(non_embedding - 12e9) / 12e9 < 0.01, non_embedding
    d, layers = 3968, 64
    assert non_embedding == layers * (12 * d * d + 13 * d) + 2 * d  # blocks (with biases, norms) + final norm
    embeddings = (16384 + 256) * d * 2 + 8192 * d * 2 + 256 * d + 2 * 32 * d  # tables, positions, heads
    assert total == non_embedding + embeddings
    assert math.isclose(total / 1e9, 12.29, abs_tol=0.01)


def test_save_and_load_round_trip(tmp_path):
    model = model_for(tiny_config())
    model.save_pretrained(tmp_path / "transformer")
    loaded = DalleTransformer.from_pretrained(tmp_path / "transformer")
    assert loaded.config == model.config
    text, images = random_batch()
    for a, b in zip(model(text, images), loaded(text, images)):
        assert torch.equal(a, b)


def test_bad_inputs_and_configs_raise_clear_errors():
    model = model_for(tiny_config())
    text, images = random_batch()
    with pytest.raises(ValueError, match=r"text_ids must be \[B, 6\]"):
        model(text[:, :5], images)
    with pytest.raises(ValueError, match="image_ids must be"):
        model(text, images[:, :3])
    with pytest.raises(ValueError, match="image ids must lie in"):
        model(text, images + IMAGE_VOCAB)
    with pytest.raises(ValueError, match="text ids must lie in"):
        model(text - 100, images)
    with pytest.raises(ValueError, match="int64"):
        model(text.int(), images)
    with pytest.raises(ConfigError, match="conv_kernel"):
        DalleTransformer(tiny_config(conv_kernel=4))
    with pytest.raises(ConfigError, match="attention"):
        DalleTransformer(tiny_config(attention="dense"))
    with pytest.raises(ConfigError, match="attention_impl must be one of"):
        DalleTransformer(tiny_config(attention_impl="triton"))
    with pytest.raises(ConfigError, match="no attention dropout"):
        DalleTransformer(tiny_config(attention_impl="flex", dropout=0.1))


def test_dropout_acts_in_training_only():
    model = model_for(tiny_config(dropout=0.2))
    text, images = random_batch()
    assert torch.equal(model(text, images)[1], model(text, images)[1])
    model.train()
    assert not torch.equal(model(text, images)[1], model(text, images)[1])


def test_parts_of_a_batch_add_up_to_the_whole_batch_loss():
    """Micro-batches (or ranks) normalised by the whole batch's counts sum to the whole loss and gradient."""
    model = model_for(tiny_config()).train()
    text, images = random_batch(4)
    text[2:, 2:] = torch.arange(TEXT_VOCAB - TEXT_LEN + 2, TEXT_VOCAB)  # shorter captions in the second half
    whole, whole_parts = model.loss(text, images)
    whole.backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    real = (text[:, 1:] < TEXT_VOCAB - TEXT_LEN).sum()
    total = 0.0
    for half in (slice(0, 2), slice(2, 4)):
        loss, _ = model.loss(text[half], images[half], text_tokens=real, image_tokens=float(images.numel()))
        loss.backward()
        total = total + loss.detach()
    assert torch.allclose(total, whole, atol=1e-6)
    assert torch.allclose(torch.cat([p.grad.flatten() for p in model.parameters()]), expected, atol=1e-6)
    assert whole_parts["text_loss"] > 0


def test_flex_attention_gives_the_dense_results():
    """FlexAttention block masks (column layers in column-major order) against dense masked SDPA.

    On the CPU PyTorch runs FlexAttention unfused and forward only; the sequence spans two
    128-token tiles so the block structure is exercised."""
    pytest.importorskip("torch.nn.attention.flex_attention", reason="this PyTorch has no FlexAttention")
    config = tiny_config(text_len=16, image_grid=12, text_vocab=40, attention="sparse", n_layers=4)
    dense = model_for(dataclasses.replace(config, attention_impl="dense"))
    flexed = model_for(dataclasses.replace(config, attention_impl="flex"))
    assert dense.kinds == ["row", "row", "column", "conv"]
    assert flexed.use_flex("cpu") and not dense.use_flex("cpu")
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, 24, (2, 16), generator=g)
    images = torch.randint(0, IMAGE_VOCAB, (2, 12, 12), generator=g)
    with torch.no_grad():
        for a, b in zip(dense(text, images), flexed(text, images)):
            assert torch.allclose(a, b, atol=2e-5), float((a - b).abs().max())
    with pytest.raises(RuntimeError, match="cannot train on the CPU"):
        flexed.train().loss(text, images)[0].backward()


def test_auto_attention_is_dense_on_the_cpu_and_flex_masks_are_for_sparse_layers_only():
    pytest.importorskip("torch.nn.attention.flex_attention", reason="this PyTorch has no FlexAttention")
    model = model_for(tiny_config(attention_impl="auto"))
    assert not model.use_flex("cpu")
    cpu = torch.device("cpu")
    assert all(m.flex is None for m in model.mask_args(0, 21, cpu).values())
    masks = model.mask_args(0, 21, cpu, flex=True)
    assert all(masks[k].flex is not None for k in ("row", "column", "conv"))
    assert masks["column"].flex.order is not None and masks["row"].flex.order is None
    full = model_for(tiny_config(attention="full", attention_impl="flex"))
    assert not full.use_flex("cpu")  # full layers keep SDPA's causal kernel
    assert masks_without_flex(full.mask_args(0, 21, cpu, flex=True))


def masks_without_flex(masks) -> bool:
    return all(m.flex is None for m in masks.values())


@pytest.mark.parametrize("attention", ["full", "sparse"])
def test_static_decoder_steps_give_the_training_logits(attention):
    """The fixed-shape decoding step (CUDA-graph ready) predicts what the whole-sequence pass predicts."""
    from dalle.sampling import StaticDecoder

    model = model_for(tiny_config(attention=attention))
    text, images = random_batch(3)
    with torch.no_grad():
        expected = model(text, images)[1]
    decoder = StaticDecoder(model, batch=3)
    assert decoder.graph is None  # CUDA graphs only on the GPU
    got = [decoder.prefill(text).clone()]
    flat = images.flatten(1)
    for j in range(GRID * GRID - 1):
        got.append(decoder.step(flat[:, j], j).clone())
    assert torch.allclose(torch.stack(got, dim=1), expected, atol=1e-5)
    with pytest.raises(ValueError, match="image token index"):
        decoder.step(flat[:, 0], GRID * GRID - 1)
    with pytest.raises(ValueError, match="eval mode"):
        StaticDecoder(model.train(), batch=3)


def test_permute_tokens_equals_index_select_in_values_and_gradients():
    """The column layers' reordering: same numbers as index_select, backward by a gather (no atomics)."""
    from dalle.attention_masks import column_major_order
    from dalle.transformer import permute_tokens

    g = torch.Generator().manual_seed(0)
    # The column-major order of a square grid is its own inverse; a random permutation is not,
    # so it also tells order from inverse.
    order = torch.randperm(TEXT_LEN + GRID * GRID - 1, generator=g)
    inverse = torch.argsort(order)
    assert not torch.equal(order, inverse)
    columns = column_major_order(TEXT_LEN, GRID, len(order))
    base = torch.randn(2, 3, len(order), 5, generator=g, requires_grad=True)
    heads_merged = base.transpose(1, 2)  # [B, L, H, D], a strided view: how the layer's output comes
    layer_input = base.detach().transpose(1, 2).reshape(2, len(order), 15).requires_grad_()
    for x, leaf, perm, inv in [(heads_merged, base, order, inverse), (heads_merged, base, inverse, order),
                               (layer_input, layer_input, order, inverse),
                               (layer_input, layer_input, columns, torch.argsort(columns))]:
        ours, theirs = permute_tokens(x, perm, inv), x.index_select(1, perm)
        assert torch.equal(ours, theirs) and ours.is_contiguous()
        upstream = torch.randn(ours.shape, generator=g)
        (grad_ours,) = torch.autograd.grad(ours, leaf, upstream)
        (grad_theirs,) = torch.autograd.grad(theirs, leaf, upstream)
        assert torch.equal(grad_ours, grad_theirs)
    with torch.no_grad():
        assert torch.equal(permute_tokens(heads_merged, order, inverse), heads_merged.index_select(1, order))
    # Twice differentiable, like index_select.
    x = torch.randn(2, len(order), 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: permute_tokens(x, order, inverse) ** 2, (x,))


def test_tuned_flex_kernel_options_reach_flex_attention_and_leave_the_results_alone(monkeypatch):
    """FLEX_TUNING's mask tiles and kernel options per layer kind go through ``flex_attend`` to PyTorch.

    On the CPU the unfused reference ignores kernel options, so the model must still give the
    dense results, now with 32- and 16-wide mask tiles (several tiles per row at 159 tokens)."""
    flex_module = pytest.importorskip("torch.nn.attention.flex_attention", reason="this PyTorch has no FlexAttention")
    from dalle import attention_masks

    row_options = {"fwd_BLOCK_M": 32, "fwd_BLOCK_N": 32, "fwd_num_warps": 4, "bwd_BLOCK_M1": 16,
                   "bwd_BLOCK_N1": 32, "bwd_BLOCK_M2": 32, "bwd_BLOCK_N2": 16}
    column_options = {"fwd_BLOCK_M": 32, "fwd_BLOCK_N": 16, "bwd_BLOCK_M1": 16, "bwd_BLOCK_N1": 16,
                      "bwd_BLOCK_M2": 32, "bwd_BLOCK_N2": 16}
    table = {"cpu": {"row": {"block_size": 32, "kernel_options": row_options},
                     "column": {"block_size": [32, 16], "kernel_options": column_options}}}
    for entry in table["cpu"].values():
        attention_masks.check_kernel_options(entry["kernel_options"], entry["block_size"])
    monkeypatch.setattr(attention_masks, "FLEX_TUNING", table)
    calls = []
    original = flex_module.flex_attention

    def recording(q, k, v, *args, block_mask=None, kernel_options=None, **kwargs):
        calls.append((tuple(block_mask.BLOCK_SIZE), kernel_options))
        return original(q, k, v, *args, block_mask=block_mask, kernel_options=kernel_options, **kwargs)

    monkeypatch.setattr(flex_module, "flex_attention", recording)
    config = tiny_config(text_len=16, image_grid=12, text_vocab=40, attention="sparse", n_layers=4)
    dense = model_for(dataclasses.replace(config, attention_impl="dense"))
    flexed = model_for(dataclasses.replace(config, attention_impl="flex"))
    assert flexed.kinds == ["row", "row", "column", "conv"]
    g = torch.Generator().manual_seed(2)
    text = torch.randint(0, 24, (2, 16), generator=g)
    images = torch.randint(0, IMAGE_VOCAB, (2, 12, 12), generator=g)
    with torch.no_grad():
        for a, b in zip(dense(text, images), flexed(text, images)):
            assert torch.allclose(a, b, atol=2e-5), float((a - b).abs().max())
    assert calls == [((32, 32), row_options), ((32, 32), row_options), ((32, 16), column_options),
                     ((128, 128), None)]  # conv: not in the table, PyTorch's defaults
    assert all(options is not row_options for _, options in calls)  # PyTorch gets a copy, never the table
