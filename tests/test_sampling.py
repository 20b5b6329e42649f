"""KV-cached sampling: it matches the uncached model for every mask kind, completes images, filters logits."""

from __future__ import annotations

import pytest
import torch

from dalle.attention_masks import MASK_KINDS
from dalle.config import TransformerConfig
from dalle.sampling import (
    filter_logits, generate_images_tokens, keep_rows_mask, prepare_for_sampling, region_mask, sample_logits,
)
from dalle.transformer import DalleTransformer

TEXT_LEN, GRID, TEXT_VOCAB, IMAGE_VOCAB = 5, 4, 25, 20


def make_model(kind: str | None = None, n_layers: int = 4, seed: int = 0) -> DalleTransformer:
    """A tiny model; ``kind`` forces every layer to that mask kind (None: the paper's schedule)."""
    config = TransformerConfig(n_layers=n_layers, n_heads=2, head_dim=8, text_vocab=TEXT_VOCAB, text_len=TEXT_LEN,
                               image_vocab=IMAGE_VOCAB, image_grid=GRID, conv_kernel=3,
                               attention="full" if kind == "full" else "sparse")
    torch.manual_seed(seed)
    model = DalleTransformer(config).eval()
    if kind is not None:
        model.kinds = [kind] * n_layers
        for block in model.blocks:
            block.attn.kind = kind
    # Larger weights than the initialisation's make logits far from uniform, so a wrong
    # mask or cache entry shows up clearly and greedy choices have clear winners.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return model


