"""The paper's crop/resize (no flip), determinism, batching and the reproducible loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dalle.data import (
    PAPER_CROP_SCALE,
    SHAPES_CROP_SCALE,
    FolderDataset,
    Sample,
    Skipped,
    collate_batch,
    eval_transform,
    make_generator,
    make_loader,
    to_tensor,
    train_transform,
)
from dalle.data.preprocess import random_crop_box


def gradient(width: int, height: int) -> Image.Image:
    """Red rises left to right, green top to bottom: any flip or transpose shows."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 60)], -1).astype(np.uint8), "RGB")


def test_output_is_float32_chw_in_unit_range():
    t = train_transform(gradient(90, 70), 32, generator=0)
    assert t.dtype == torch.float32 and t.shape == (3, 32, 32)
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    e = eval_transform(gradient(90, 70), 48)
    assert e.shape == (3, 48, 48) and e.is_contiguous()


def test_train_transform_is_reproducible_from_the_seed():
    im = gradient(120, 90)
    a = train_transform(im, 32, PAPER_CROP_SCALE, make_generator(7, 3, 1))
    b = train_transform(im, 32, PAPER_CROP_SCALE, make_generator(7, 3, 1))
    c = train_transform(im, 32, PAPER_CROP_SCALE, make_generator(7, 3, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crops_are_never_flipped():
    im = gradient(100, 80)
    for seed in range(40):
        t = train_transform(im, 24, PAPER_CROP_SCALE, seed)
        red_by_column = t[0].mean(0)
        green_by_row = t[1].mean(1)
        assert (red_by_column[1:] >= red_by_column[:-1]).all(), f"seed {seed}: flipped left-right"
        assert (green_by_row[1:] >= green_by_row[:-1]).all(), f"seed {seed}: flipped top-bottom"


def test_random_crop_box_respects_scale_and_bounds():
    g = make_generator(0)
    sides = []
    for _ in range(200):
        left, top, right, bottom = random_crop_box(200, 120, (0.75, 1.0), g)
        side = right - left
        assert side == bottom - top and 90 <= side <= 120
        assert 0 <= left and right <= 200 and 0 <= top and bottom <= 120
        sides.append(side)
    assert min(sides) <= 93 and max(sides) >= 117  # the range is actually used
    with pytest.raises(ValueError, match="crop_scale"):
        random_crop_box(10, 10, (0.0, 1.0), g)
    with pytest.raises(ValueError, match="crop_scale"):
        random_crop_box(10, 10, (0.9, 0.8), g)


def test_shapes_crop_scale_keeps_a_model_sized_image_exactly(shapes_dir):
    image = FolderDataset(shapes_dir)[0].image
    for seed in range(5):
        assert torch.equal(train_transform(image, 64, SHAPES_CROP_SCALE, seed), to_tensor(image))
    assert torch.equal(eval_transform(image, 64), to_tensor(image))


def test_eval_transform_takes_the_centre_square():
    im = gradient(100, 60)  # centre square: columns 20..79
    out = eval_transform(im, 60)
    expected = to_tensor(im)[:, :, 20:80]
    assert torch.equal(out, expected)
    # Shrinking averages (no aliasing): a 2x downscale of a flat image stays flat.
    flat = eval_transform(Image.new("RGB", (128, 128), (10, 200, 30)), 64)
    assert torch.allclose(flat, torch.tensor([10, 200, 30]).view(3, 1, 1) / 255.0, atol=1 / 255)


def test_collate_batch_picks_captions_reproducibly_and_drops_skipped():
    image = gradient(40, 40)
    caps = ["one", "two", "three"]
    samples = [Sample(image, caps, "a"), None, Skipped("b", "bad"), Sample(image, ["only"], "c")]
    images, captions = collate_batch(samples, 32, rng=5, training=True)
    assert images.shape == (2, 3, 32, 32) and captions[1] == "only" and captions[0] in caps
    again, captions2 = collate_batch(samples, 32, rng=5, training=True)
    assert torch.equal(images, again) and captions == captions2
    picked = {collate_batch(samples[:1], 8, rng=s)[1][0] for s in range(40)}
    assert picked == set(caps)  # a training step picks any of the captions
    _, eval_caps = collate_batch(samples, 32, rng=None, training=False)
    assert eval_caps == ["one", "only"]
    empty, none = collate_batch([None], 16, rng=0)
    assert empty.shape == (0, 3, 16, 16) and none == []


def test_loader_batches_depend_only_on_seed_and_step(shapes_dir):
    ds = FolderDataset(shapes_dir)
    first = list(make_loader(ds, 4, 32, seed=1, steps=3))
    assert len(first) == 3 and all(x.shape == (4, 3, 32, 32) for x, _ in first)
    resumed = list(make_loader(ds, 4, 32, seed=1, start_step=2, steps=1))
    assert torch.equal(resumed[0][0], first[2][0]) and resumed[0][1] == first[2][1]
    with_workers = list(make_loader(ds, 4, 32, seed=1, steps=3, num_workers=2))
    for (a, ca), (b, cb) in zip(first, with_workers):
        assert torch.equal(a, b) and ca == cb
    other = list(make_loader(ds, 4, 32, seed=2, steps=3))
    assert any(not torch.equal(a, b) for (a, _), (b, _) in zip(first, other))


def test_eval_loader_is_one_ordered_pass(shapes_dir):
    ds = FolderDataset(shapes_dir)
    batches = list(make_loader(ds, 4, 64, training=False))
    assert [len(c) for _, c in batches] == [4, 2]
    flat = torch.cat([x for x, _ in batches])
    for i in range(len(ds)):
        assert torch.equal(flat[i], to_tensor(ds[i].image))
        assert [c for _, cs in batches for c in cs][i] == ds[i].captions[0]
