"""scripts/gallery.py: the held-out rows it picks and the sheet it draws (no model needed)."""

import importlib.util
from pathlib import Path

from PIL import Image

from dalle.config import get_preset, save_config

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gallery.py"
spec = importlib.util.spec_from_file_location("gallery", SCRIPT)
gallery = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gallery)


def test_rows_come_from_the_held_out_tail_in_file_name_order(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(30):  # 30 items: the split holds out the last 6 (a fifth of a small set)
        Image.new("RGB", (8, 8), (i * 8, 0, 0)).save(data / f"{i:03d}.png")
        (data / f"{i:03d}.txt").write_text(f"picture number {i}\nsecond caption\n")
    model = tmp_path / "model"
    model.mkdir()
    save_config(get_preset("tiny"), model / "dalle.json")
    rows = gallery.held_out_items(model, str(data), rows=3)
    assert [caption for caption, _ in rows] == ["picture number 24", "picture number 25", "picture number 26"]
    assert rows[0][1].getpixel((0, 0)) == (24 * 8, 0, 0)


def test_render_lays_out_one_row_a_caption():
    real = Image.new("RGB", (16, 16), (255, 0, 0))
    generated = [Image.new("RGB", (16, 16), (0, 0, 255))] * 3
    sheet = gallery.render([("a red square", real, generated), ("another", real, generated)], size=16, scale=2)
    cell = 32
    assert sheet.width == gallery.TEXT_WIDTH + 4 * (cell + gallery.PAD) + 3 * gallery.PAD
    assert sheet.height == 20 + 2 * (cell + gallery.PAD) + gallery.PAD
    x = gallery.TEXT_WIDTH + gallery.PAD
    assert sheet.getpixel((x + 1, 21)) == (255, 0, 0)  # the real image first
    assert sheet.getpixel((x + cell + 3 * gallery.PAD + 1, 21)) == (0, 0, 255)  # then the drawings
