"""Reading released PyTorch pickles without running code from them."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from dalle.convert.safe_pickle import PickledObject, UnsafeFileError, module_tensors, read_torch_file

MODULES = ("torch.nn.modules.",)


def small_module() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Sequential(nn.Linear(4, 2)))
    model[1].running_mean.normal_()
    return model


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_pickled_module_gives_its_state_dict(tmp_path, zip_format):
    model = small_module()
    torch.save(model, tmp_path / "m.pt", _use_new_zipfile_serialization=zip_format)
    obj = read_torch_file(tmp_path / "m.pt", MODULES)
    assert isinstance(obj, PickledObject) and obj.qualname == "torch.nn.modules.container.Sequential"
    tensors = module_tensors(obj)
    expected = model.state_dict()
    assert list(tensors) == list(expected)
    for name, t in expected.items():
        assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t), name


@pytest.mark.parametrize("zip_format", [True, False])
def test_dtypes_views_and_containers_survive(tmp_path, zip_format):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    data = {
        "view": base[1:, ::2],  # offset and strides into a shared storage
        "base": base,
        "half": torch.randn(3).half(),
        "bf16": torch.randn(3).bfloat16(),
        "long": torch.tensor([1, -2, 3]),
        "bool": torch.tensor([True, False]),
        "meta": [1, 2.5, "x", (3, None), {"k": {4, 5}}],
        "empty": torch.empty(0, 3),
    }
    torch.save(data, tmp_path / "d.pt", _use_new_zipfile_serialization=zip_format)
    back = read_torch_file(tmp_path / "d.pt")
    for key in ("view", "base", "half", "bf16", "long", "bool", "empty"):
        assert back[key].dtype == data[key].dtype and torch.equal(back[key], data[key]), key
    assert back["meta"] == data["meta"]


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, zip_format):
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "x": _RunsACommand(marker)}, tmp_path / "evil.pt", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeFileError, match=r"refers to (posix|os)\.system.*refusing"):
        read_torch_file(tmp_path / "evil.pt", MODULES)
    assert not marker.exists()


def test_classes_outside_the_expected_kinds_are_refused(tmp_path):
    torch.save(small_module(), tmp_path / "m.pt")
    with pytest.raises(UnsafeFileError, match=r"torch\.nn\.modules\.container\.Sequential"):
        read_torch_file(tmp_path / "m.pt", ("dall_e.",))


def test_files_that_are_not_torch_pickles_are_named(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(UnsafeFileError, match="neither a PyTorch zip archive nor a PyTorch pickle"):
        read_torch_file(tmp_path / "a.txt")
    with zipfile.ZipFile(tmp_path / "b.zip", "w") as z:
        z.writestr("x/readme", "hi")
    with pytest.raises(UnsafeFileError, match="not a PyTorch archive"):
        read_torch_file(tmp_path / "b.zip")
    with pytest.raises(UnsafeFileError, match="does not exist"):
        read_torch_file(tmp_path / "missing.pt")


def test_a_truncated_file_is_named(tmp_path):
    torch.save({"w": torch.ones(100)}, tmp_path / "w.pt", _use_new_zipfile_serialization=False)
    raw = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "w.pt").write_bytes(raw[:-50])
    with pytest.raises(UnsafeFileError, match="truncated"):
        read_torch_file(tmp_path / "w.pt")


def test_torchscript_archives_are_read_from_their_records(tmp_path):
    model = small_module().eval()
    scripted = torch.jit.trace(model, torch.randn(2, 3, 3, 3))
    torch.jit.save(scripted, str(tmp_path / "m.pt"))
    obj = read_torch_file(tmp_path / "m.pt", ("__torch__.",))
    tensors = module_tensors(obj)
    for name, t in model.state_dict().items():
        assert torch.equal(tensors[name], t), name


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path):
    torch.save({"w": torch.arange(10.0)}, tmp_path / "w.pt")
    with zipfile.ZipFile(tmp_path / "w.pt") as z:
        records = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in records if n.endswith("/data/0"))
    records[name] = records[name][:16]  # 4 of the 10 floats left
    with zipfile.ZipFile(tmp_path / "short.pt", "w") as z:
        for n, data in records.items():
            z.writestr(n, data)
    with pytest.raises(UnsafeFileError, match="shorter than its 10 elements|reaches past its storage"):
        read_torch_file(tmp_path / "short.pt")
