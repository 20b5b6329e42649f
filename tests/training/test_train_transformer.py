"""The transformer training loop: it learns, logs, samples, evaluates and resumes exactly."""

from __future__ import annotations

import copy
import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dalle.config import get_preset
from dalle.dvae import DiscreteVAE
from dalle.tokenizer import TextTokenizer
from dalle.training.transformer import (batch_for_step, diagnose_transformer, evaluate_transformer, make_optimizer,
                                        train_transformer)
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
    assert float(rows[-1]["train_bits_per_image_token"]) < 0.75 * first / 0.6931  # nats -> bits
    # 12 items are too few to hold any out: no validation figure, and the old column stays empty
    # rather than showing a training figure under a held-out name.
    assert rows[-1]["val_bits_per_image_token"] == rows[-1]["eval_bits_per_image_token"] == ""
    assert float(rows[-1]["mean_loss"]) == float(rows[-1]["loss"])  # log_every=1: a window of one step
    fit = json.loads((tmp_path / "logs" / "transformer_fit.json").read_text())
    assert fit["val_items"] == 0 and fit["train_items"] == 12 and fit["val_bits_per_image_token"] is None
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
    kw = dict(steps=6, log_every=2, sample_every=2, checkpoint_every=3, val_items=3, progress=False)
    try:
        straight = train_transformer(data, tokenizer, tmp_path / "a", config, **kw)
        partial = train_transformer(data, tokenizer, tmp_path / "b", config, stop_after=3, **kw)
        assert not partial.exists()  # an interrupted run exports nothing
        resumed = train_transformer(data, tokenizer, tmp_path / "b", config, resume=True, **kw)
        # A run killed between two rows: the straight run's step-3 checkpoint, resumed.  Its
        # first row (step 4) averages the losses of steps 3 and 4, so the loss window must
        # come back from the checkpoint.
        shutil.copytree(tmp_path / "a" / "logs", tmp_path / "c" / "logs")
        shutil.copytree(tmp_path / "a" / "checkpoints" / "transformer" / "step_00000003",
                        tmp_path / "c" / "checkpoints" / "transformer" / "step_00000003")
        killed = train_transformer(data, tokenizer, tmp_path / "c", config, resume=True, **kw)
    finally:
        config.train.grad_accum = 1
    a = load_file(straight / "model.safetensors")
    for other in (resumed, killed):
        b = load_file(other / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    timeless = lambda p: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "seconds")}  # noqa: E731
                          for r in read_log(p / "logs" / "transformer.csv")]
    assert [r["step"] for r in timeless(tmp_path / "b")] == ["2", "3", "4", "6"]  # the cut run's row kept
    assert [r["loss"] for r in timeless(tmp_path / "a")] == [r["loss"] for r in timeless(tmp_path / "b")
                                                              if r["step"] != "3"]
    assert timeless(tmp_path / "a") == timeless(tmp_path / "c")
    assert all(r["val_bits_per_image_token"] and r["mean_loss"] for r in timeless(tmp_path / "a"))
    fit = lambda p: json.loads((p / "logs" / "transformer_fit.json").read_text())  # noqa: E731
    assert fit(tmp_path / "a") == fit(tmp_path / "c")
    assert fit(tmp_path / "a")["val_items"] == 3
    assert fit(tmp_path / "a")["val_bits_per_image_token"] == fit(tmp_path / "b")["val_bits_per_image_token"]


