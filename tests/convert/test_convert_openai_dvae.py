"""OpenAI's released dVAE -> our dVAE folder, checked against the ``dall_e`` package itself.

The reference is built with random weights from OpenAI's own code (the ``reference`` test
extra: ``pip install --no-deps DALL-E==0.1`` plus attrs and requests), saved the way its
authors saved theirs (``torch.save`` of each whole module), converted, and compared.
"""

from __future__ import annotations

import json

import pytest
import torch

from dalle.cli import main
from dalle.convert import read_conversion
from dalle.convert.safe_pickle import UnsafeFileError
from dalle.dvae import DiscreteVAE

dall_e = pytest.importorskip("dall_e", reason="the reference extra: pip install --no-deps DALL-E==0.1 attrs requests")

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE = 32  # the released modules take any size divisible by 8; small keeps the test fast


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A small released-layout pair (the package's minimum widths) with random weights, pickled."""
    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=2, vocab_size=512)
    dec = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=2, vocab_size=512)
    with torch.no_grad():  # the released initialisation has zero biases: make every tensor matter
        for p in [*enc.parameters(), *dec.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("released")
    torch.save(enc, folder / "encoder.pkl")
    torch.save(dec, folder / "decoder.pkl")
    return enc.eval(), dec.eval(), folder


def reference_codes_and_images(enc, dec, x):
    with torch.no_grad():
        logits = enc(dall_e.map_pixels(x))
        codes = logits.argmax(dim=1)
        one_hot = torch.nn.functional.one_hot(codes, enc.vocab_size).permute(0, 3, 1, 2).float()
        stats = dec(one_hot).float()
        return codes, dall_e.unmap_pixels(torch.sigmoid(stats[:, :3]))


def test_converted_dvae_gives_the_released_codes_and_reconstructions(released, tmp_path, capsys):
    enc, dec, folder = released
    out = tmp_path / "dvae"
    assert main(["convert", "openai-dvae", str(folder / "encoder.pkl"), str(folder / "decoder.pkl"),
                 "--out", str(out), "--image-size", str(IMAGE)]) == 0
    assert "converted openai-dvae" in capsys.readouterr().out
    model = DiscreteVAE.from_pretrained(out)
    cfg = model.config
    assert (cfg.quantizer, cfg.recon_loss, cfg.hidden_width, cfg.decoder_init_width, cfg.codebook_size) == (
        "gumbel", "logit_laplace", 64, 32, 512)
    x = torch.rand(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    codes, images = reference_codes_and_images(enc, dec, x)
    assert codes.unique().numel() > 4  # the comparison means something
    assert torch.equal(model.encode(x), codes)
    torch.testing.assert_close(model.decode(codes), images, atol=1e-5, rtol=0)
    record = read_conversion(out)
    assert record["converted_from"] == "openai-dvae"
    assert record["sources"]["encoder"]["file"] == "encoder.pkl" and len(record["sources"]["decoder"]["sha256"]) == 64
    assert main(["info", "--model", str(out)]) == 0
    assert "dvae: converted from openai-dvae: encoder encoder.pkl" in capsys.readouterr().out


def test_the_pair_must_match_and_be_the_released_classes(released, tmp_path, capsys):
    enc, dec, folder = released
    with pytest.raises(UnsafeFileError, match="not the released dall_e.encoder.Encoder"):
        from dalle.convert.openai_dvae import convert_openai_dvae

        convert_openai_dvae(folder / "decoder.pkl", folder / "decoder.pkl", tmp_path / "x", image_size=IMAGE)
    other = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)
    torch.save(other, tmp_path / "other.pkl")
    assert main(["convert", "openai-dvae", str(folder / "encoder.pkl"), str(tmp_path / "other.pkl"),
                 "--out", str(tmp_path / "y")]) == 2
    assert "n_blk_per_group=2 but decoder n_blk_per_group=1" in capsys.readouterr().err
    assert main(["convert", "openai-dvae", str(tmp_path / "nope.pkl"), str(folder / "decoder.pkl"),
                 "--out", str(tmp_path / "z")]) == 2
    assert "does not exist" in capsys.readouterr().err
