"""Saving and loading model folders: a JSON config beside safetensors weights.

A component folder holds ``config.json`` (its config dataclass) and
``model.safetensors``.  Loading needs nothing from the user: the config says
how to build the module, and every mismatch between the file and the module is
reported by name.  No pickle is read or written anywhere.

The config also holds the SHA-256 of the files exported beside it (``"checksums":
{"model.safetensors": HEX}``), checked on every load, so a damaged or edited weights file
is refused instead of loaded with wrong values.  Folders exported before checksums
existed (no such key) still load; ``dalle info`` says "no checksum" for them.
"""

from __future__ import annotations

import dataclasses
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

from dalle.config import ConfigError, config_from_dict, config_to_dict

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


CHECKSUMS_KEY = "checksums"  # config.json: {file name: SHA-256} of the files exported beside it


def save_config_with_checksums(config: Any, path: str | Path, files: list[str | Path]) -> None:
    """Write ``config`` as JSON to ``path`` (atomically) with the SHA-256 of each of ``files``."""
    data = config_to_dict(config)
    data[CHECKSUMS_KEY] = {Path(f).name: file_sha256(f) for f in files}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def load_config_with_checksums(cls: type[C], path: str | Path) -> tuple[C, dict[str, str]]:
    """``(config, checksums)`` from a component's ``config.json``; ``checksums`` is {} for an old export."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"missing config file {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    checksums = data.pop(CHECKSUMS_KEY, {}) if isinstance(data, dict) else {}
    if not isinstance(checksums, dict) or not all(isinstance(v, str) for v in checksums.values()):
        raise ConfigError(f"{path}: {CHECKSUMS_KEY!r} must map file names to SHA-256 strings")
    return config_from_dict(cls, data, str(path)), checksums


def verify_checksum(path: str | Path, checksums: dict[str, str]) -> str | None:
    """Check ``path`` against its entry in ``checksums``: its SHA-256, or None when it has no entry.

    Raises :class:`ModelLoadError` when the file differs from what was exported.
    """
    path = Path(path)
    expected = checksums.get(path.name)
    if expected is None:
        return None
    if not path.is_file():
        raise ModelLoadError(f"missing weights file {path}")
    if file_sha256(path) != expected:
        raise ModelLoadError(f"{path} fails its checksum (the SHA-256 in {CONFIG_NAME}): it was changed or damaged "
                             "after export; copy it again, re-export or retrain it")
    return expected


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
    save_config_with_checksums(config, folder / CONFIG_NAME, [folder / WEIGHTS_NAME])
    return folder


# --- will it fit? -----------------------------------------------------------------------

# Config fields that repeat a block: a module is measured at depth 1 and 2 of each and the
# rest extrapolated, because building a 100,000-layer model even on the meta device takes
# minutes.  (The blocks of one kind have the same size, so the count is exact.)
DEPTH_FIELDS = ("n_layers", "text_layers", "image_layers", "blocks_per_group")
LOAD_FACTOR = 2.0  # loading holds the built module and the file's tensors at once


def _meta_bytes(build: Callable[[C], nn.Module], config: C) -> tuple[int, int]:
    """(parameters, bytes of parameters and buffers) of ``build(config)``, built on the meta device."""
    with torch.device("meta"):
        module = build(config)
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(p.numel() for p in module.parameters()), sum(t.numel() * t.element_size() for t in tensors)


def estimate_size(build: Callable[[C], nn.Module], config: C) -> tuple[int, int]:
    """(parameters, bytes) the module ``build(config)`` will take, found without allocating it.

    Raises :class:`ValueError` naming the config when it cannot be built at all.
    """
    depths = {f: getattr(config, f) for f in DEPTH_FIELDS if isinstance(getattr(config, f, None), int)}
    shallow = {f: min(n, 1) for f, n in depths.items()}
    try:
        params, size = _meta_bytes(build, dataclasses.replace(config, **shallow))  # type: ignore[type-var]
        for name, n in depths.items():
            if n > 1:  # add (n - 1) more blocks of this kind, measured from a depth-2 build
                p2, s2 = _meta_bytes(build, dataclasses.replace(config, **{**shallow, name: 2}))  # type: ignore[type-var]
                params, size = params + (n - 1) * (p2 - params), size + (n - 1) * (s2 - size)
    except (ValueError, RuntimeError, TypeError, ZeroDivisionError, AssertionError) as e:
        raise ValueError(f"cannot build a {type(config).__name__} from these values ({e})") from None
    return params, size


def available_memory(device: str | torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (CPU: available RAM, within a cgroup limit), or None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    if device.type != "cpu":
        return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # a container's own limit (cgroup v2), when lower
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free if free is not None else 1 << 62, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def _gb(n: float) -> str:
    for size, unit in ((1e12, "TB"), (1e9, "GB")):
        if n >= 0.1 * size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 1e6:.1f} MB"


def check_fits(build: Callable[[C], nn.Module], config: C, device: str | torch.device, what: str,
               factor: float = LOAD_FACTOR, doing: str = "load") -> int:
    """Refuse (:class:`ModelLoadError`) a module whose config needs more memory than ``device`` has.

    ``factor``: bytes needed per byte of the module (loading holds two copies; training
    also holds gradients, the optimizer's moments and a weight average).  Returns the
    estimated parameter count.
    """
    try:
        params, size = estimate_size(build, config)
    except ValueError as e:
        raise ModelLoadError(f"{what}: {e}") from None
    needed, free = factor * size, available_memory(device)
    if free is not None and needed > free:
        raise ModelLoadError(
            f"{what} describes a model of {params:,} parameters ({_gb(size)} of weights); to {doing} it needs about "
            f"{_gb(needed)} but {device} has {_gb(max(free, 0))} free: check the sizes in it (layers, widths) "
            "or use a machine with more memory")
    return params


def check_export(folder: str | Path, weights_name: str | None = None) -> tuple[str | None, str]:
    """``(problem, checksum)`` of an exported component folder, without building its module.

    ``problem`` is None when the files are whole: ``config.json`` readable, the weights file
    (``weights_name``; by default ``model.safetensors``, else ``tokenizer.json``) readable and
    matching its checksum.  ``checksum`` says how the file was verified ("sha256 HEX verified",
    or "no checksum" for an export made before checksums existed).  Whether the config fits
    the weights is checked when loading.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    try:
        data = read_json(config_path)
        if not isinstance(data, dict):
            raise ModelLoadError(f"{config_path}: expected a JSON object")
        checksums = data.get(CHECKSUMS_KEY) or {}
        if weights_name is None:
            weights_name = WEIGHTS_NAME if (folder / WEIGHTS_NAME).exists() or not (folder / "tokenizer.json").exists() \
                else "tokenizer.json"
        weights = folder / weights_name
        if not weights.is_file():
            raise ModelLoadError(f"missing {weights}")
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(weights), "pt"):  # reads and checks the header only
                    pass
            except (SafetensorError, OSError) as e:
                raise ModelLoadError(f"{weights} is not a readable safetensors file ({e})") from None
        else:
            read_json(weights)
        verified = verify_checksum(weights, checksums if isinstance(checksums, dict) else {})
    except (ConfigError, ModelLoadError) as e:
        return str(e), "unchecked"
    return None, f"sha256 {verified} verified" if verified else "no checksum"


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
        config, checksums = load_config_with_checksums(config_cls, folder / CONFIG_NAME)
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None
    check_fits(build, config, device, str(folder / CONFIG_NAME))  # before allocating anything
    try:
        verify_checksum(folder / WEIGHTS_NAME, checksums)
        damaged = None
    except ModelLoadError as e:
        damaged = e  # refused below, unless a more precise problem (not safetensors, wrong shapes) is found first
    module = build(config)
    state = load_tensors(folder / WEIGHTS_NAME)
    check_state_dict(module, state, str(folder / WEIGHTS_NAME))
    if damaged is not None:
        raise damaged
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e})") from None


def folder_architecture(folder: str | Path) -> str | None:
    """The ``"architecture"`` a component folder's config names (a converted part), or None for ours."""
    data = read_json(Path(folder) / CONFIG_NAME)
    return data.get("architecture") if isinstance(data, dict) else None
