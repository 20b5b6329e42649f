"""Reading other projects' released weights without running code from the file.

The released files are PyTorch pickles (``torch.save`` of a whole module, or of a
checkpoint dict) and TorchScript archives.  ``torch.load(weights_only=False)`` would
import and call whatever the pickle names, so a file from a stranger could run any
code.  This reader interprets the pickle with a restricted ``find_class``, the only way
a pickle can reach a Python callable:

* tensors are rebuilt by functions of this module from the raw storage records of the
  file (the zip format of ``torch.save`` since PyTorch 1.6, TorchScript archives, and the
  older sequential format);
* plain containers (dict, OrderedDict, list, tuple, set) are what they are;
* objects of the classes a caller expects (``stand_ins``: module-name prefixes such as
  ``dall_e.`` or ``torch.nn.modules.``) become inert :class:`PickledObject` records of
  their class name, arguments and state: the named class is never imported or called;
* any other global is refused with :class:`UnsafeFileError`, naming it.

What the caller gets back is an object graph of tensors, containers and records, from
which :func:`module_tensors` collects the ``state_dict`` names of a pickled module.
"""

from __future__ import annotations

import collections
import io
import pickle  # the restricted Unpickler below: find_class resolves only what this module allows
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch


class UnsafeFileError(ValueError):
    """A file this reader will not rebuild (or cannot parse); the message says why."""


# Storage classes named by torch pickles -> element dtype.
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# The sequential (pre-1.6) format starts with this pickled number.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class PickledObject:
    """An inert record of an object the file describes: its class name, arguments and state.

    Built by the unpickler in place of the named class (``NEWOBJ``, ``REDUCE`` and
    ``BUILD`` land here); nothing of the named class runs.
    """

    qualname = "?"
    # Class-level defaults: NEWOBJ builds the record with __new__ alone, skipping __init__.
    args: tuple = ()
    kwargs: dict = {}
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<pickled {self.qualname}>"

    @property
    def attributes(self) -> dict[str, Any]:
        """The object's ``__dict__`` as pickled ({} when the state is not a dict)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]  # (dict, slots) form
        return state if isinstance(state, dict) else {}


class _StorageType:
    """What a storage class name resolves to: only its dtype is used."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


# --- The tensor rebuilders the pickle may call -------------------------------------------


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: Iterable[int], stride: Iterable[int], *_: Any) -> torch.Tensor:
    """A view of the flat ``storage`` (requires_grad, hooks and metadata are ignored)."""
    if not isinstance(storage, torch.Tensor):
        raise UnsafeFileError(f"a tensor refers to a {type(storage).__name__}, not a storage record")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or min((*size, *stride, offset), default=0) < 0:
        raise UnsafeFileError(f"a tensor record has an impossible layout (size {size}, stride {stride}, offset {offset})")
    last = offset + sum((n - 1) * st for n, st in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.numel():
        raise UnsafeFileError(f"a tensor of size {size} reaches past its storage of {storage.numel()} elements")
    return torch.as_strided(storage, size, stride, offset)


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    return data


def _identity(value: Any, *_: Any) -> Any:
    return value


# Globals resolved to this module's own functions or to plain types.
SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("torch", "Size"): tuple,
    # TorchScript archives tag typed lists and dicts with these; the values are plain.
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "build_genericlist"): _identity,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
}
# Small value types a module's attributes hold (its device, a dtype): inert records too.
ALWAYS_STAND_IN = ("torch.device", "torch.dtype", "torch.float32", "torch.float16", "torch.bfloat16")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, what: str, stand_ins: tuple[str, ...], load_storage: Any):
        super().__init__(file)
        self.what = what
        self.stand_ins = stand_ins
        self.load_storage = load_storage
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol-2 pickles name Python 2's module
            module = "builtins"
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        qualname = f"{module}.{name}"
        if qualname in ALWAYS_STAND_IN or any(qualname.startswith(p) for p in self.stand_ins):
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (PickledObject,), {"qualname": qualname})
            return self.classes[qualname]
        allowed = ", ".join(p.rstrip(".") for p in self.stand_ins) or "none"
        raise UnsafeFileError(
            f"{self.what} refers to {qualname}, which is not a tensor, a plain container or an object of the "
            f"expected kinds ({allowed}); refusing to read it (no code from the file is run)"
        )

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            # The sequential format notes each module class's source (for change warnings):
            # a record of the class, already resolved (and restricted) by find_class.
            return pid[1]
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise UnsafeFileError(f"{self.what} has a persistent record {pid!r:.80} that is not a tensor storage")
        return self.load_storage(pid)


def _storage_dtype(storage_type: Any, what: str) -> torch.dtype:
    if isinstance(storage_type, _StorageType):
        return storage_type.dtype
    raise UnsafeFileError(f"{what} has a storage of unsupported type {storage_type!r}")


# --- File formats --------------------------------------------------------------------------


def read_torch_file(path: str | Path, stand_ins: tuple[str, ...] = (), what: str | None = None) -> Any:
    """The object pickled in ``path`` (``torch.save`` file or TorchScript archive), rebuilt safely.

    ``stand_ins``: prefixes of the qualified class names to rebuild as :class:`PickledObject`
    records (e.g. ``("dall_e.", "torch.nn.modules.")``); any other class is refused.
    """
    path = Path(path)
    what = what or str(path)
    if not path.is_file():
        raise UnsafeFileError(f"{what} does not exist")
    if zipfile.is_zipfile(path):
        return _read_zip(path, stand_ins, what)
    return _read_legacy(path, stand_ins, what)


