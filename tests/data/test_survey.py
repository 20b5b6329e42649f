"""Mixed sizes and modes in a user's folder: trained on, converted, with a note; no captions: one clear line."""

import pytest
from PIL import Image

from dalle.cli import main
from dalle.data.survey import survey_images, survey_note

pytestmark = pytest.mark.usefixtures("one_thread")


def mixed_folder(root):
    root.mkdir()
    images = {
        "a": Image.new("RGBA", (64, 64), (255, 0, 0, 0)),       # transparent
        "b": Image.new("L", (80, 48), 128),                       # grayscale, not square
        "c": Image.new("P", (32, 32)),                             # palette, smaller
        "d": Image.new("RGB", (64, 64), (0, 0, 255)),
        "e": Image.new("RGB", (128, 128), (0, 255, 0)),
    }
    for i in range(5):  # 25 images: enough for a validation split
        for name, image in images.items():
            image.save(root / f"{name}{i}.png")
            (root / f"{name}{i}.txt").write_text(f"a picture called {name}\n")
    return root


def test_survey_counts_sizes_and_modes(tmp_path):
    root = mixed_folder(tmp_path / "mixed")
    files = sorted(root.glob("*.png"))
    survey = survey_images(files, 64)
    assert survey["checked"] == 25 and survey["other_size"] == 15 and survey["not_square"] == 5
    assert survey["smaller"] == 10 and survey["other_mode"] == 15
    note = survey_note(survey, 64, 25)
    assert "15 are not 64x64" in note and "cut to a square and resized to 64x64" in note
    assert "RGBA 5" in note and "transparent areas over black" in note
    assert survey_note(survey_images(files[15:20], 64), 64, 5) is None  # d*: RGB 64x64, nothing to say


def test_a_folder_of_mixed_sizes_and_modes_trains_with_a_note(tmp_path, capsys):
    root = mixed_folder(tmp_path / "mixed")
    out = tmp_path / "m"
    common = ["--data", str(root), "--out", str(out), "--preset", "tiny", "--device", "cpu"]
    assert main(["train", "tokenizer", *common]) == 0
    assert main(["train", "dvae", *common, "--steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "note: of 25 images checked, 15 are not 64x64" in printed
    assert (out / "dvae" / "model.safetensors").is_file()


def test_a_folder_without_captions_is_one_line_saying_what_to_add(tmp_path, capsys):
    root = tmp_path / "nocaps"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64)).save(root / f"{i}.png")
    assert main(["train", "all", "--data", str(root), "--out", str(tmp_path / "m"), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3 image(s) but none has a same-named .txt" in err
