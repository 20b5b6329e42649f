"""The dVAE training loop: outputs, deterministic batches, evaluation, exact resume, budgets."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from dalle.config import get_preset
from dalle.data.shapes import ShapesDataset
from dalle.dvae import DiscreteVAE
from dalle.training.dvae import (batch_for_step, diagnose_dvae, evaluate_dvae, fixed_images, reconstruct, schedules,
                                 train_dvae)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(quantizer: str = "gumbel"):
    cfg = get_preset("tiny")
    cfg.dvae.hidden_width = 8
    cfg.dvae.quantizer = quantizer
    cfg.train.dvae_batch = 4
    return cfg


@pytest.fixture(scope="module")
def data():
    return ShapesDataset("train", 64, seed=0), ShapesDataset("val", 16, seed=0)


def test_batches_depend_only_on_seed_and_step(data):
    train, _ = data
    a = batch_for_step(train, seed=1, step=5, batch_size=4, image_size=64)
    assert a.shape == (4, 3, 64, 64) and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, batch_for_step(train, seed=1, step=5, batch_size=4, image_size=64))
    assert not torch.equal(a, batch_for_step(train, seed=1, step=6, batch_size=4, image_size=64))
    assert not torch.equal(a, batch_for_step(train, seed=2, step=5, batch_size=4, image_size=64))


def test_schedules_scale_with_the_run():
    for total in (100, 10_000):
        start, end = schedules(0, total, 1e-3, 6.6), schedules(total, total, 1e-3, 6.6)
        assert start["temperature"] == pytest.approx(1.0) and end["temperature"] == pytest.approx(1 / 16)
        assert start["kl_weight"] == pytest.approx(0.0) and end["kl_weight"] == pytest.approx(6.6)
        assert end["lr"] == pytest.approx(1e-3 / 80)  # the paper's 1e-4 -> 1.25e-6
        # The paper's shares: temperature and KL weight reach their final values at 5% of the run.
        early = schedules(total // 40, total, 1e-3, 6.6)
        assert 1 / 16 < early["temperature"] < 1.0 and 0.0 < early["kl_weight"] < 6.6
        done = schedules(total // 20, total, 1e-3, 6.6)
        assert done["temperature"] == pytest.approx(1 / 16) and done["kl_weight"] == pytest.approx(6.6)
        mid = schedules(total // 2, total, 1e-3, 6.6)
        assert mid["temperature"] == pytest.approx(1 / 16) and 1e-3 / 80 < mid["lr"] < 1e-3
    # Cosine, not linear: half way through the anneal the temperature is the mean of its ends,
    # and a quarter of the way it has moved only 15% of the way.
    assert schedules(250, 10_000, 1e-3, 6.6)["temperature"] == pytest.approx((1 + 1 / 16) / 2)
    assert schedules(125, 10_000, 1e-3, 6.6)["temperature"] == pytest.approx(1 - (1 - 1 / 16) * 0.1464, rel=1e-3)


def test_training_writes_model_log_samples_and_checkpoints(tmp_path, data):
    train, val = data
    cfg = small_config()
    export = train_dvae(train, tmp_path, cfg, steps=6, log_every=1, sample_every=3, checkpoint_every=3,
                        eval_dataset=val, progress=False)
    assert export == tmp_path / "dvae"
    model = DiscreteVAE.from_pretrained(export)
    assert model.config == cfg.dvae
    rows = list(csv.DictReader(open(tmp_path / "logs" / "dvae.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(float(r["usage"]) > 0 and r["psnr"] for r in rows)
    assert rows[2]["eval_psnr"] and not rows[1]["eval_psnr"]
    assert (tmp_path / "samples" / "dvae_step000003.png").is_file()
    assert (tmp_path / "samples" / "dvae_step000006.png").is_file()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints" / "dvae").iterdir())
    assert ckpts == ["step_00000003", "step_00000006"]


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, data, quantizer):
    train, val = data
    cfg = small_config(quantizer)
    kw = dict(steps=10, log_every=2, sample_every=100, checkpoint_every=100, eval_dataset=val, progress=False)
    full = train_dvae(train, tmp_path / "full", cfg, **kw)
    train_dvae(train, tmp_path / "cut", cfg, stop_after=5, **kw)
    assert not (tmp_path / "cut" / "dvae").exists(), "an interrupted run must not export a model"
    resumed = train_dvae(train, tmp_path / "cut", cfg, resume=True, **kw)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # the training weights (not only the average) match too
    ca = load_file(str(tmp_path / "full" / "checkpoints" / "dvae" / "step_00000010" / "state.safetensors"))
    cb = load_file(str(tmp_path / "cut" / "checkpoints" / "dvae" / "step_00000010" / "state.safetensors"))
    for k in ca:
        if k.startswith("module."):
            assert torch.equal(ca[k], cb[k]), k
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "cut" / "logs" / "dvae.csv"))]
    assert steps == [1, 2, 4, 5, 6, 8, 10]  # the interrupted run's rows are kept, none duplicated (1: code use from the start)


def test_evaluate_dvae_reports_psnr_and_code_use(data):
    _, val = data
    torch.manual_seed(0)
    model = DiscreteVAE(small_config().dvae)
    stats = evaluate_dvae(model, val, n=8, batch=4)
    images = fixed_images(val, 8, 64)
    recon, tokens = reconstruct(model, images)
    mse = float((recon - images).pow(2).mean())
    assert stats["psnr"] == pytest.approx(-10 * torch.log10(torch.tensor(mse)).item(), rel=1e-5)
    assert stats["codebook_usage"] == pytest.approx(len(tokens.unique()) / 512)
    assert 1.0 <= stats["perplexity"] <= len(tokens.unique()) + 1e-4
    assert model.training  # evaluation restores the mode it found


def test_minutes_budget_becomes_a_fixed_step_count(tmp_path, data):
    train, val = data
    export = train_dvae(train, tmp_path, small_config(), minutes=0.03, log_every=1, sample_every=1000,
                        eval_dataset=val, progress=False)
    assert (export / "model.safetensors").is_file()
    last = sorted((tmp_path / "checkpoints" / "dvae").iterdir())[-1]
    total = json.loads((last / "state.json").read_text())["extra"]["total_steps"]
    assert total >= 1
    rows = list(csv.DictReader(open(tmp_path / "logs" / "dvae.csv")))
    assert 1 <= len(rows) <= total


def test_bad_arguments_are_named(tmp_path, data):
    train, _ = data
    with pytest.raises(ValueError, match="empty"):
        train_dvae([], tmp_path, small_config(), steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train_dvae(train, tmp_path, small_config(), steps=0, progress=False)


# --- validation split and fit report ------------------------------------------------------


def test_held_out_tail_is_logged_and_reported(tmp_path, data):
    train, _ = data  # 64 items: the last 12 are held out
    cfg = small_config("vq")
    train_dvae(train, tmp_path, cfg, steps=4, log_every=2, sample_every=2, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "logs" / "dvae.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "4"]
    assert not rows[0]["val_psnr"] and float(rows[0]["usage"]) > 0  # step 1: the batch's code use, no evaluation
    for r in rows[1:]:
        assert r["val_psnr"] == r["eval_psnr"] and r["val_usage"] == r["eval_usage"]  # older readers: validation
        assert float(r["val_psnr"]) > 0 and float(r["train_psnr"]) > 0 and float(r["mean_loss"]) > 0
    fit = json.loads((tmp_path / "logs" / "dvae_fit.json").read_text())
    assert (fit["train_items"], fit["val_items"], fit["step"]) == (52, 12, 4)
    assert fit["val_psnr"] == float(rows[-1]["val_psnr"]) and fit["tokens"] == 2 * 12 * 64
    # Four steps of a dVAE reconstruct nothing yet: the report must say so.
    assert "blurry" in {d["code"] for d in fit["diagnoses"]}


def test_loss_window_survives_a_resume_between_rows(tmp_path, data):
    train, val = data
    cfg = small_config("vq")
    kw = dict(steps=6, log_every=2, sample_every=100, checkpoint_every=3, eval_dataset=val, progress=False)
    train_dvae(train, tmp_path / "a", cfg, **kw)
    # A run killed after step 3 (checkpointed, no row there): its step-4 row averages steps 3 and 4.
    import shutil

    shutil.copytree(tmp_path / "a" / "logs", tmp_path / "b" / "logs")
    shutil.copytree(tmp_path / "a" / "checkpoints" / "dvae" / "step_00000003",
                    tmp_path / "b" / "checkpoints" / "dvae" / "step_00000003")
    train_dvae(train, tmp_path / "b", cfg, resume=True, **kw)
    rows = lambda p: [{k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
                      for r in csv.DictReader(open(p / "logs" / "dvae.csv"))]
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    assert all(r["mean_loss"] for r in rows(tmp_path / "a"))
    fit = lambda p: json.loads((p / "logs" / "dvae_fit.json").read_text())  # noqa: E731
    assert fit(tmp_path / "a") == fit(tmp_path / "b")


def dvae_codes(**figures) -> set[str]:
    figures = {"train_psnr": 30.0, "val_psnr": 29.5, "codes_used": 400, "tokens": 2048, "codebook_size": 512,
               **figures}
    found = diagnose_dvae(**figures)
    assert all(d.message for d in found)
    return {d.code for d in found}


def test_diagnose_dvae_quiet_on_a_healthy_run():
    assert dvae_codes() == set()
    assert dvae_codes(val_psnr=None) == set()


def test_diagnose_dvae_codebook_collapse():
    assert dvae_codes(codes_used=100) == {"codebook_collapse"}  # 20% of 512 on 2048 tokens
    assert dvae_codes(codes_used=150) == set()
    # 8 images of 64 tokens cannot show a healthy spread over 512 codes: no verdict.
    assert dvae_codes(codes_used=20, tokens=512) == set()


def test_diagnose_dvae_blurry_reconstructions():
    assert dvae_codes(train_psnr=18.5, val_psnr=18.0) == {"blurry"}
    assert dvae_codes(train_psnr=18.0, val_psnr=None) == {"blurry"}  # judged on training images then
    assert dvae_codes(train_psnr=21.0, val_psnr=20.5) == set()


def test_diagnose_dvae_memorising():
    assert dvae_codes(train_psnr=31.0, val_psnr=27.5) == {"memorising"}  # 3.5 dB: over twice the error
    assert dvae_codes(train_psnr=31.0, val_psnr=29.0) == set()


def test_diagnose_dvae_judges_blur_against_the_data():
    # The case: above the fixed 20 dB line, yet blurry on its real images.
    found = diagnose_dvae(train_psnr=21.2, val_psnr=20.9, codes_used=511, tokens=16384, codebook_size=512,
                          edge_retention=0.5, baseline_psnr=11.5, grid=8, image_size=64)
    assert [d.code for d in found] == ["blurry"]
    assert "50% of the images' edges" in found[0].message and "finer token grid" in found[0].message
    assert "--set dvae.num_groups=3" in found[0].message and "16x16 tokens at 64 px" in found[0].message
    # Already at 4x down-sampling: a wider dVAE, not an even finer grid.
    found = diagnose_dvae(train_psnr=21.2, val_psnr=20.9, codes_used=900, tokens=65536, codebook_size=1024,
                          edge_retention=0.5, baseline_psnr=14.1, grid=16, image_size=64)
    assert "wider dVAE" in found[0].message and "finer token grid" not in found[0].message
    # Barely better than shrinking each image to the token grid: blurry, whatever the dB.
    assert dvae_codes(val_psnr=24.0, train_psnr=24.2, baseline_psnr=22.0, edge_retention=0.9) == {"blurry"}
    # Sharp: edges kept and well above the baseline.
    assert dvae_codes(val_psnr=27.5, train_psnr=27.8, baseline_psnr=14.0, edge_retention=0.82) == set()


def test_reconstruction_figures_measure_edges_and_the_grid_baseline():
    from dalle.training.dvae import edge_retention, grid_baseline

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(4, 3, 32, 32, generator=g) > 0.5).float()  # sharp edges everywhere
    assert edge_retention(images, images) == pytest.approx(1.0)
    assert edge_retention(torch.full_like(images, 0.5), images) == pytest.approx(0.0)
    blurred = grid_baseline(images, 8)
    assert blurred.shape == images.shape and edge_retention(blurred, images) < 0.3
    noisy = (images + 0.05 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    assert edge_retention(noisy, images) > 0.9  # noise does not pass for detail, nor hide it