def test_bad_arguments_raise_clear_errors(setup, tmp_path):
    config, data, tokenizer = setup
    with pytest.raises(ValueError, match="empty"):
        train_transformer([], tokenizer, tmp_path, config, steps=1, progress=False)
    wrong_grid = [(torch.zeros(4, 4, dtype=torch.long), ["a red circle"])]
    with pytest.raises(ValueError, match="8x8 grid"):
        train_transformer(wrong_grid, tokenizer, tmp_path, config, steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train_transformer(data, tokenizer, tmp_path, config, steps=0, progress=False)


# --- validation split and fit report ------------------------------------------------------


def test_batches_never_draw_the_held_out_tail(setup):
    _, data, tokenizer = setup  # item i is told apart by its row of tokens 100 + i
    drawn = set()
    for step in range(60):
        _, images = batch_for_step(data, tokenizer, 0, step, 8, n_train=9)
        drawn.update(int(t) - 100 for t in images.amax(dim=(1, 2)))
    assert drawn == set(range(9))  # every training item, and none of the last three


def noisy_scenes(n: int, noise: float = 0.5, seed: int = 0) -> list[tuple[torch.Tensor, list[str]]]:
    """Each item: its caption's scene token, with about ``noise`` of the cells replaced by random codes.

    The scene is learnable from the caption; the noise is not, except by heart.
    """
    g = torch.Generator().manual_seed(seed)
    scenes = list(SCENES.items())
    items = []
    for i in range(n):
        words, code = scenes[i % len(scenes)]
        tokens = torch.full((8, 8), code, dtype=torch.long)
        replaced = torch.rand(8, 8, generator=g) < noise
        tokens[replaced] = torch.randint(512, (8, 8), generator=g)[replaced]
        items.append((tokens, [f"a {words}", f"one {words}"]))
    return items


@pytest.mark.parametrize("items, steps, memorises", [(24, 300, True), (400, 150, False)])
def test_fit_report_and_export_follow_the_validation_loss(setup, tmp_path, items, steps, memorises):
    """End to end: the tiny preset on 24 items (4 held out) for 120 passes learns their noise by heart,
    so validation rises after a while: the export is the best-validation weights and the report says
    later evaluations were worse.  On 400 items for 3 passes it generalises and the report is quiet."""
    config, _, _ = setup
    config = copy.deepcopy(config)
    config.train.transformer_patience = 0  # run on to the end: early stopping has its own test
    data = noisy_scenes(items)
    tokenizer = TextTokenizer.train([c for _, caps in data for c in caps], config.tokenizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and far faster on a busy machine
    try:
        out = train_transformer(data, tokenizer, tmp_path, config, steps=steps, log_every=1000,
                                sample_every=steps // 5, autocast=False, progress=False)
    finally:
        torch.set_num_threads(threads)
    fit = json.loads((tmp_path / "logs" / "transformer_fit.json").read_text())
    codes = {d["code"] for d in fit["diagnoses"]}
    assert fit["val_items"] == (4 if items == 24 else 16)
    assert len(fit["history"]) == 5 and fit["last_step"] == steps and not fit["stopped_early"]
    best = min(fit["history"], key=lambda h: h["val"])
    assert (fit["step"], fit["val_bits_per_image_token"]) == (best["step"], best["val"])
    exported = load_file(out / "model.safetensors")
    if memorises:
        last = fit["history"][-1]
        assert last["val"] > 2 * last["train"]  # the last weights learnt the training noise by heart ...
        assert best["step"] < steps and "exported the weights of step" in fit["summary"]
        # ... and are not the ones exported: those are the best evaluation's, judged on their own figures.
        kept = load_file(tmp_path / "checkpoints" / "transformer_best" / "model.safetensors")
        assert all(torch.equal(exported[k], kept[k]) for k in exported)
        assert "memorising" not in codes or best["val"] > 2 * best["train"]
    else:
        assert not codes, fit
        assert fit["val_bits_per_image_token"] < 1.1 * fit["train_bits_per_image_token"]


def test_early_stopping_ends_the_run_when_validation_rises_and_resumes_exactly(setup, tmp_path):
    config, _, _ = setup
    config = copy.deepcopy(config)
    config.train.transformer_patience = 1
    data = noisy_scenes(24)
    tokenizer = TextTokenizer.train([c for _, caps in data for c in caps], config.tokenizer)
    kw = dict(steps=300, log_every=1000, sample_every=30, autocast=False, progress=False, checkpoint_every=60)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = train_transformer(data, tokenizer, tmp_path / "a", config, **kw)
        fit = json.loads((tmp_path / "a" / "logs" / "transformer_fit.json").read_text())
        assert fit["stopped_early"] and fit["last_step"] < 300
        vals = [h["val"] for h in fit["history"]]
        assert vals[-1] >= min(vals[:-1]) and fit["val_bits_per_image_token"] == min(vals)
        assert fit["last_step"] == fit["step"] + 30  # one evaluation without improvement
        # Killed after the first checkpoint, resumed: the same stop, the same exported weights.
        train_transformer(data, tokenizer, tmp_path / "b", config, stop_after=60, **kw)
        resumed = train_transformer(data, tokenizer, tmp_path / "b", config, resume=True, **kw)
    finally:
        torch.set_num_threads(threads)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    fit_b = json.loads((tmp_path / "b" / "logs" / "transformer_fit.json").read_text())
    assert (fit_b["step"], fit_b["last_step"]) == (fit["step"], fit["last_step"])


def history(*points: tuple[float, float | None]) -> list[dict]:
    """Evaluations every 100 steps: (training bits, validation bits) each."""
    return [{"step": 100 * (i + 1), "train": t, "val": v} for i, (t, v) in enumerate(points)]


def diagnoses(*points, train_items=100_000, parameters=1_000_000) -> set[str]:
    found = diagnose_transformer(history(*points), train_items=train_items, parameters=parameters, image_len=64,
                                 image_vocab=512)
    assert all(d.message for d in found)
    return {d.code for d in found}


def test_diagnose_transformer_quiet_on_a_healthy_run():
    assert diagnoses((4.0, 4.1), (3.0, 3.1), (2.0, 2.1)) == set()
    assert diagnoses((2.0, None)) == set()  # nothing held out, but plenty of data for the model
    assert diagnose_transformer([], train_items=1, parameters=1, image_len=1, image_vocab=2) == []


def test_diagnose_transformer_memorising_needs_a_ratio_and_a_gap():
    assert diagnoses((3.0, 3.0), (1.2, 3.1)) == {"memorising"}
    assert diagnoses((2.0, 2.5)) == set()  # 25% more on unseen images: within the margin
    assert diagnoses((0.1, 0.25)) == set()  # 2.5 times, but 0.15 bits: both near perfect


def test_diagnose_transformer_rising_validation():
    # Validation got worse since step 200 while training kept improving: overtraining.
    assert diagnoses((3.0, 3.0), (2.4, 2.5), (2.6, 2.9)) == {"validation_rising"}
    assert diagnoses((3.0, 3.0), (2.4, 2.5), (2.5, 2.6)) == set()  # 4% above its best: not a trend
    assert diagnoses((3.0, 3.0), (2.4, 2.5), (2.3, 2.4)) == set()  # still improving
    found = diagnose_transformer(history((3.0, 3.0), (1.5, 2.5), (1.0, 3.2)), train_items=100_000,
                                 parameters=1_000_000, image_len=64, image_vocab=512)
    assert [d.code for d in found] == ["memorising"] and "rising since step 200 (best 2.50)" in found[0].message


def test_diagnose_transformer_too_little_data():
    # 20 images x 64 tokens x 9 bits = 11.5 kbit of data for 190 kbit of capacity.
    assert diagnoses((2.0, None), train_items=20, parameters=95_000) == {"too_little_data"}  # nothing held out
    assert diagnoses((1.0, 3.0), train_items=20, parameters=95_000) == {"memorising", "too_little_data"}
    assert diagnoses((2.0, 2.1), train_items=20, parameters=95_000) == set()  # it generalises: say nothing
    assert diagnoses((2.0, None), train_items=100_000, parameters=95_000) == set()


def test_diagnose_transformer_barely_trained():
    assert diagnoses((8.5, 8.6)) == {"undertrained"}  # a uniform guess over 512 codes is 9 bits
    assert diagnoses((7.0, 7.2)) == set()
