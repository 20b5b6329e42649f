"""Fixtures for the data tests: small folders of captioned images and WebDataset shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

try:  # the shapes set's own writer, when present (it is the project's fixture generator)
    from dalle.data.shapes import write_shapes
except ImportError:  # pragma: no cover - only before dalle/data/shapes.py exists
    write_shapes = None


def _write_squares(out: Path, count: int) -> Path:
    """Fallback fixture: coloured squares on black, two captions each."""
    out.mkdir(parents=True, exist_ok=True)
    colours = {"red": (230, 25, 25), "green": (30, 190, 50), "blue": (40, 70, 230)}
    for i in range(count):
        name, rgb = list(colours.items())[i % 3]
        im = Image.new("RGB", (64, 64))
        im.paste(rgb, (8 + 3 * i, 10, 30 + 3 * i, 32))
        im.save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text(f"a {name} square\na large {name} square\n", encoding="utf-8")
    return out


def make_folder(out: Path, count: int, seed: int = 0) -> Path:
    if write_shapes is not None:
        return Path(write_shapes(out, count, split="train", seed=seed, progress=False, workers=1))
    return _write_squares(out, count)


@pytest.fixture
def folder_factory() -> Callable[..., Path]:
    """``folder_factory(out, count, seed=0)`` writes a captioned folder (the shapes writer when present)."""
    return make_folder


@pytest.fixture
def shapes_dir(tmp_path: Path) -> Path:
    """Six captioned 64x64 PNGs (``NNNNNN.png`` + ``NNNNNN.txt``)."""
    return make_folder(tmp_path / "shapes", 6)


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar holding ``members`` (name, bytes) in the given order, as img2dataset writes them."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def make_shards(tmp_path: Path) -> Callable[..., list[Path]]:
    """``make_shards(n_shards, per_shard)`` -> shard paths; sample ``k`` of shard ``s`` has key ``SSSSKKKKK``.

    Samples alternate between ``.jpg`` + ``.txt`` + ``.json`` and ``.png`` + ``.json`` only,
    the two ways img2dataset stores captions.
    """

    def make(n_shards: int, per_shard: int, folder: str = "shards") -> list[Path]:
        out = tmp_path / folder
        out.mkdir(exist_ok=True)
        paths = []
        for s in range(n_shards):
            members = []
            for k in range(per_shard):
                key = f"{s:04d}{k:05d}"
                image = Image.new("RGB", (40, 30), ((s * 40) % 256, (k * 30) % 256, 128))
                caption = f"item {key}"
                if k % 2 == 0:
                    members.append((f"{key}.jpg", png_bytes(image, "JPEG")))
                    members.append((f"{key}.txt", caption.encode()))
                else:
                    members.append((f"{key}.png", png_bytes(image)))
                members.append((f"{key}.json", json.dumps({"caption": caption, "url": "x"}).encode()))
            paths.append(write_tar(out / f"{s:05d}.tar", members))
        return paths

    return make
