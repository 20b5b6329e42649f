import json

import pytest
import torch
from torch import nn

from dalle.config import CLIPConfig
from dalle.io import ModelLoadError, load_module, save_module


class Toy(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.embed_dim, 2)


def test_round_trip_with_fp16_export(tmp_path):
    toy = Toy(CLIPConfig(embed_dim=8))
    save_module(tmp_path, toy, toy.config, dtype=torch.float16)
    loaded, config = load_module(tmp_path, Toy, CLIPConfig)
    assert config.embed_dim == 8 and loaded.proj.weight.dtype == torch.float32
    assert torch.allclose(loaded.proj.weight, toy.proj.weight.half().float())


def test_mismatched_weights_are_named(tmp_path):
    save_module(tmp_path, Toy(CLIPConfig(embed_dim=8)), CLIPConfig(embed_dim=8))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["embed_dim"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"mis-shaped tensors: proj.weight \(file \(2, 8\), model \(2, 4\)\)"):
        load_module(tmp_path, Toy, CLIPConfig)


def test_unknown_config_field_and_foreign_file(tmp_path):
    save_module(tmp_path, Toy(CLIPConfig(embed_dim=8)), CLIPConfig(embed_dim=8))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_experts"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unknown field.*n_experts"):
        load_module(tmp_path, Toy, CLIPConfig)
    save_module(tmp_path, Toy(CLIPConfig(embed_dim=8)), CLIPConfig(embed_dim=8))
    (tmp_path / "model.safetensors").write_bytes(b"PK\x03\x04 not safetensors")
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        load_module(tmp_path, Toy, CLIPConfig)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_module(tmp_path / "nope", Toy, CLIPConfig)
