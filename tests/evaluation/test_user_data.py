"""The measures of ``dalle eval --data``: SSIM, R-precision, nearest-neighbour distances."""

import pytest
import torch

from dalle.evaluation.user_data import copy_ratio, nearest_distances, r_precision, retrieval_r_at_1, ssim


def test_ssim_is_one_for_equal_images_and_drops_with_noise_and_blur():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g, dtype=torch.float64)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    flat = torch.full_like(x, 0.5)
    assert (ssim(noisy, x) < 0.9).all() and (ssim(flat, x) < ssim(noisy, x)).all()


def test_r_precision_and_retrieval_count_the_own_caption_first():
    text = torch.eye(5)
    images = torch.eye(5)
    assert retrieval_r_at_1(text, images) == 1.0
    assert r_precision(images, text, own=[0, 1, 2, 3, 4], pool=3, seed=0) == 1.0
    shuffled = images[[1, 2, 3, 4, 0]]  # every image looks like the next caption
    assert r_precision(shuffled, text, own=[0, 1, 2, 3, 4], pool=5, seed=0) == 0.0


def test_nearest_distances_find_copies():
    library = torch.rand(50, 12)
    copies = library[[3, 7]].clone()
    others = torch.rand(2, 12) + 2.0
    d = nearest_distances(torch.cat([copies, others]), library)
    assert d[:2].max() == pytest.approx(0.0, abs=1e-3) and (d[2:] > 1.0).all()


def test_copy_ratio_tells_a_copy_from_a_simple_image():
    g = torch.Generator().manual_seed(0)
    library = torch.rand(40, 48, generator=g)
    copy = library[5] + 0.01 * torch.randn(48, generator=g)
    blob = torch.full((48,), 0.5)  # near the middle of everything, a copy of nothing
    d = nearest_distances(torch.stack([copy, blob]), library, k=10)
    assert d.shape == (2, 10) and (d[:, 1:] >= d[:, :1]).all()
    ratio = copy_ratio(d)
    assert ratio[0] < 0.1 and ratio[1] > 0.7
