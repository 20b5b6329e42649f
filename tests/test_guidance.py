"""Classifier-free guidance: null captions in training, uncond + s * (cond - uncond) at sampling."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dalle.config import TransformerConfig, get_preset, load_config
from dalle.sampling import (
    generate_images_tokens, guided_logits, keep_rows_mask, null_caption_ids, sample_logits,
)
from dalle.transformer import DalleTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for helpers/, whatever pytest's import mode
from helpers.tiny_pipeline import build_tiny_pipeline  # noqa: E402

TEXT_LEN, GRID, TEXT_VOCAB, IMAGE_VOCAB = 5, 4, 25, 20


def make_model(null_caption_fraction: float = 0.1, attention: str = "sparse", seed: int = 0) -> DalleTransformer:
    config = TransformerConfig(n_layers=4, n_heads=2, head_dim=8, text_vocab=TEXT_VOCAB, text_len=TEXT_LEN,
                               image_vocab=IMAGE_VOCAB, image_grid=GRID, conv_kernel=3, attention=attention,
                               null_caption_fraction=null_caption_fraction)
    torch.manual_seed(seed)
    model = DalleTransformer(config).eval()
    with torch.no_grad():  # far-from-uniform logits, so a wrong stream or formula shows clearly
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return model


def random_text(b: int, seed: int = 1) -> torch.Tensor:
    # BPE ids only (below the padding ids), so a caption is never the null caption.
    return torch.randint(0, TEXT_VOCAB - TEXT_LEN, (b, TEXT_LEN), generator=torch.Generator().manual_seed(seed))


def record(monkeypatch, name: str) -> list:
    """Spy on ``dalle.sampling.<name>``: every call's first argument (cloned), in order."""
    import dalle.sampling as sampling

    seen: list = []
    real = getattr(sampling, name)

    def spy(first, *args, **kwargs):
        seen.append(first.clone() if isinstance(first, torch.Tensor) else first)
        return real(first, *args, **kwargs)

    monkeypatch.setattr(sampling, name, spy)
    return seen


def uncached_guided_sample(model, text, guidance, generator, temperature=1.0) -> torch.Tensor:
    """Reference: each token from full forward passes (no cache) of the caption and the null caption."""
    b = text.shape[0]
    null = null_caption_ids(model, b, "cpu")
    tokens = torch.zeros(b, GRID * GRID, dtype=torch.long)
    with torch.no_grad():
        for j in range(GRID * GRID):
            grid = tokens.view(b, GRID, GRID)
            _, cond = model(text, grid)
            _, uncond = model(null, grid)
            logits = uncond[:, j] + guidance * (cond[:, j] - uncond[:, j])
            tokens[:, j] = sample_logits(logits, temperature, generator=generator)
    return tokens.view(b, GRID, GRID)


def test_null_caption_is_every_position_padded():
    model = make_model()
    null = null_caption_ids(model, 3, "cpu")
    assert null.shape == (3, TEXT_LEN)
    assert null[0].tolist() == list(range(TEXT_VOCAB - TEXT_LEN, TEXT_VOCAB))
    # The tokenizer's empty caption is the same thing.
    pipe = build_tiny_pipeline()
    assert torch.equal(pipe.tokenizer.encode_batch([""])[0], null_caption_ids(pipe.transformer, 1, "cpu")[0])


def test_guidance_one_is_plain_sampling_exactly():
    model = make_model()
    text = random_text(3)
    plain = generate_images_tokens(model, text, generator=torch.Generator().manual_seed(0))
    one = generate_images_tokens(model, text, generator=torch.Generator().manual_seed(0), guidance=1.0)
    assert torch.equal(plain, one)
    # And a model trained without null captions samples at guidance 1 as before.
    assert generate_images_tokens(make_model(0.0), text, generator=torch.Generator().manual_seed(0),
                                  guidance=1).shape == (3, GRID, GRID)


