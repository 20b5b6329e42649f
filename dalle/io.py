"""Saving and loading model folders: a JSON config beside safetensors weights.

A component folder holds ``config.json`` (its config dataclass) and
``model.safetensors``.  Loading needs nothing from the user: the config says
how to build the module, and every mismatch between the file and the module is
reported by name.  No pickle is read or written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dalle.config import ConfigError, load_config, save_config

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

M = TypeVar("M", bound=nn.Module)
C = TypeVar("C")


class ModelLoadError(RuntimeError):
    """A model folder that cannot be loaded; the message names what is wrong."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename ``tmp`` over ``path``, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as safetensors atomically (contiguous CPU copies)."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({e}); re-export or retrain it") from None


def _unique_state(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied weights): keep the first name of each tensor.
    seen: set[int] = set()
    out = {}
    for name, t in module.state_dict().items():
        key = t.data_ptr() if t.numel() else id(t)
        if key in seen and t.numel():
            continue
        seen.add(key)
        out[name] = t
    return out


def save_module(folder: str | Path, module: nn.Module, config: Any, dtype: torch.dtype | None = None) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors``.

    ``dtype`` (e.g. ``torch.float16``) casts floating-point tensors for a smaller export;
    loading casts them back to the module's dtype.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = _unique_state(module)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    # One metadata key only: safetensors writes the metadata map in a random order per
    # process, so two keys would make the same weights hash differently from run to run
    # (the token cache is keyed by the dVAE file's SHA-256).
    save_tensors(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write(folder / CONFIG_NAME, lambda tmp: save_config(config, tmp))
    return folder


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`ModelLoadError` listing missing, unexpected and mis-shaped tensors."""
    expected = module.state_dict()
    tied = set(expected) - set(_unique_state(module))
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if names:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            problems.append(f"{label} tensors: {shown}")
    if problems:
        raise ModelLoadError(f"{source} does not match {type(module).__name__}: " + "; ".join(problems))


def load_module(
    folder: str | Path,
    build: Callable[[C], M],
    config_cls: type[C],
    device: str | torch.device = "cpu",
) -> tuple[M, C]:
    """Build a module from ``folder/config.json`` and fill it from ``folder/model.safetensors``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    try:
        config = load_config(config_cls, folder / CONFIG_NAME)
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None
    module = build(config)
    state = load_tensors(folder / WEIGHTS_NAME)
    check_state_dict(module, state, str(folder / WEIGHTS_NAME))
    reference = module.state_dict()
    state = {k: v.to(reference[k].dtype) for k, v in state.items()}
    module.load_state_dict(state, strict=False)  # strictness checked above (tied weights allowed)
    return module.to(device).eval(), config


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"missing file {path}") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e})") from None