def random_text(b: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TEXT_VOCAB, (b, TEXT_LEN), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", [*MASK_KINDS, None])
def test_cached_step_by_step_logits_equal_the_full_forward(kind):
    model = make_model(kind)
    text = random_text(3)
    images = torch.randint(0, IMAGE_VOCAB, (3, GRID, GRID), generator=torch.Generator().manual_seed(2))
    _, full = model(text, images)
    with torch.no_grad():
        cache = model.new_cache(3, "cpu", torch.float32)
        h = model.hidden_states(model.embed_text(text), 0, cache)
        steps = [model.image_head(h[:, -1])]
        flat = images.flatten(1)
        for j in range(GRID * GRID - 1):
            h = model.hidden_states(model.embed_image(flat[:, j : j + 1], j), TEXT_LEN + j, cache)
            steps.append(model.image_head(h[:, -1]))
    assert torch.allclose(torch.stack(steps, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", [*MASK_KINDS, None])
def test_greedy_generation_picks_the_argmax_of_the_uncached_model(kind):
    # End to end through the sampler (prefill, cache, multi-token chunks): every greedy
    # token must be the most likely one under a plain full forward pass of the result.
    model = make_model(kind)
    text = random_text(4)
    tokens = generate_images_tokens(model, text, temperature=0)
    _, logits = model(text, tokens)
    assert torch.equal(logits.argmax(dim=-1), tokens.flatten(1))
    # Completion: the kept tokens are fed in chunks, the rest greedily chosen.
    known = torch.randint(0, IMAGE_VOCAB, (4, GRID, GRID), generator=torch.Generator().manual_seed(3))
    keep = region_mask(GRID, 1, 2)
    completed = generate_images_tokens(model, text, temperature=0, known_tokens=known, keep_mask=keep)
    assert torch.equal(completed[:, keep], known[:, keep])
    _, logits = model(text, completed)
    assert torch.equal(logits.argmax(dim=-1)[:, ~keep.flatten()], completed.flatten(1)[:, ~keep.flatten()])


def test_repeated_prompts_give_the_same_samples_as_separate_prompts():
    # Repeated prompts share one text prefill: the result must not depend on it.
    model = make_model()
    a, b = random_text(2).unbind()
    together = generate_images_tokens(model, torch.stack([a, b, a, a]), temperature=0)
    assert torch.equal(together[0], together[2]) and torch.equal(together[0], together[3])
    assert torch.equal(together[1], generate_images_tokens(model, b[None], temperature=0)[0])
    assert torch.equal(together[0], generate_images_tokens(model, a[None], temperature=0)[0])
    # Completion with repeated prompts but different kept images per candidate.
    known = torch.randint(0, IMAGE_VOCAB, (3, GRID, GRID), generator=torch.Generator().manual_seed(5))
    keep = keep_rows_mask(GRID, 1)
    shared = generate_images_tokens(model, torch.stack([a, a, b]), temperature=0, known_tokens=known, keep_mask=keep)
    for i, prompt in enumerate([a, a, b]):
        alone = generate_images_tokens(model, prompt[None], temperature=0, known_tokens=known[i : i + 1],
                                       keep_mask=keep)
        assert torch.equal(shared[i], alone[0])


def test_sampling_is_reproducible_with_a_seed_and_varies_without():
    model = make_model()
    text = random_text(1).expand(6, TEXT_LEN)
    one = generate_images_tokens(model, text, generator=torch.Generator().manual_seed(7), temperature=1.5)
    two = generate_images_tokens(model, text, generator=torch.Generator().manual_seed(7), temperature=1.5)
    other = generate_images_tokens(model, text, generator=torch.Generator().manual_seed(8), temperature=1.5)
    assert one.shape == (6, GRID, GRID) and one.dtype == torch.long
    assert torch.equal(one, two)
    assert not torch.equal(one, other)
    assert len({tuple(row.flatten().tolist()) for row in one}) > 1  # candidates differ from each other


@pytest.mark.parametrize("keep", [keep_rows_mask(GRID, 2), region_mask(GRID, 2, 1), region_mask(GRID, 0, 3),
                                  region_mask(GRID, 3, 3), keep_rows_mask(GRID, 0)])
def test_completion_keeps_the_kept_tokens_exactly(keep):
    model = make_model()
    text = random_text(3)
    known = torch.randint(0, IMAGE_VOCAB, (3, GRID, GRID), generator=torch.Generator().manual_seed(4))
    out = generate_images_tokens(model, text, known_tokens=known, keep_mask=keep,
                                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, keep], known[:, keep])
    again = generate_images_tokens(model, text, known_tokens=known, keep_mask=keep,
                                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert known.equal(torch.randint(0, IMAGE_VOCAB, (3, GRID, GRID), generator=torch.Generator().manual_seed(4)))


def test_keep_masks():
    assert keep_rows_mask(4, 1).tolist() == [[True] * 4] + [[False] * 4] * 3
    r = region_mask(4, 2, 1)
    assert r.sum() == 16 - 2 * 3 and not r[2:, 1:].any() and r[:2].all() and r[:, 0].all()
    with pytest.raises(ValueError, match="outside the 4x4 token grid"):
        region_mask(4, 4, 0)
    with pytest.raises(ValueError, match="outside"):
        region_mask(4, 0, -1)
    with pytest.raises(ValueError, match="rows to keep"):
        keep_rows_mask(4, 4)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 2.0, 1.0, 3.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False], [False, False, True, False, True]]
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])
    assert torch.equal(filter_logits(logits, top_k=10), logits)


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([[0.5, 0.1, 0.25, 0.15]])
    logits = probs.log()
    keep = lambda p: torch.isfinite(filter_logits(logits, top_p=p)).tolist()[0]  # noqa: E731
    assert keep(0.5) == [True, False, False, False]  # the top token alone holds 0.5
    assert keep(0.6) == [True, False, True, False]  # 0.5 + 0.25
    assert keep(0.75) == [True, False, True, False]  # exactly reached
    assert keep(0.8) == [True, False, True, True]
    assert keep(1.0) == [True, True, True, True]
    assert keep(0.01) == [True, False, False, False]  # the most likely token always survives


