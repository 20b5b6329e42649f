"""``dalle train --dvae DIR``: a dVAE made elsewhere (e.g. converted from OpenAI's release) used as it is."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dalle.cli import main
from dalle.clip import CLIP
from dalle.config import DVAEConfig, get_preset
from dalle.dvae import DiscreteVAE
from dalle.io import file_sha256
from dalle.vqgan import VQGAN, VQGANConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["dvae", "vqgan"])
def dvae_folder(request, tmp_path_factory):
    """An image tokenizer unlike the tiny preset's: 32 px, 8x8 tokens over 64 codes (our dVAE, or a VQGAN)."""
    folder = tmp_path_factory.mktemp("parts") / "dvae"
    if request.param == "dvae":
        cfg = DVAEConfig(image_size=32, hidden_width=8, blocks_per_group=1, num_groups=3, codebook_size=64,
                         width_multipliers=(1, 2, 4), decoder_init_width=16)
        DiscreteVAE(cfg).save_pretrained(folder)
    else:
        cfg = VQGANConfig(image_size=32, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(8,),
                          z_channels=8, embed_dim=8, codebook_size=64, attn_resolution_base=32)
        VQGAN(cfg).save_pretrained(folder)
    return folder


def test_train_transformer_on_a_given_image_tokenizer_never_trains_it(dvae_folder, tmp_path, capsys):
    out = tmp_path / "model"
    common = ["--data", "shapes", "--out", str(out), "--preset", "tiny"]
    assert main(["train", "tokenizer", *common]) == 0
    clip_config = dataclasses.replace(get_preset("tiny").clip, image_size=32)  # reads the tiny tokenizer's ids
    CLIP(clip_config).save_pretrained(tmp_path / "clip")
    assert main(["train", "transformer", *common, "--steps", "2", "--dvae", str(dvae_folder),
                 "--clip", str(tmp_path / "clip")]) == 0
    config = json.loads((out / "dalle.json").read_text())
    saved = json.loads((dvae_folder / "config.json").read_text())
    saved.pop("checksums", None)  # of the export's files, not a config field
    if "architecture" not in saved:  # our dVAE: its config is the dvae section (a VQGAN's states its grid there)
        assert config["dvae"] == saved
    assert (config["transformer"]["image_vocab"], config["transformer"]["image_grid"]) == (64, 8)
    assert config["clip"]["image_size"] == 32 and config["train"]["pretrained_dvae"] == "folder"
    assert config["train"]["pretrained_clip"] == "folder" and (out / "clip" / "model.safetensors").is_file()
    assert file_sha256(out / "dvae" / "model.safetensors") == file_sha256(dvae_folder / "model.safetensors")
    capsys.readouterr()
    # The folder now says its dVAE is not trained here: training it is refused, `all` skips it.
    assert main(["train", "dvae", *common]) == 2
    assert "not trained here" in capsys.readouterr().err
    assert main(["train", "clip", *common]) == 2
    assert "not trained here" in capsys.readouterr().err
    assert main(["generate", "a red circle", "--model", str(out), "--candidates", "2", "--keep", "1",
                 "--out", str(tmp_path / "gen")]) == 0
    assert len(list((tmp_path / "gen").glob("*_r0.png"))) == 1
    rows = [json.loads(line) for line in (tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()]
    assert rows[0]["clip_score"] != 0.0  # reranked by the given CLIP


def test_a_preset_on_the_released_dvae_asks_for_it(tmp_path, capsys):
    cfg = get_preset("paper-openai-dvae")
    cfg.check()
    assert (cfg.dvae.image_size, cfg.dvae.grid_size, cfg.dvae.codebook_size, cfg.dvae.decoder_init_width) == (256, 32, 8192, 128)
    assert cfg.train.pretrained_dvae == "openai-dvae"
    assert main(["train", "transformer", "--data", "shapes", "--out", str(tmp_path / "m"),
                 "--preset", "paper-openai-dvae"]) == 2
    assert "dalle convert openai-dvae" in capsys.readouterr().err
    assert main(["train", "transformer", "--data", "shapes", "--out", str(tmp_path / "m"),
                 "--dvae", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