@pytest.mark.parametrize("attention", ["sparse", "full"])
@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_guided_logits_follow_the_formula_on_the_uncached_model(attention, guidance, monkeypatch):
    """The logits the sampler draws from are uncond + s * (cond - uncond) of full forward passes."""
    model = make_model(attention=attention)
    text = random_text(3)
    seen = record(monkeypatch, "sample_logits")
    tokens = generate_images_tokens(model, text, temperature=0, guidance=guidance)
    assert len(seen) == GRID * GRID and seen[0].shape == (3, IMAGE_VOCAB)
    with torch.no_grad():
        _, cond = model(text, tokens)
        _, uncond = model(null_caption_ids(model, 3, "cpu"), tokens)
    expected = uncond + guidance * (cond - uncond)
    assert torch.allclose(torch.stack(seen, dim=1), expected, atol=1e-3, rtol=1e-4)
    assert torch.equal(expected.argmax(-1), tokens.flatten(1))
    # Guidance changes the choice: at s = 3 the greedy tokens are not the unguided ones.
    if guidance == 3.0:
        assert not torch.equal(tokens, generate_images_tokens(model, text, temperature=0))


def test_guided_logits_helper():
    cond, uncond = torch.randn(2, 7), torch.randn(2, 7)
    both = torch.cat([cond, uncond])
    assert torch.allclose(guided_logits(both, 2.5), uncond + 2.5 * (cond - uncond))
    assert torch.allclose(guided_logits(both, 1.0), cond)
    assert torch.allclose(guided_logits(both, 0.0), uncond)


def test_cached_guided_sampling_equals_the_uncached_reference():
    model = make_model()
    text = random_text(4)
    text[2] = text[0]  # a repeated prompt: its text prefilled once
    for seed, guidance in enumerate([2.0, 5.0, 0.5]):
        cached = generate_images_tokens(model, text, guidance=guidance, generator=torch.Generator().manual_seed(seed))
        reference = uncached_guided_sample(model, text, guidance, torch.Generator().manual_seed(seed))
        assert torch.equal(cached, reference), (guidance, cached, reference)


def test_both_streams_run_as_one_batch_a_step(monkeypatch):
    """Guided sampling makes the same number of forward calls as plain sampling, each of 2B rows."""
    model = make_model(attention="full")
    text = random_text(3)
    calls: dict[str, list[int]] = {}
    real = model.hidden_states
    for guidance in (1.0, 2.0):
        rows: list[int] = []

        def spy(x, *args, **kwargs):
            rows.append(x.shape[0])
            return real(x, *args, **kwargs)

        monkeypatch.setattr(model, "hidden_states", spy)
        generate_images_tokens(model, text, guidance=guidance, generator=torch.Generator().manual_seed(0),
                               decoder="cached")
        calls[str(guidance)] = rows
    plain, guided = calls["1.0"], calls["2.0"]
    assert len(guided) <= len(plain) + 1  # + at most one text prefill (the two distinct texts run once each)
    steps = GRID * GRID - 1
    assert plain[-steps:] == [3] * steps and guided[-steps:] == [6] * steps


