"""What a user can get wrong, at the command line: one clear line and a non-zero status.

Each case damages a copy of a real (``tiny`` preset) model folder or hands the CLI a
bad file, and checks stderr holds exactly one line naming the problem, with no
traceback.  Inputs that are odd but usable (grayscale, RGBA, CMYK, 1x1 images, an
over-long prompt) must work.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dalle.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for helpers/, whatever pytest's import mode
from helpers.cli_errors import fails_with_one_line  # noqa: E402

GRID = 8  # the tiny preset's token grid (64 px images, 8x8 tokens)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    assert main(["train", "all", "--data", "shapes", "--out", str(out), "--preset", "tiny", "--steps", "3",
                 "--device", "cpu"]) == 0
    return out


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    """A throw-away copy of the model's inference parts, to damage."""
    copy = tmp_path / "model"
    for part in ("tokenizer", "dvae", "transformer", "clip"):
        shutil.copytree(tiny_model / part, copy / part)
    return copy


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return path


def generate(model: Path, tmp_path: Path, *extra) -> list:
    return ["generate", "a red circle", "--model", model, "--candidates", "1", "--keep", "1",
            "--out", tmp_path / "gen", "--device", "cpu", *extra]


def complete(model: Path, image: Path, tmp_path: Path, *which) -> list:
    return ["complete", image, "a red circle", *(which or ("--keep-rows", "3")), "--model", model,
            "--candidates", "1", "--keep", "1", "--out", tmp_path / "done", "--device", "cpu"]


def manifest_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


# --- model folders -------------------------------------------------------------------


def test_missing_model_folder(tmp_path, capsys):
    fails_with_one_line(generate(tmp_path / "nowhere", tmp_path), capsys, "nowhere", "does not exist")


def test_model_path_is_a_file(tmp_path, capsys):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 16)
    fails_with_one_line(generate(path, tmp_path), capsys, "model.bin", "is a file")


@pytest.mark.parametrize("part", ["tokenizer", "dvae", "transformer"])
def test_model_folder_missing_a_component(model_copy, tmp_path, capsys, part):
    shutil.rmtree(model_copy / part)
    fails_with_one_line(generate(model_copy, tmp_path), capsys, f"lacks {part}/")


def test_model_folder_missing_a_config_file(model_copy, tmp_path, capsys):
    (model_copy / "dvae" / "config.json").unlink()
    fails_with_one_line(generate(model_copy, tmp_path), capsys, "config.json")


def test_config_with_an_unknown_field(model_copy, tmp_path, capsys):
    path = model_copy / "transformer" / "config.json"
    config = json.loads(path.read_text())
    config["attention_flavour"] = "mystery"
    path.write_text(json.dumps(config))
    fails_with_one_line(generate(model_copy, tmp_path), capsys, "attention_flavour", "unknown field")


def test_config_that_is_not_json(model_copy, tmp_path, capsys):
    (model_copy / "dvae" / "config.json").write_text("{not json")
    fails_with_one_line(generate(model_copy, tmp_path), capsys, "config.json", "not valid JSON")


def test_weights_with_a_mismatched_tensor_shape(model_copy, tmp_path, capsys):
    path = model_copy / "transformer" / "model.safetensors"
    weights = load_file(str(path))
    name = next(k for k in sorted(weights) if weights[k].dim() == 2)
    weights[name] = torch.zeros(weights[name].shape[0] + 1, weights[name].shape[1], dtype=weights[name].dtype)
    save_file(weights, str(path))
    line = fails_with_one_line(generate(model_copy, tmp_path), capsys, name, "mis-shaped")
    assert str(tuple(weights[name].shape)) in line  # the file's shape is named beside the model's


def test_weights_missing_a_tensor(model_copy, tmp_path, capsys):
    path = model_copy / "dvae" / "model.safetensors"
    weights = load_file(str(path))
    name = sorted(weights)[0]
    del weights[name]
    save_file(weights, str(path))
    fails_with_one_line(generate(model_copy, tmp_path), capsys, name, "missing")


@pytest.mark.parametrize("content", [b"PK\x03\x04 a zip, as torch.save writes", b"\x80\x04\x95 a pickle", b""])
def test_foreign_weights_file(model_copy, tmp_path, capsys, content):
    (model_copy / "dvae" / "model.safetensors").write_bytes(content)
    fails_with_one_line(generate(model_copy, tmp_path), capsys, "model.safetensors", "not a readable safetensors")


# --- images for dalle complete --------------------------------------------------------


def test_complete_with_a_file_that_is_not_an_image(tiny_model, tmp_path, capsys):
    path = tmp_path / "notes.png"
    path.write_text("these are my notes, not a picture")
    fails_with_one_line(complete(tiny_model, path, tmp_path), capsys, "notes.png")


def test_complete_with_a_truncated_image(tiny_model, tmp_path, image, capsys):
    data = image.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    fails_with_one_line(complete(tiny_model, cut, tmp_path), capsys, "cut.png")


