import math
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dalle.io import ModelLoadError
from dalle.training.state import (
    BUDGET_SAFETY,
    EMA,
    Checkpointer,
    CsvLog,
    NonFiniteError,
    NonFiniteGuard,
    budget_deadline,
    cosine,
    resumed_progress,
    steps_in_budget,
    time_per_step,
    warmup_cosine,
)


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


# --- stale temporary folders -------------------------------------------------------


def test_first_save_removes_temporaries_left_by_a_killed_writer(tmp_path):
    model, optimizer = _model_and_optimizer()
    ckpt = Checkpointer(tmp_path, keep=5)
    ckpt.save(1, {"model": model}, {"opt": optimizer})
    # What a kill mid-write leaves: a half-written folder (same step and another one,
    # another process id), next to things that are not this class's temporaries.
    for name in (".tmp_step_00000002_999999", ".tmp_step_00000001_4242"):
        (tmp_path / name).mkdir()
        (tmp_path / name / Checkpointer.TENSORS).write_bytes(b"half a file")
    (tmp_path / ".tmp_step_notes.txt").write_text("a file, not a folder")
    (tmp_path / "my_notes").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    (tmp_path / ".tmp_step_link").symlink_to(outside, target_is_directory=True)

    # Loading (every rank does it) leaves them; they are ignored.
    fresh, fresh_opt = _model_and_optimizer(seed=3)
    restarted = Checkpointer(tmp_path, keep=5)
    assert restarted.load_latest({"model": fresh}, {"opt": fresh_opt})[0] == 1
    assert (tmp_path / ".tmp_step_00000002_999999").is_dir()

    restarted.save(2, {"model": fresh}, {"opt": fresh_opt})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tmp_step_link", ".tmp_step_notes.txt", "my_notes", "step_00000001", "step_00000002"]
    assert (outside / "keep.txt").read_text() == "x"  # a link is not followed
    step, _ = Checkpointer(tmp_path).load_latest({"model": fresh})
    assert step == 2


def test_only_the_first_save_sweeps(tmp_path):
    """A temporary folder that appears later belongs to a live writer: it is not touched."""
    model, optimizer = _model_and_optimizer()
    ckpt = Checkpointer(tmp_path, keep=5)
    ckpt.save(1, {"model": model}, {"opt": optimizer})  # the folder is created here: nothing to sweep
    live = tmp_path / ".tmp_step_00000007_1"
    live.mkdir()
    ckpt.save(2, {"model": model}, {"opt": optimizer})
    assert live.is_dir()
    assert not any(p.name.startswith(".tmp_step_") and p != live for p in tmp_path.iterdir())


# --- time budgets ------------------------------------------------------------------


class _FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_time_per_step_is_the_median_after_a_warm_up():
    clock = _FakeClock()
    durations = iter([50.0, 0.3, 0.1, 0.2, 9.0, 0.25])  # a slow first call, one outlier
    calls = []

    def step():
        calls.append(1)
        clock.now += next(durations)

    assert time_per_step(step, repeats=5, clock=clock) == pytest.approx(0.25)
    assert len(calls) == 6
    with pytest.raises(ValueError, match="repeats"):
        time_per_step(step, repeats=0)


def test_time_per_step_leaves_every_random_state_as_it_was():
    def draw():
        return torch.rand(3), random.random(), np.random.rand()

    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = draw()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    time_per_step(draw, repeats=3)  # a probe that consumes every generator
    got = draw()
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_time_per_step_restores_random_states_when_the_step_fails():
    def broken():
        torch.rand(5)
        raise RuntimeError("out of memory")

    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    with pytest.raises(RuntimeError, match="out of memory"):
        time_per_step(broken)
    assert torch.equal(torch.rand(2), expected)


def test_steps_in_budget():
    assert steps_in_budget(1.0, 0.5) == int(60 * BUDGET_SAFETY / 0.5)
    assert steps_in_budget(2.0, 0.5, safety=1.0) == 240
    assert steps_in_budget(0.01, 100.0) == 1  # at least one step, however slow
    with pytest.raises(ValueError, match="minutes"):
        steps_in_budget(0, 0.5)
    with pytest.raises(ValueError, match="seconds_per_step"):
        steps_in_budget(1.0, 0.0)
    with pytest.raises(ValueError, match="seconds_per_step"):
        steps_in_budget(1.0, float("nan"))


def test_budget_deadline_covers_the_whole_run_resumes_included():
    assert budget_deadline(None, start=5.0) == math.inf
    fresh = budget_deadline(10.0, start=1000.0)
    # Past the steps' share of the budget, before its end: time to checkpoint and export.
    assert 1000.0 + 600 * BUDGET_SAFETY < fresh < 1000.0 + 600
    assert budget_deadline(10.0, start=1000.0, elapsed_before=240.0) == pytest.approx(fresh - 240.0)


def test_csv_log_resume_keeps_rows_up_to_the_step_and_drops_the_rest(tmp_path):
    path = tmp_path / "logs" / "run.csv"
    log = CsvLog(path, ["step", "loss", "extra"])
    for step in (10, 20, 30):
        log.write({"step": step, "loss": step / 10})
    log.close()
    resumed = CsvLog(path, ["step", "loss", "extra"], resume_step=20)
    assert [r["step"] for r in resumed.kept] == ["10", "20"]
    resumed.write({"step": 30, "loss": 9.0, "extra": "x"})
    resumed.close()
    text = path.read_text().splitlines()
    assert text == ["step,loss,extra", "10,1.0,", "20,2.0,", "30,9.0,x"]
    fresh = CsvLog(path, ["step", "loss"])  # no resume: the old rows go
    fresh.close()
    assert path.read_text().splitlines() == ["step,loss"]


def test_resumed_progress_of_a_fresh_and_of_a_restored_run(tmp_path):
    with pytest.warns(UserWarning, match="no checkpoint"):
        assert resumed_progress(None, 10, tmp_path) == (0, None, 0.0, (0.0, 0))
    restored = (40, {"total_steps": 100, "seconds": 12.5, "window_loss": [3.0, 2]})
    with pytest.warns(UserWarning, match="100-step run: steps=10 ignored"):
        assert resumed_progress(restored, 10, tmp_path) == (40, 100, 12.5, (3.0, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same length, or a rank that does not write: no warning
        assert resumed_progress(restored, 100, tmp_path) == (40, 100, 12.5, (3.0, 2))
        assert resumed_progress(restored, 10, tmp_path, warn=False)[1] == 100