def _read_zip(path: Path, stand_ins: tuple[str, ...], what: str) -> Any:
    """``torch.save``'s zip format and TorchScript archives: ``<prefix>/data.pkl`` + ``<prefix>/data/<key>``."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UnsafeFileError(f"{what} is a zip file but not a PyTorch archive (no single <name>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        order = f"{prefix}byteorder"
        if order in names and archive.read(order).strip() != b"little":
            raise UnsafeFileError(f"{what} stores big-endian tensors, which this reader does not handle")
        storages: dict[str, torch.Tensor] = {}

        def load_storage(pid: tuple) -> torch.Tensor:
            if len(pid) != 5:
                raise UnsafeFileError(f"{what} has a storage record of unexpected form {pid!r:.80}")
            _, storage_type, key, _location, numel = pid
            dtype = _storage_dtype(storage_type, what)
            if key not in storages:
                name = f"{prefix}data/{key}"
                if name not in names:
                    raise UnsafeFileError(f"{what} refers to a missing tensor record {name}")
                raw = bytearray(archive.read(name))
                flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
                storages[key] = flat
            flat = storages[key]
            if flat.dtype != dtype or flat.numel() < int(numel):
                raise UnsafeFileError(f"{what}: tensor record {key} is shorter than its {numel} elements")
            return flat

        with archive.open(pickles[0]) as f:
            return _RestrictedUnpickler(io.BytesIO(f.read()), what, stand_ins, load_storage).load()


def _read_legacy(path: Path, stand_ins: tuple[str, ...], what: str) -> Any:
    """The sequential format of ``torch.save(..., _use_new_zipfile_serialization=False)``.

    Five pickles in a row (magic number, protocol, system info, the object, the storage
    keys in order), then each storage's raw bytes behind an 8-byte element count.
    """
    with open(path, "rb") as f:
        def plain() -> Any:
            return _RestrictedUnpickler(f, what, (), _no_storage(what)).load()

        try:
            magic = plain()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            if isinstance(e, UnsafeFileError):
                raise
            raise UnsafeFileError(f"{what} is neither a PyTorch zip archive nor a PyTorch pickle ({e})") from None
        if magic != LEGACY_MAGIC:
            raise UnsafeFileError(f"{what} is not a file written by torch.save (wrong magic number)")
        if plain() != LEGACY_PROTOCOL:
            raise UnsafeFileError(f"{what} uses an unknown torch.save protocol version")
        info = plain()
        if not isinstance(info, dict) or not info.get("little_endian", False):
            raise UnsafeFileError(f"{what} stores big-endian tensors, which this reader does not handle")
        storages: dict[str, torch.Tensor] = {}

        def load_storage(pid: tuple) -> torch.Tensor:
            if len(pid) != 6:
                raise UnsafeFileError(f"{what} has a storage record of unexpected form {pid!r:.80}")
            _, storage_type, key, _location, numel, view = pid
            if view is not None:
                raise UnsafeFileError(f"{what} uses storage views, a format this reader does not handle")
            dtype = _storage_dtype(storage_type, what)
            if key not in storages:
                storages[key] = torch.zeros(int(numel), dtype=dtype)  # filled below, in place
            return storages[key]

        obj = _RestrictedUnpickler(f, what, stand_ins, load_storage).load()
        keys = plain()
        if not isinstance(keys, list):
            raise UnsafeFileError(f"{what} lacks the list of its tensor records")
        for key in keys:
            if key not in storages:
                raise UnsafeFileError(f"{what} lists a tensor record {key!r} that nothing refers to")
            target = storages[key]
            header = f.read(8)
            if len(header) != 8:
                raise UnsafeFileError(f"{what} is truncated (tensor record {key})")
            (numel,) = struct.unpack("<q", header)
            nbytes = numel * target.element_size()
            raw = bytearray(f.read(nbytes))
            if numel != target.numel() or len(raw) != nbytes:
                raise UnsafeFileError(f"{what} is truncated or inconsistent (tensor record {key})")
            if nbytes:
                target.copy_(torch.frombuffer(raw, dtype=target.dtype))
        return obj


def _no_storage(what: str) -> Any:
    def refuse(pid: Any) -> Any:
        raise UnsafeFileError(f"{what} has a tensor where a header was expected")

    return refuse


# --- Walking what was read -----------------------------------------------------------------


def module_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """``state_dict``-style names -> tensors of a pickled module (or of a plain dict of tensors).

    A ``torch.save``-d ``nn.Module`` keeps its tensors in ``_parameters``, ``_buffers`` and
    submodules in ``_modules``; a TorchScript object keeps them as plain attributes.
    """
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, PickledObject):
        attrs = obj.attributes
        if "_modules" in attrs or "_parameters" in attrs:  # a pickled torch.nn.Module
            for table in ("_parameters", "_buffers"):
                for name, t in (attrs.get(table) or {}).items():
                    if isinstance(t, torch.Tensor):
                        out[prefix + name] = t
            for name, child in (attrs.get("_modules") or {}).items():
                if child is not None:
                    out.update(module_tensors(child, f"{prefix}{name}."))
            return out
        items = attrs.items()
    elif isinstance(obj, dict):
        items = obj.items()
    else:
        return out
    for name, value in items:
        if isinstance(value, torch.Tensor):
            out[prefix + str(name)] = value
        elif isinstance(value, (PickledObject, dict)):
            out.update(module_tensors(value, f"{prefix}{name}."))
    return out


def class_name(obj: Any) -> str:
    """The qualified class name a record stands for ('' for anything else)."""
    return obj.qualname if isinstance(obj, PickledObject) else ""
