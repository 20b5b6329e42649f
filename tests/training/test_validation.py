"""The validation split every stage shares, and the fit report's file: rules, batches, JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from dalle.config import TrainConfig
from dalle.training import clip as clip_loop
from dalle.training import dvae as dvae_loop
from dalle.training.state import Diagnosis, holdout, spread, validation_split, write_fit_report


@given(n=st.integers(0, 2_000_000), fraction=st.floats(0.0, 0.49), floor=st.integers(0, 64),
       cap=st.integers(0, 4096))
def test_split_is_a_tail_within_its_bounds(n, fraction, floor, cap):
    n_train, val = validation_split(n, fraction, floor, cap)
    assert val == range(n_train, n)  # the tail: the token cache's tail is the data set's
    assert len(val) <= cap
    if val:
        assert n_train >= 1 and len(val) >= 4
        assert len(val) >= min(math.ceil(fraction * n), cap)  # at least the fraction, up to the cap
    if fraction == 0:
        assert not val


@pytest.mark.parametrize("n, held_out", [(0, 0), (5, 0), (19, 0), (20, 4), (24, 4), (80, 16), (300, 16),
                                         (1000, 20), (10_000, 200), (50_000, 256), (10**7, 256)])
def test_default_split_sizes(n, held_out):
    cfg = TrainConfig()
    n_train, val = validation_split(n, cfg.val_fraction, cfg.val_min, cfg.val_max)
    assert (n_train, len(val)) == (n - held_out, held_out)


def test_split_arguments_are_checked():
    with pytest.raises(ValueError, match="val_fraction"):
        validation_split(100, 0.6)
    with pytest.raises(ValueError, match="val_min and val_max"):
        validation_split(100, 0.1, -1, 10)


def test_holdout_warns_on_tiny_sets_and_takes_an_explicit_count():
    cfg = TrainConfig()
    with pytest.warns(UserWarning, match="too few to hold any out"):
        assert holdout(12, cfg, stage="dvae") == (12, range(12, 12))
    assert holdout(12, cfg, val_items=3) == (9, range(9, 12))
    with pytest.raises(ValueError, match="at least one training item"):
        holdout(12, cfg, val_items=12)
    cfg.val_fraction = 0.0  # turned off on purpose: no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert holdout(12, cfg) == (12, range(12, 12))


def test_spread_covers_the_training_part_evenly():
    assert spread(10, 5) == [0, 2, 4, 6, 8]
    assert spread(3, 8) == [0, 1, 2]
    assert spread(100, 4) == [0, 25, 50, 75]


@dataclass
class Item:
    image: Image.Image
    captions: list[str]


class Recording(list):
    """A data set that remembers which items were read."""

    def __init__(self, items):
        super().__init__(items)
        self.read: list[int] = []

    def __getitem__(self, index):
        self.read.append(index)
        return super().__getitem__(index)


def items(n: int) -> Recording:
    return Recording([Item(Image.new("RGB", (16, 16), (i, 0, 0)), [f"item {i}"]) for i in range(n)])


def test_dvae_and_clip_batches_never_draw_the_held_out_tail():
    data = items(30)
    for step in range(40):
        dvae_loop.batch_for_step(data, 0, step, 8, 16, n_train=24)
        clip_loop.draw_batch(data, 8, 0, step, n_train=24)
    assert set(data.read) == set(range(24))


def test_fit_report_file_and_printout(tmp_path):
    lines: list[str] = []
    path = write_fit_report(tmp_path, "dvae", "PSNR 30 dB", {"val_psnr": float("nan"), "steps": [1, 2]},
                            [Diagnosis("blurry", "dVAE reconstructions blurry")], echo=lines.append)
    assert path == tmp_path / "logs" / "dvae_fit.json"
    report = json.loads(path.read_text())  # strict JSON: NaN written as null
    assert report == {"stage": "dvae", "summary": "PSNR 30 dB", "val_psnr": None, "steps": [1, 2],
                      "diagnoses": [{"code": "blurry", "message": "dVAE reconstructions blurry"}]}
    assert lines[0] == "[dvae] fit: PSNR 30 dB" and "blurry" in lines[1]
    lines.clear()
    write_fit_report(tmp_path, "clip", "fine", {}, [], echo=lines.append)
    assert "no sign of memorising" in lines[1]


def test_dvae_reconstruction_figures_pool_pixels_and_count_codes():
    from dalle.config import get_preset
    from dalle.data.shapes import ShapesDataset
    from dalle.dvae import DiscreteVAE

    cfg = get_preset("tiny").dvae
    cfg.hidden_width = 8
    torch.manual_seed(0)
    model = DiscreteVAE(cfg)
    data = ShapesDataset("val", 6, seed=0)
    figures = dvae_loop.reconstruction_figures(model, data, [1, 3, 5], batch=2)
    images = dvae_loop.images_at(data, [1, 3, 5], 64)
    recon, tokens = dvae_loop.reconstruct(model, images)
    mse = float((recon - images).pow(2).mean())
    assert figures["psnr"] == pytest.approx(-10 * math.log10(mse), rel=1e-5)
    assert figures["counts"].sum() == tokens.numel() and figures["usage"] == len(tokens.unique()) / 512
    assert model.training
