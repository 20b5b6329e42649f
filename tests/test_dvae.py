"""The discrete VAE: shapes, gradients, both quantisers, the likelihood, persistence."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dalle.config import DVAEConfig, config_from_dict, config_to_dict
from dalle.dvae import (
    DiscreteVAE,
    EncoderBlock,
    VQ_DEAD_CODE_COUNT,
    logit_laplace_nll,
    map_pixels,
    unmap_pixels,
)
from dalle.io import ModelLoadError


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(quantizer: str = "gumbel", **kw) -> DVAEConfig:
    """16 px, three groups -> 4x4 grid of 32 codes."""
    base = dict(image_size=16, hidden_width=8, blocks_per_group=1, num_groups=3, codebook_size=32,
                quantizer=quantizer, code_dim=8, width_multipliers=(1, 2, 4))
    base.update(kw)
    return DVAEConfig(**base)


def images(b: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g)


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
def test_encode_decode_shapes_and_ranges(quantizer):
    torch.manual_seed(0)
    model = DiscreteVAE(tiny(quantizer)).eval()
    assert model.grid_size == 4 and model.codebook_size == 32
    tokens = model.encode(images(3))
    assert tokens.shape == (3, 4, 4) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 32
    out = model.decode(tokens)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_paper_preset_grid():
    cfg = DVAEConfig()  # the paper's: 256 px -> 32 x 32 tokens of 8192 codes
    assert (cfg.image_size, cfg.grid_size, cfg.codebook_size, cfg.hidden_width) == (256, 32, 8192, 256)


def test_bad_inputs_are_named():
    model = DiscreteVAE(tiny()).eval()
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        model.encode(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.encode(images() * 255)
    with pytest.raises(ValueError, match="divide uint8"):
        model.encode((images() * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, 4, 4\]"):
        model.decode(torch.zeros(2, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode(torch.full((1, 4, 4), 32, dtype=torch.long))
    with pytest.raises(ValueError, match="num_groups"):
        DiscreteVAE(tiny(width_multipliers=(1, 2)))
    with pytest.raises(ValueError, match="quantizer"):
        DiscreteVAE(tiny(quantizer="kmeans"))


def test_pixel_mapping_round_trip_and_range():
    x = torch.linspace(0, 1, 101)
    assert torch.allclose(map_pixels(x)[[0, -1]], torch.tensor([0.1, 0.9]))
    assert torch.allclose(unmap_pixels(map_pixels(x)), x, atol=1e-6)


def test_logit_laplace_is_a_density():
    # Integrates to ~1 over (0, 1) and is smallest (NLL) at sigmoid(loc).
    x = torch.linspace(1e-6, 1 - 1e-6, 400_001, dtype=torch.float64)
    loc, log_scale = torch.tensor(0.7, dtype=torch.float64), torch.tensor(math.log(0.3), dtype=torch.float64)
    density = torch.exp(-logit_laplace_nll(x, loc, log_scale))
    assert abs(float(torch.trapezoid(density, x)) - 1.0) < 1e-3
    assert abs(float(x[density.argmax()]) - float(torch.sigmoid(loc))) < 1e-3


def test_residual_gain_follows_the_paper():
    model = DiscreteVAE(tiny(blocks_per_group=2))
    blocks = [m for m in model.encoder.modules() if isinstance(m, EncoderBlock)]
    assert len(blocks) == 6 and all(b.post_gain == pytest.approx(1 / 36) for b in blocks)


def test_gumbel_gradients_reach_every_encoder_weight_and_kl_is_bounded():
    torch.manual_seed(0)
    model = DiscreteVAE(tiny()).train()
    out = model(images(), temperature=0.5, kl_weight=1.0)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # through the relaxed sample down to the first layer of the encoder
    assert model.encoder.net[0].weight.grad.abs().sum() > 0
    assert model.encoder.net[-1].weight.grad.abs().sum() > 0
    kl = float(out.metrics["kl"])
    assert 0.0 <= kl <= math.log(32) + 1e-5
    assert {"nll", "mse", "psnr", "perplexity", "usage"} <= set(out.metrics)


def test_gumbel_training_is_noisy_and_eval_is_deterministic():
    torch.manual_seed(0)
    model = DiscreteVAE(tiny())
    x = images()
    model.train()
    a, b = model(x, temperature=1.0).recon, model(x, temperature=1.0).recon
    assert not torch.equal(a, b)  # a fresh Gumbel sample each call
    model.eval()
    c, d = model(x).recon, model(x).recon
    assert torch.equal(c, d)
    assert torch.allclose(c, model.decode(model.encode(x)), atol=1e-6)  # eval forward = hard codes


def test_kl_weight_pulls_the_posterior_towards_uniform():
    torch.manual_seed(0)
    model = DiscreteVAE(tiny()).train()
    x = images()
    base = model(x, temperature=1.0, kl_weight=0.0)
    torch.manual_seed(1)
    with_kl = model(x, temperature=1.0, kl_weight=10.0)
    kl_term = float(with_kl.loss.detach() - with_kl.metrics["nll"])
    # loss = nll + beta * (KL summed over the grid) / (3 H W), averaged over the batch
    assert kl_term == pytest.approx(10.0 * float(with_kl.metrics["kl"]) * 16 / (3 * 16 * 16), rel=1e-4)
    assert float(base.loss.detach() - base.metrics["nll"]) == 0.0


def test_vq_straight_through_and_commitment():
    torch.manual_seed(0)
    model = DiscreteVAE(tiny("vq")).train()
    out = model(images())
    out.loss.backward()
    # the straight-through estimator passes the decoder's gradient on to the encoder
    assert model.encoder.net[0].weight.grad.abs().sum() > 0
    assert model.encoder.net[-1].weight.grad.abs().sum() > 0
    encoder_grad = model.encoder.net[-1].weight.grad.clone()
    model.zero_grad()
    model.decoder.requires_grad_(False)
    model(images()).loss.backward()  # commitment alone (the decoder is frozen but still passes gradient)
    assert not torch.equal(model.encoder.net[-1].weight.grad, encoder_grad)
    assert float(out.metrics["commitment"]) > 0
    assert not any(n.startswith("quantizer") for n, _ in model.named_parameters())  # codebook is not a parameter


def test_vq_ema_update_moves_codes_to_their_assigned_means():
    torch.manual_seed(0)
    model = DiscreteVAE(tiny("vq"))
    q = model.quantizer
    z = torch.randn(64, 8)
    tokens = q.nearest(z)
    used = tokens.unique()
    before = q.embed.clone()
    q.decay = 0.0  # one update with no memory: a used code becomes the mean of its vectors
    q.update_codebook(z, tokens)
    for k in used.tolist():
        assert torch.allclose(q.embed[k], z[tokens == k].mean(0), atol=1e-5)
    unused = torch.ones(32, dtype=torch.bool)
    unused[used] = False
    assert not torch.allclose(q.embed[unused], before[unused])  # dead (count 0) codes were restarted


def test_vq_dead_codes_are_restarted_from_batch_outputs():
    torch.manual_seed(0)
    model = DiscreteVAE(tiny("vq")).train()
    q = model.quantizer
    dead = torch.tensor([3, 7, 11])
    q.ema_count[dead] = VQ_DEAD_CODE_COUNT / 10
    q.embed[dead] = 1e6  # far away: never chosen, so they stay dead until restarted
    q.ema_sum[dead] = q.embed[dead] * q.ema_count[dead, None]
    x = images()
    with torch.no_grad():
        z = model.encoder(map_pixels(x)).permute(0, 2, 3, 1).reshape(-1, 8)
    model(x)
    for k in dead.tolist():
        assert q.embed[k].abs().max() < 1e3, "dead code kept its old value"
        # the restarted code is (up to the EMA of its first batch) one of this batch's encoder outputs
        assert torch.cdist(q.embed[k][None], z).min() < 1e-3
    # a live code is not restarted
    assert int((q.ema_count < VQ_DEAD_CODE_COUNT).sum()) == 0


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
def test_save_load_round_trip(tmp_path, quantizer):
    torch.manual_seed(0)
    model = DiscreteVAE(tiny(quantizer)).train()
    model(images())  # moves the VQ codebook buffers away from their initial values
    model.eval()
    model.save_pretrained(tmp_path / "dvae")
    loaded = DiscreteVAE.from_pretrained(tmp_path / "dvae")
    assert loaded.config == model.config
    x = images(seed=3)
    assert torch.equal(loaded.encode(x), model.encode(x))
    t = model.encode(x)
    assert torch.equal(loaded.decode(t), model.decode(t))


def test_loading_a_mismatched_folder_names_the_problem(tmp_path):
    DiscreteVAE(tiny()).save_pretrained(tmp_path / "a")
    cfg = tiny(codebook_size=64)
    (tmp_path / "a" / "config.json").write_text(__import__("json").dumps(config_to_dict(cfg)))
    with pytest.raises(ModelLoadError, match="mis-shaped"):
        DiscreteVAE.from_pretrained(tmp_path / "a")


def test_config_json_round_trip_keeps_tuples():
    cfg = tiny(width_multipliers=(1, 3, 4))
    data = __import__("json").loads(__import__("json").dumps(config_to_dict(cfg)))
    back = config_from_dict(DVAEConfig, data)
    assert back == cfg and isinstance(back.width_multipliers, tuple)
    assert dataclasses.replace(back).grid_size == 4


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
def test_a_few_steps_reduce_the_loss(quantizer):
    torch.manual_seed(0)
    model = DiscreteVAE(tiny(quantizer)).train()
    x = torch.zeros(8, 3, 16, 16)  # coloured squares on black: learnable, unlike noise
    for i in range(8):
        x[i, :, 2 + i : 8 + i, 4:12] = torch.rand(3, 1, 1, generator=torch.Generator().manual_seed(i))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        torch.manual_seed(1)  # the same Gumbel noise each step: a deterministic objective
        out = model(x, temperature=0.5, kl_weight=0.1)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))
    assert losses[-1] < losses[0] - 0.2, losses[::8]


def test_initialisation_is_the_released_dvaes():
    model = DiscreteVAE(tiny(hidden_width=16))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(float(c.bias.abs().max()) == 0.0 for c in convs)
    big = max(convs, key=lambda c: c.weight.numel())  # enough weights for a stable estimate
    fan_in = big.weight[0].numel()
    assert float(big.weight.std()) == pytest.approx(fan_in**-0.5, rel=0.1)


def test_straight_through_feeds_one_hot_codes_and_still_trains_the_encoder():
    torch.manual_seed(0)
    model = DiscreteVAE(tiny(straight_through=True)).train()
    logits = torch.randn(2, 32, 4, 4, requires_grad=True)
    codes, _, _ = model.quantizer(logits, temperature=0.5)
    assert torch.equal(codes.detach().sum(1), torch.ones(2, 4, 4))
    assert set(codes.detach().unique().tolist()) == {0.0, 1.0}
    (codes * torch.randn_like(codes)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_mse_reconstruction_term_is_the_pixel_mse():
    torch.manual_seed(0)
    model = DiscreteVAE(tiny(recon_loss="mse")).eval()
    x = images()
    out = model(x)
    assert float(out.metrics["nll"]) == pytest.approx(float(out.metrics["mse"]), rel=1e-4)
    assert float(out.loss) == pytest.approx(float(out.metrics["nll"]), rel=1e-6)  # beta 0 by default


# --- The released dVAE's layout --------------------------------------------------------------


def test_paper_layout_is_the_released_dvaes():
    with torch.device("meta"):  # shapes only: no 8192-channel weights allocated
        model = DiscreteVAE(DVAEConfig())
    first, last = model.decoder.net[0], model.encoder.net[-1]
    assert tuple(first.weight.shape) == (128, 8192, 1, 1)  # one-hot codes -> n_init = 128
    assert tuple(last.weight.shape) == (8192, 2048, 1, 1)  # 8 x 256 channels -> logits
    assert tuple(model.decoder.net[-1].weight.shape) == (6, 256, 1, 1)  # logit-Laplace loc, log-scale
    assert tuple(model.decoder.net[1].id_path.weight.shape) == (2048, 128, 1, 1)
    blocks = [m for m in model.modules() if hasattr(m, "post_gain")]
    assert len(blocks) == 16 and all(b.post_gain == 1 / 8**2 for b in blocks)


def test_a_folder_written_before_decoder_init_width_keeps_its_layout():
    data = config_to_dict(tiny())
    del data["decoder_init_width"]  # as in folders written before the field existed
    old = config_from_dict(DVAEConfig, data)
    assert old.decoder_init_width == 0 and tiny().decoder_init_width == 128
    first = DiscreteVAE(old).decoder.net[0]
    assert first.out_channels == 32  # straight to the first decoder group (8 x 4)
    assert DiscreteVAE(tiny()).decoder.net[0].out_channels == 128


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
def test_decoder_init_width_narrower_than_the_first_group(quantizer):
    model = DiscreteVAE(tiny(quantizer, decoder_init_width=8)).eval()
    assert model.decoder.net[1].id_path.weight.shape[:2] == (32, 8)
    out = model.decode(model.encode(images(2)))
    assert out.shape == (2, 3, 16, 16)


def test_parameters_map_one_to_one_onto_the_released_dvae():
    """Same tensors, same shapes, same order as OpenAI's ``dall_e`` Encoder and Decoder."""
    dall_e = pytest.importorskip("dall_e", reason="the reference extra (pip install --no-deps DALL-E==0.1)")
    cfg = DVAEConfig(image_size=32, hidden_width=64, blocks_per_group=1, codebook_size=512)
    ours = DiscreteVAE(cfg)
    ref_enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    ref_dec = dall_e.Decoder(n_init=128, n_hid=64, n_blk_per_group=1, vocab_size=512)
    for mine, theirs in ((ours.encoder, ref_enc), (ours.decoder, ref_dec)):
        assert [tuple(p.shape) for p in mine.parameters()] == [tuple(p.shape) for p in theirs.parameters()]