def test_guided_completion_keeps_the_kept_tokens_and_the_static_decoder_agrees(monkeypatch):
    model = make_model()
    text = random_text(3)
    known = torch.randint(0, IMAGE_VOCAB, (3, GRID, GRID), generator=torch.Generator().manual_seed(4))
    keep = keep_rows_mask(GRID, 1)
    out = {}
    for decoder in ("cached", "static"):
        out[decoder] = generate_images_tokens(model, text, known_tokens=known, keep_mask=keep, guidance=2.0,
                                              decoder=decoder, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["cached"][:, keep], known[:, keep])
    assert torch.equal(out["static"], out["cached"])
    generated = generate_images_tokens(model, text, guidance=3.0, decoder="static",
                                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(generated, generate_images_tokens(model, text, guidance=3.0, decoder="cached",
                                                         generator=torch.Generator().manual_seed(1)))


def test_models_trained_without_null_captions_refuse_guidance():
    model = make_model(null_caption_fraction=0.0)
    with pytest.raises(ValueError, match="trained with null captions.*guidance 1"):
        generate_images_tokens(model, random_text(2), guidance=2.0)
    with pytest.raises(ValueError, match=">= 0"):
        generate_images_tokens(make_model(), random_text(2), guidance=-1.0)
    with pytest.raises(ValueError, match="finite"):
        generate_images_tokens(make_model(), random_text(2), guidance=float("nan"))


def test_configs_saved_before_the_field_mean_no_null_captions(tmp_path):
    assert get_preset("shapes").transformer.null_caption_fraction == 0.1
    assert get_preset("paper").transformer.null_caption_fraction == 0.1
    from dalle.pipeline import bundled_model_dir

    fields = json.loads((bundled_model_dir() / "transformer" / "config.json").read_text())
    assert "null_caption_fraction" not in fields  # the shipped model predates guidance
    (tmp_path / "config.json").write_text(json.dumps(fields))
    assert load_config(TransformerConfig, tmp_path / "config.json").null_caption_fraction == 0.0
    config = get_preset("tiny")
    config.transformer.null_caption_fraction = 1.0
    with pytest.raises(ValueError, match="null_caption_fraction"):
        config.check()


def test_training_batches_replace_captions_by_the_null_caption_at_the_configured_rate():
    from dalle.training.transformer import batch_for_step
    tokenizer = build_tiny_pipeline().tokenizer
    data = [(torch.zeros(8, 8, dtype=torch.long), ["a red circle", "a picture of a red circle"])] * 16
    null = tokenizer.encode_batch([""])[0]
    counts = []
    for fraction in (0.0, 0.1):
        nulls = 0
        for step in range(40):
            text, _ = batch_for_step(data, tokenizer, 0, step, 16, null_fraction=fraction)
            again, _ = batch_for_step(data, tokenizer, 0, step, 16, null_fraction=fraction)
            assert torch.equal(text, again)  # a function of (seed, step): resume stays exact
            nulls += int((text == null).all(dim=1).sum())
        counts.append(nulls)
    assert counts[0] == 0
    assert 30 <= counts[1] <= 100  # 10% of 640 captions is 64


def test_pipeline_and_cli_take_guidance(tmp_path, capsys):
    from dalle.cli import main
    pipe = build_tiny_pipeline()
    plain = pipe("a red circle", candidates=3, keep=3, seed=0)
    assert pipe("a red circle", candidates=3, keep=3, seed=0, guidance=1).all_scores == plain.all_scores
    guided = pipe("a red circle", candidates=3, keep=2, seed=0, guidance=3.0)
    assert len(guided.images) == 2
    completed = pipe.complete(plain.images[0], "a red circle", keep_rows=2, candidates=2, keep=1, guidance=2.0)
    assert len(completed.images) == 1
    # The bundled model was trained without null captions: a clear one-line refusal.
    code = main(["generate", "a red circle", "--guidance", "2", "--candidates", "2", "--keep", "1",
                 "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "null captions" in err and "guidance 1" in err
    assert main(["generate", "a red circle", "--guidance", "-1"]) != 0


def test_serve_validates_guidance():
    from dalle.serve import Limits, RequestError, validate_sampling

    good = {"prompt": "a red circle", "candidates": 4, "keep": 2}
    assert validate_sampling(good, Limits(), None, None).guidance == 1.0
    assert validate_sampling({**good, "guidance": "3"}, Limits(), None, None).pipeline_kwargs()["guidance"] == 3.0
    for value, message in [(-1, "between 0 and 20"), (25, "between 0 and 20"), ("lots", "must be a number")]:
        with pytest.raises(RequestError, match=message):
            validate_sampling({**good, "guidance": value}, Limits(), None, None)
    with pytest.raises(RequestError, match="null captions"):
        validate_sampling({**good, "guidance": 2}, Limits(), None, None, guidable=False)
    assert validate_sampling({**good, "guidance": 1}, Limits(), None, None, guidable=False).guidance == 1.0
