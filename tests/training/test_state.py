import random

import pytest
import torch
from torch import nn

from dalle.io import ModelLoadError
from dalle.training.state import EMA, Checkpointer, NonFiniteError, NonFiniteGuard, cosine, warmup_cosine


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.96))


def _train(model, optimizer, ema, steps):
    for _ in range(steps):
        loss = model(torch.randn(3, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)


def test_schedules_hit_their_ends():
    assert cosine(0, 100, 1.0, 1 / 16) == pytest.approx(1.0)
    assert cosine(100, 100, 1.0, 1 / 16) == pytest.approx(1 / 16)
    assert cosine(500, 100, 1.0, 1 / 16) == pytest.approx(1 / 16)
    assert 1 / 16 < cosine(50, 100, 1.0, 1 / 16) < 1.0
    assert warmup_cosine(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10, 1.0) == pytest.approx(0.0)


def test_ema_moves_towards_the_model():
    model, optimizer = _model_and_optimizer()
    ema = EMA(model, decay=0.5)
    before = [p.clone() for p in ema.module.parameters()]
    _train(model, optimizer, ema, 1)
    for b, e, p in zip(before, ema.module.parameters(), model.parameters()):
        assert torch.allclose(e, 0.5 * b + 0.5 * p)


def test_resume_restores_weights_optimizer_and_random_state(tmp_path):
    torch.manual_seed(1)
    model, optimizer = _model_and_optimizer()
    ema = EMA(model, 0.9)
    _train(model, optimizer, ema, 3)
    ckpt = Checkpointer(tmp_path, keep=2)
    ckpt.save(3, {"model": model, "ema": ema.module}, {"opt": optimizer}, {"note": "x"})
    _train(model, optimizer, ema, 2)  # the uninterrupted run goes on
    expected = [p.clone() for p in model.parameters()]

    model2, optimizer2 = _model_and_optimizer(seed=5)
    ema2 = EMA(model2, 0.9)
    assert ckpt.load_latest({"model": model2, "ema": ema2.module}, {"opt": optimizer2}) == (3, {"note": "x"})
    _train(model2, optimizer2, ema2, 2)
    for a, b in zip(expected, model2.parameters()):
        assert torch.equal(a, b)


def test_keeps_the_newest_and_falls_back_from_a_corrupt_one(tmp_path):
    model, optimizer = _model_and_optimizer()
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        with torch.no_grad():
            model[0].bias.fill_(step)
        ckpt.save(step, {"model": model}, {"opt": optimizer})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]
    newest = tmp_path / "step_00000003" / Checkpointer.TENSORS
    newest.write_bytes(newest.read_bytes()[:-10])  # truncated
    fresh, _ = _model_and_optimizer()
    with pytest.warns(UserWarning, match="checksum"):
        step, _ = ckpt.load_latest({"model": fresh})
    assert step == 2 and torch.all(fresh[0].bias == 2)


def test_mismatched_checkpoint_names_the_tensors(tmp_path):
    model, _ = _model_and_optimizer()
    Checkpointer(tmp_path).save(1, {"model": model})
    other = nn.Sequential(nn.Linear(4, 16))
    with pytest.raises(ModelLoadError, match=r"mis-shaped tensors: 0.bias \(file \(8,\), model \(16,\)\)"):
        Checkpointer(tmp_path).load_latest({"model": other})


def test_empty_folder_means_no_checkpoint(tmp_path):
    assert Checkpointer(tmp_path / "none").load_latest({}) is None


def test_non_finite_guard_skips_then_stops():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.check(torch.tensor(1.0))
    assert not guard.check(torch.tensor(float("nan")))
    assert not guard.check(float("inf"))
    assert guard.check(2.0) and guard.skipped == 2
    guard.check(float("nan"))
    guard.check(float("nan"))
    with pytest.raises(NonFiniteError, match="learning rate"):
        guard.check(float("nan"))
