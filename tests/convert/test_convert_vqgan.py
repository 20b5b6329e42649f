"""A taming-transformers VQGAN -> our image tokenizer folder, checked against taming's own code.

The reference modules are taming-transformers' ``modules/diffusionmodules/model.py``
(Encoder, Decoder) and ``modules/vqvae/quantize.py`` (VectorQuantizer) from the PyPI
package ``taming-transformers==0.0.1`` (the ``reference`` extra, installed with --no-deps),
loaded from their files: the package's ``VQModel`` itself needs PyTorch Lightning, so the
test composes the same pieces as ``VQModel.encode``/``decode`` do and saves them the way
Lightning saves a checkpoint (a pickled dict with ``state_dict``, counters, callback state
and numpy scalars).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from dalle.cli import main
from dalle.convert import read_conversion
from dalle.convert.safe_pickle import UnsafeFileError
from dalle.dvae import load_image_tokenizer
from dalle.vqgan import VQGAN

pytestmark = pytest.mark.usefixtures("one_thread")

yaml = pytest.importorskip("yaml")

DDCONFIG = dict(double_z=False, z_channels=32, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[16], dropout=0.0)


def load_reference(relative: str):
    spec = importlib.util.find_spec("taming")
    path = Path(spec.submodule_search_locations[0]) / relative if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        pytest.skip("the reference extra: pip install --no-deps taming-transformers==0.0.1")
    loader = importlib.util.spec_from_file_location("taming_reference_" + Path(relative).stem, path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


class _ModelCheckpoint:
    """Stands for Lightning's ModelCheckpoint class, a key of a real checkpoint's ``callbacks``."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = load_reference("modules/diffusionmodules/model.py")
    quantize = load_reference("modules/vqvae/quantize.py")
    torch.manual_seed(0)
    parts = torch.nn.ModuleDict({
        "encoder": model.Encoder(**DDCONFIG), "decoder": model.Decoder(**DDCONFIG),
        "quantize": quantize.VectorQuantizer(64, 16, beta=0.25),
        "quant_conv": torch.nn.Conv2d(32, 16, 1), "post_quant_conv": torch.nn.Conv2d(16, 32, 1),
    }).eval()
    with torch.no_grad():  # GroupNorm starts at identity: move every tensor so a misplaced one shows
        for p in parts.parameters():
            p.add_(0.05 * torch.randn_like(p))
        parts["quantize"].embedding.weight.normal_()
    folder = tmp_path_factory.mktemp("taming")
    state = OrderedDict(parts.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)  # trained beside, not converted
    # Lightning's checkpoint layout, with a callback class key and numpy scalars as in released files.
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    if any(n in sys.modules for n in names):
        pytest.skip("a real pytorch_lightning is imported; this test fakes its module path")
    fakes = {n: types.ModuleType(n) for n in names}
    fakes[names[-1]].ModelCheckpoint = _ModelCheckpoint
    _ModelCheckpoint.__module__, _ModelCheckpoint.__qualname__ = names[-1], "ModelCheckpoint"
    sys.modules.update(fakes)
    try:
        torch.save({"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.0.8", "state_dict": state,
                    "callbacks": {_ModelCheckpoint: {"best_model_score": np.float64(0.25), "best_model_path": "x"}},
                    "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 4.5e-6}]}],
                    "lr_schedulers": []}, folder / "last.ckpt")
    finally:
        for n in names:
            del sys.modules[n]
    config = {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
                        "params": {"embed_dim": 16, "n_embed": 64, "ddconfig": DDCONFIG,
                                   "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}}}
    (folder / "model.yaml").write_text(yaml.safe_dump(config))
    return parts, folder


def reference_codes_and_images(parts, x):
    with torch.no_grad():
        h = parts["quant_conv"](parts["encoder"](x * 2 - 1))
        quant, _, info = parts["quantize"](h)
        codes = info[2].view(x.shape[0], h.shape[2], h.shape[3])
        out = parts["decoder"](parts["post_quant_conv"](quant))
        return codes, ((out + 1) / 2).clamp(0, 1)


def test_converted_vqgan_gives_taming_codes_and_reconstructions(reference, tmp_path, capsys):
    parts, folder = reference
    out = tmp_path / "vqgan"
    assert main(["convert", "vqgan", str(folder / "last.ckpt"), str(folder / "model.yaml"), "--out", str(out)]) == 0
    assert "converted vqgan" in capsys.readouterr().out
    ours = load_image_tokenizer(out)
    assert isinstance(ours, VQGAN) and ours.grid_size == 16 and ours.codebook_size == 64
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    codes, images = reference_codes_and_images(parts, x)
    assert codes.unique().numel() > 4
    assert torch.equal(ours.encode(x), codes)
    torch.testing.assert_close(ours.decode(codes), images, atol=1e-5, rtol=0)
    record = read_conversion(out)
    assert record["converted_from"] == "taming-vqgan" and record["sources"]["checkpoint"]["file"] == "last.ckpt"
    assert main(["info", "--model", str(out)]) == 0
    assert "converted from taming-vqgan" in capsys.readouterr().out


def test_other_vqgan_kinds_and_bad_files_are_named(reference, tmp_path):
    from dalle.convert.vqgan import convert_vqgan

    _, folder = reference
    gumbel = yaml.safe_load((folder / "model.yaml").read_text())
    gumbel["model"]["target"] = "taming.models.vqgan.GumbelVQ"
    (tmp_path / "gumbel.yaml").write_text(yaml.safe_dump(gumbel))
    with pytest.raises(UnsafeFileError, match="only taming.models.vqgan.VQModel converts"):
        convert_vqgan(folder / "last.ckpt", tmp_path / "gumbel.yaml", tmp_path / "a")
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.ckpt")
    with pytest.raises(UnsafeFileError, match="no state_dict"):
        convert_vqgan(tmp_path / "plain.ckpt", folder / "model.yaml", tmp_path / "b")
