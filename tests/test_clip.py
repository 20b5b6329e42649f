"""The reranking CLIP: shapes, normalisation, loss, scoring, persistence, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from dalle.clip import CLIP, MAX_LOGIT_SCALE
from dalle.config import CLIPConfig
from dalle.io import ModelLoadError

BPE = 20  # ids [0, 20) are words; [20, 20 + LEN) are the per-position pads
LEN = 6


def tiny_config(**overrides) -> CLIPConfig:
    fields = dict(text_vocab=BPE + LEN, text_len=LEN, text_layers=1, text_width=32, text_heads=2,
                  image_size=16, patch_size=4, image_layers=1, image_width=32, image_heads=2, embed_dim=24)
    fields.update(overrides)
    return CLIPConfig(**fields)


def padded(rows: list[list[int]]) -> torch.Tensor:
    """Word ids followed by the per-position pads, as the tokenizer lays them out."""
    return torch.tensor([row + [BPE + i for i in range(len(row), LEN)] for row in rows])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model() -> CLIP:
    torch.manual_seed(0)
    return CLIP(tiny_config())


def test_encoders_return_unit_vectors_of_embed_dim(model):
    text = padded([[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]])
    images = torch.rand(3, 3, 16, 16)
    t, i = model.encode_text(text), model.encode_image(images)
    assert t.shape == i.shape == (3, 24)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(i.norm(dim=-1), torch.ones(3))


def test_text_encoder_is_order_aware_and_ignores_nothing_real(model):
    a, b = model.encode_text(padded([[1, 2, 3], [3, 2, 1]]))
    assert not torch.allclose(a, b, atol=1e-4), "swapping words must change the text embedding"
    # An empty caption (all pads) still encodes.
    assert torch.isfinite(model.encode_text(padded([[]]))).all()


def test_text_embedding_does_not_depend_on_the_rest_of_the_batch(model):
    # Positions past the batch's longest caption are skipped; a short caption must
    # encode the same alone as beside a full-length one.
    short, full = padded([[4, 5]]), padded([[1, 2, 3, 4, 5, 6]])
    torch.testing.assert_close(model.encode_text(short)[0], model.encode_text(torch.cat([short, full]))[0])


def test_text_pools_at_last_real_token(model):
    # Causal attention + pooling at the last real token: the embedding must depend on
    # every real token, including the first one.
    first_changed = model.encode_text(padded([[1, 2, 3], [9, 2, 3]]))
    assert not torch.allclose(first_changed[0], first_changed[1], atol=1e-4)


def test_image_encoder_sees_position(model):
    # Same object, moved from the left half to the right half: a bag-of-patches encoder
    # without positions could not tell them apart.
    left = torch.zeros(1, 3, 16, 16)
    left[..., 4:8, 0:4] = 1.0
    right = torch.zeros(1, 3, 16, 16)
    right[..., 4:8, 12:16] = 1.0
    assert (model.encode_image(left) - model.encode_image(right)).abs().max() > 1e-3
    # ... and the position embeddings and the spatial read-out are what tell them apart:
    # without both, the encoder is a bag of patches.
    with torch.no_grad():
        model.image.position_embedding.zero_()
        assert (model.encode_image(left) - model.encode_image(right)).abs().max() > 1e-3
        model.image.spatial_readout.weight.zero_()
    torch.testing.assert_close(model.encode_image(left), model.encode_image(right))


def test_score_is_cosine_per_row_and_broadcasts_one_prompt(model):
    text = padded([[1, 2], [3, 4], [5]])
    images = torch.rand(3, 3, 16, 16)
    expected = (model.encode_text(text) * model.encode_image(images)).sum(-1)
    torch.testing.assert_close(model.score(text, images), expected)
    one = model.score(text[:1], images)
    assert one.shape == (3,)
    torch.testing.assert_close(one, model.encode_image(images) @ model.encode_text(text[:1])[0])
    assert (one.abs() <= 1 + 1e-5).all()


def test_loss_is_symmetric_infonce(model):
    text = padded([[1, 2], [3, 4], [5], [6, 7, 8]])
    images = torch.rand(4, 3, 16, 16)
    logits = model.logits(text, images)
    target = torch.arange(4)
    expected = (torch.nn.functional.cross_entropy(logits, target)
                + torch.nn.functional.cross_entropy(logits.t(), target)) / 2
    torch.testing.assert_close(model(text, images), expected)
    # Reordering the pairs together changes nothing.
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(model(text[perm], images[perm]), expected)


def test_positives_are_removed_from_the_contrast(model):
    # Items 0 and 1 are the same pair twice: without the mask the loss cannot go below
    # log 2 for them; with it they no longer count as each other's negatives.
    text = padded([[1, 2], [1, 2], [5]])
    image = torch.rand(1, 3, 16, 16)
    images = torch.cat([image, image, torch.rand(1, 3, 16, 16)])
    positives = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    logits = model.logits(text, images)
    masked = logits.masked_fill(positives & ~torch.eye(3, dtype=torch.bool), float("-inf"))
    target = torch.arange(3)
    expected = (torch.nn.functional.cross_entropy(masked, target)
                + torch.nn.functional.cross_entropy(masked.t(), target)) / 2
    torch.testing.assert_close(model(text, images, positives), expected)
    assert model(text, images, positives) < model(text, images)
    with pytest.raises(ValueError, match="positives"):
        model(text, images, positives[:2, :2])


def test_loss_decreases_on_a_tiny_batch(model):
    text = padded([[1, 2], [3, 4], [5], [6, 7, 8], [9, 1], [2, 2, 2]])
    images = torch.zeros(6, 3, 16, 16)
    for k in range(6):  # item k: a band of one primary colour in the top or bottom half
        images[k, k % 3, (k // 3) * 8:(k // 3) * 8 + 8, :] = 1.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = model(text, images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0] and losses[-1] < 0.8 * math.log(6), losses


def test_logit_scale_starts_at_clip_value_and_is_clamped(model):
    assert math.isclose(model.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) >> 100
    text = padded([[1], [2]])
    images = torch.rand(2, 3, 16, 16)
    cosine = model.encode_text(text) @ model.encode_image(images).t()
    torch.testing.assert_close(model.logits(text, images), MAX_LOGIT_SCALE * cosine)


def test_save_load_round_trip(model, tmp_path):
    text = padded([[1, 2, 3], [4]])
    images = torch.rand(2, 3, 16, 16)
    model.save_pretrained(tmp_path / "clip")
    assert (tmp_path / "clip" / "config.json").is_file()
    assert (tmp_path / "clip" / "model.safetensors").is_file()
    loaded = CLIP.from_pretrained(tmp_path / "clip")
    assert loaded.config == model.config
    assert not loaded.training
    model.eval()
    torch.testing.assert_close(loaded.score(text, images), model.score(text, images), rtol=0, atol=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_loading_weights_of_another_shape_names_the_tensors(model, tmp_path):
    CLIP(tiny_config(embed_dim=16)).save_pretrained(tmp_path / "other")
    # Swap in a config that disagrees with the stored weights.
    model.save_pretrained(tmp_path / "mine")
    (tmp_path / "other" / "config.json").replace(tmp_path / "mine" / "config.json")
    with pytest.raises(ModelLoadError, match="projection"):
        CLIP.from_pretrained(tmp_path / "mine")


@pytest.mark.parametrize(
    "text, images, error, message",
    [
        (padded([[1]])[:, :4], torch.rand(1, 3, 16, 16), ValueError, r"\[B, 6\]"),
        (torch.full((1, LEN), BPE + LEN), torch.rand(1, 3, 16, 16), ValueError, "tokenizer"),
        (padded([[1]]).float(), torch.rand(1, 3, 16, 16), TypeError, "integer"),
        (padded([[1]]), torch.rand(1, 3, 16, 16) * 255, ValueError, "255"),
        (padded([[1]]), torch.rand(1, 3, 32, 32), ValueError, r"\[B, 3, 16, 16\]"),
        (padded([[1]]), torch.rand(3, 16, 16), ValueError, "shape"),
        (padded([[1], [2]]), torch.rand(3, 3, 16, 16), ValueError, "caption"),
    ],
)
def test_bad_input_raises_a_clear_error(model, text, images, error, message):
    with pytest.raises(error, match=message):
        model(text, images) if text.shape[0] == images.shape[0] else model.score(text, images)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="patch_size"):
        CLIP(tiny_config(patch_size=5))
    with pytest.raises(ValueError, match="text_heads"):
        CLIP(tiny_config(text_heads=3))