@pytest.mark.parametrize(
    "mode, suffix, colour",
    [("L", "png", 128), ("RGBA", "png", (255, 0, 0, 128)), ("CMYK", "jpg", (0, 255, 255, 0)),
     ("P", "png", 3), ("I;16", "png", 40000)],
)
def test_complete_converts_other_colour_modes(tiny_model, tmp_path, capsys, mode, suffix, colour):
    path = tmp_path / f"in.{suffix}"
    Image.new(mode, (64, 64), colour).save(path)
    out = tmp_path / "done"
    assert main([str(a) for a in complete(tiny_model, path, tmp_path)]) == 0, capsys.readouterr().err
    [row] = manifest_rows(out)
    made = Image.open(out / row["file"])
    assert made.mode == "RGB" and made.size == (64, 64)


@pytest.mark.parametrize("size", [(1, 1), (3, 200)])
def test_complete_accepts_tiny_and_thin_images(tiny_model, tmp_path, capsys, size):
    """Decided: any image of at least one pixel works; it is centre-cropped square and resized."""
    path = tmp_path / "small.png"
    Image.new("RGB", size, (0, 0, 255)).save(path)
    assert main([str(a) for a in complete(tiny_model, path, tmp_path)]) == 0, capsys.readouterr().err
    assert len(manifest_rows(tmp_path / "done")) == 1


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but holds none (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 100_000])  # past our limit; past Pillow's own hard limit too
def test_complete_refuses_a_decompression_bomb(tiny_model, tmp_path, capsys, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    fails_with_one_line(complete(tiny_model, path, tmp_path), capsys, "bomb.png", "decompression bomb")


# --- options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "which, fragments",
    [
        (("--region", f"{GRID},0"), ("region", "inside the 8x8 token grid")),
        (("--region", f"0,{GRID}"), ("region", "inside the 8x8 token grid")),
        (("--region", "99,99"), ("region", "inside the 8x8 token grid")),
        (("--region=-1,0",), ("--region", "non-negative")),
        (("--region", "2"), ("--region", "ROW,COL")),
        (("--region", "a,b"), ("--region", "ROW,COL")),
        (("--keep-rows", str(GRID)), ("keep_rows must be in [0, 7]",)),
        (("--keep-rows", "99"), ("keep_rows must be in [0, 7]",)),
        (("--keep-rows", "-1"), ("--keep-rows must be in",)),
        (("--keep-rows", "two"), ("--keep-rows", "not a valid int")),
    ],
)
def test_complete_with_a_bad_region_or_row_count(tiny_model, tmp_path, image, capsys, which, fragments):
    fails_with_one_line(complete(tiny_model, image, tmp_path, *which), capsys, *fragments)


def test_complete_with_both_region_and_rows(tiny_model, tmp_path, image, capsys):
    fails_with_one_line(complete(tiny_model, image, tmp_path, "--region", "1,1", "--keep-rows", "2"), capsys,
                        "not allowed with")


def test_region_at_the_last_token_works(tiny_model, tmp_path, image, capsys):
    code = main([str(a) for a in complete(tiny_model, image, tmp_path, "--region", f"{GRID - 1},{GRID - 1}")])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_prompts_file(tiny_model, tmp_path, capsys, content):
    path = tmp_path / "prompts.txt"
    path.write_text(content)
    argv = ["generate", "--prompts", path, "--model", tiny_model, "--out", tmp_path / "gen", "--device", "cpu"]
    fails_with_one_line(argv, capsys, "prompts.txt", "holds no prompt")


def test_missing_prompts_file(tiny_model, tmp_path, capsys):
    argv = ["generate", "--prompts", tmp_path / "nope.txt", "--model", tiny_model, "--device", "cpu"]
    fails_with_one_line(argv, capsys, "nope.txt", "does not exist")


def test_prompt_longer_than_the_text_length_works_with_a_warning(tiny_model, tmp_path):
    """Run as a user would (a subprocess), so the warning must really reach stderr."""
    prompt = " ".join(["a small red circle above a large blue square"] * 8)  # far past 32 tokens
    out = tmp_path / "gen"
    done = subprocess.run(
        [sys.executable, "-m", "dalle.cli", *map(str, generate(tiny_model, tmp_path)[:1]), prompt,
         *map(str, generate(tiny_model, tmp_path)[2:])],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "prompt truncated" in done.stderr and "Traceback" not in done.stderr
    [row] = manifest_rows(out)
    assert row["prompt"] == prompt


@pytest.mark.parametrize("value", ["0", "-5", "often"])
def test_bad_checkpoint_interval_environment_variable(tmp_path, capsys, monkeypatch, value):
    monkeypatch.setenv("DALLE_CHECKPOINT_EVERY", value)
    argv = ["train", "dvae", "--data", "shapes", "--out", tmp_path / "m", "--preset", "tiny", "--steps", "1",
            "--device", "cpu"]
    fails_with_one_line(argv, capsys, "DALLE_CHECKPOINT_EVERY", repr(value))