def test_sampled_tokens_come_from_the_filtered_set_and_follow_the_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    tokens = sample_logits(logits, top_k=3, generator=g)
    assert set(tokens.tolist()) == {0, 1, 2}
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert torch.allclose(freq[:3], torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.03)
    assert set(sample_logits(logits, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert sample_logits(logits, temperature=0).eq(0).all()


def test_bad_arguments_raise_clear_errors():
    model = make_model()
    text = random_text(2)
    known = torch.zeros(2, GRID, GRID, dtype=torch.long)
    keep = keep_rows_mask(GRID, 1)
    cases = [
        (dict(keep_mask=keep), "known_tokens is None"),
        (dict(known_tokens=known), "without keep_mask"),
        (dict(keep_mask=keep.int(), known_tokens=known), "bool tensor"),
        (dict(keep_mask=keep, known_tokens=known[:1]), "known_tokens must be"),
        (dict(keep_mask=keep, known_tokens=known + IMAGE_VOCAB), "kept image tokens"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(temperature=-1.0), "temperature"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            generate_images_tokens(model, text, **kwargs)
    with pytest.raises(ValueError, match=r"text_ids must be \[B, 5\]"):
        generate_images_tokens(model, text[:, :3])


def test_prepared_copies_sample_like_the_model_and_leave_it_untouched(tmp_path):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = random_text(3)
    images = torch.randint(0, IMAGE_VOCAB, (3, GRID, GRID), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(text, images)[1]
    exact = prepare_for_sampling(model, torch.float32)  # packed fp32 weights: same numbers up to rounding order
    greedy = generate_images_tokens(model, text, temperature=0)
    assert torch.equal(generate_images_tokens(exact, text, temperature=0), greedy)
    with torch.no_grad():
        assert torch.allclose(exact(text, images)[1], reference, atol=1e-3, rtol=1e-4)
    fast = prepare_for_sampling(model)  # default: bf16 weights where the CPU has bf16 instructions
    with torch.no_grad():
        assert (fast(text, images)[1] - reference).abs().max() < 0.05 * reference.abs().max()
    tokens = generate_images_tokens(fast, text, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, GRID, GRID) and 0 <= int(tokens.min()) and int(tokens.max()) < IMAGE_VOCAB
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="prepare_for_sampling"):
        fast.save_pretrained(tmp_path / "x")


# --- the static decoder (CUDA graphs on a GPU; eager here) against the cached loop ---------------


def record_logits(monkeypatch) -> list[torch.Tensor]:
    """Make the sampler keep a copy of the logits of every token it samples (in sampling order)."""
    import dalle.sampling as sampling

    seen: list[torch.Tensor] = []
    real = sampling.sample_logits

    def spy(logits, *args, **kwargs):
        seen.append(logits.clone())
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(sampling, "sample_logits", spy)
    return seen


@pytest.mark.parametrize("kind", ["full", "column", None])
def test_static_decoder_samples_the_cached_loops_tokens(kind, monkeypatch):
    # Same generator -> same tokens: both decoders draw the same random numbers in the same
    # order, and their logits differ only by float rounding (checked step by step).
    model = make_model(kind)
    text = random_text(4)
    text[2] = text[0]  # a repeated prompt (its text is prefilled once)
    seen = record_logits(monkeypatch)
    for seed, kwargs in enumerate([{}, dict(temperature=1.5, top_k=6), dict(temperature=0.8, top_p=0.7)]):
        tokens = {}
        for decoder in ("cached", "static"):
            seen.clear()
            tokens[decoder] = generate_images_tokens(model, text, generator=torch.Generator().manual_seed(seed),
                                                     decoder=decoder, **kwargs)
            tokens[decoder + "_logits"] = torch.stack(seen)
        assert torch.equal(tokens["static"], tokens["cached"])
        assert tokens["static_logits"].shape == (GRID * GRID, 4, IMAGE_VOCAB)
        assert torch.allclose(tokens["static_logits"], tokens["cached_logits"], atol=1e-4, rtol=1e-5)


def test_static_decoder_completes_images_like_the_cached_loop(monkeypatch):
    # region_mask(1, 2): a kept prefix (prefilled), then kept runs between sampled tokens (fed one a step).
    model = make_model()
    text = random_text(3)
    known = torch.randint(0, IMAGE_VOCAB, (3, GRID, GRID), generator=torch.Generator().manual_seed(4))
    seen = record_logits(monkeypatch)
    for keep in (region_mask(GRID, 1, 2), keep_rows_mask(GRID, 3), torch.ones(GRID, GRID, dtype=torch.bool)):
        out, logits = {}, {}
        for decoder in ("cached", "static"):
            seen.clear()
            out[decoder] = generate_images_tokens(model, text, known_tokens=known, keep_mask=keep, decoder=decoder,
                                                  generator=torch.Generator().manual_seed(0), temperature=1.2)
            logits[decoder] = torch.stack(seen) if seen else None
        assert torch.equal(out["static"][:, keep], known[:, keep])
        assert torch.equal(out["static"], out["cached"])
        if logits["cached"] is None:
            assert logits["static"] is None  # everything kept: nothing sampled
        else:
            assert len(logits["static"]) == int((~keep).sum())
            assert torch.allclose(logits["static"], logits["cached"], atol=1e-4, rtol=1e-5)


def test_a_reused_static_decoder_pads_smaller_batches():
    # One decoder (one CUDA graph on a GPU) serves every call: a batch smaller than its own
    # runs padded, and the previous call's cache contents do not leak into the next.
    from dalle.sampling import static_decoder_for

    model = make_model()
    decoder = static_decoder_for(model, 5, "static")
    assert decoder is not None and decoder.batch == 5 and decoder.graph is None
    known = torch.randint(0, IMAGE_VOCAB, (3, GRID, GRID), generator=torch.Generator().manual_seed(6))
    keep = keep_rows_mask(GRID, 1)
    for text, kwargs in [(random_text(5, seed=2), {}), (random_text(3, seed=3), {}),
                         (random_text(3, seed=4), dict(known_tokens=known, keep_mask=keep))]:
        reused = generate_images_tokens(model, text, generator=torch.Generator().manual_seed(1), decoder=decoder,
                                        **kwargs)
        cached = generate_images_tokens(model, text, generator=torch.Generator().manual_seed(1), decoder="cached",
                                        **kwargs)
        assert reused.shape == (text.shape[0], GRID, GRID)
        assert torch.equal(reused, cached)


def test_decoder_choice_and_its_errors(monkeypatch):
    import dalle.sampling as sampling
    from dalle.sampling import static_decoder_for, use_static_decoder

    assert not use_static_decoder("auto", "cpu") and use_static_decoder("auto", torch.device("cuda"))
    assert use_static_decoder("static", "cpu") and not use_static_decoder("cached", torch.device("cuda"))
    model = make_model()
    text = random_text(3)
    assert static_decoder_for(model, 3) is None  # auto on the CPU: the cached loop
    with pytest.raises(ValueError, match="decoder must be one of"):
        generate_images_tokens(model, text, decoder="graph")
    with pytest.raises(ValueError, match="another model"):
        generate_images_tokens(model, text, decoder=static_decoder_for(make_model(), 3, "static"))
    with pytest.raises(ValueError, match="holds 2 rows but text_ids has 3"):
        generate_images_tokens(model, text, decoder=static_decoder_for(model, 2, "static"))
    # A static decoder that cannot be built: "auto" warns and falls back, "static" fails.
    def broken(*args, **kwargs):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(sampling, "StaticDecoder", broken)
    monkeypatch.setattr(sampling, "use_static_decoder", lambda decoder, device: decoder != "cached")
    model.train()
    with pytest.warns(UserWarning, match="capture failed"):
        assert static_decoder_for(model, 3, "auto") is None
    with pytest.raises(RuntimeError, match="capture failed"):
        static_decoder_for(model, 3, "static")
    assert model.training  # the model's mode is restored either way
