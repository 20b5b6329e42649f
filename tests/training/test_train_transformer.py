"""The transformer training loop: it learns, logs, samples, evaluates and resumes exactly."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

from dalle.config import get_preset
from dalle.dvae import DiscreteVAE
from dalle.tokenizer import TextTokenizer
from dalle.training.transformer import batch_for_step, evaluate_transformer, make_optimizer, train_transformer
from dalle.transformer import DalleTransformer

SCENES = {  # caption words -> the token every grid cell holds, plus a stripe
    "red circle": 3,
    "blue square": 7,
    "green triangle": 11,
}


def toy_dataset(n: int = 12) -> list[tuple[torch.Tensor, list[str]]]:
    items = []
    for i in range(n):
        words, code = list(SCENES.items())[i % len(SCENES)]
        tokens = torch.full((8, 8), code, dtype=torch.long)
        tokens[i % 8] = 100 + i  # one row differs per item
        items.append((tokens, [f"a {words}", f"one {words}"]))
    return items


@pytest.fixture(scope="module")
def setup():
    config = get_preset("tiny")
    config.train.transformer_lr = 3e-3
    data = toy_dataset()
    tokenizer = TextTokenizer.train([c for _, caps in data for c in caps], config.tokenizer)
    return config, data, tokenizer


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_batches_are_a_function_of_seed_and_step(setup):
    config, data, tokenizer = setup
    a = batch_for_step(data, tokenizer, 0, 5, 8)
    b = batch_for_step(data, tokenizer, 0, 5, 8)
    c = batch_for_step(data, tokenizer, 0, 6, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))
    assert a[0].shape == (8, config.tokenizer.text_len) and a[1].shape == (8, 8, 8)


def test_weight_decay_only_on_linear_matrices(setup):
    config, _, _ = setup
    model = DalleTransformer(config.transformer)
    decayed, free = make_optimizer(model, 1e-3).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert decayed["weight_decay"] == 4.5e-2 and free["weight_decay"] == 0.0
    assert "blocks.0.attn.qkv.weight" in decayed_names and "image_head.weight" in decayed_names
    assert not any("embedding" in n or "bias" in n or "ln" in n or "row" in n for n in decayed_names)


def test_training_lowers_the_loss_logs_samples_and_exports(setup, tmp_path):
    config, data, tokenizer = setup
    dvae = DiscreteVAE(config.dvae).eval()
    out = train_transformer(data, tokenizer, tmp_path, config, steps=40, log_every=1, sample_every=40,
                            dvae=dvae, progress=False)
    rows = read_log(tmp_path / "logs" / "transformer.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 41))
    first, last = float(rows[0]["image_loss"]), float(rows[-1]["image_loss"])
    assert last < 0.6 * first, (first, last)
    assert float(rows[-1]["eval_bits_per_image_token"]) < 0.75 * first / 0.6931  # nats -> bits
    assert (tmp_path / "samples" / "transformer_step000040.png").is_file()
    assert (tmp_path / "logs" / "transformer.png").is_file()
    model = DalleTransformer.from_pretrained(out)
    before = evaluate_transformer(DalleTransformer(config.transformer), data, tokenizer, n=12)
    after = evaluate_transformer(model, data, tokenizer, n=12)
    assert after["bits_per_image_token"] < 0.5 * before["bits_per_image_token"]
    assert set(after) >= {"bits_per_image_token", "bits_per_text_token"}


def test_resume_is_bitwise_identical(setup, tmp_path):
    config, data, tokenizer = setup
    config.train.grad_accum = 2  # exercise accumulation too
    try:
        straight = train_transformer(data, tokenizer, tmp_path / "a", config, steps=6, log_every=1, progress=False)
        partial = train_transformer(data, tokenizer, tmp_path / "b", config, steps=6, log_every=1, stop_after=3,
                                    progress=False)
        assert not partial.exists()  # an interrupted run exports nothing
        resumed = train_transformer(data, tokenizer, tmp_path / "b", config, steps=6, log_every=1, resume=True,
                                    progress=False)
    finally:
        config.train.grad_accum = 1
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda p: [r["loss"] for r in read_log(p / "logs" / "transformer.csv")]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_bad_arguments_raise_clear_errors(setup, tmp_path):
    config, data, tokenizer = setup
    with pytest.raises(ValueError, match="empty"):
        train_transformer([], tokenizer, tmp_path, config, steps=1, progress=False)
    wrong_grid = [(torch.zeros(4, 4, dtype=torch.long), ["a red circle"])]
    with pytest.raises(ValueError, match="8x8 grid"):
        train_transformer(wrong_grid, tokenizer, tmp_path, config, steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train_transformer(data, tokenizer, tmp_path, config, steps=0, progress=False)
