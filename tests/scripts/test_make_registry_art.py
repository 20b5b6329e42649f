"""scripts/make_registry_art.py on small local stand-ins for the packages (no network)."""

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from dalle.data import FolderDataset

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_registry_art.py"
spec = importlib.util.spec_from_file_location("make_registry_art", SCRIPT)
art = importlib.util.module_from_spec(spec)
spec.loader.exec_module(art)


def test_words_drop_separators_and_variant_numbers():
    assert art.words("accounting-calculator-1") == "accounting calculator"
    assert art.words("Road_Sign--2 3") == "road sign"


def test_square_on_white_pads_keeps_aspect_and_composites_on_white():
    im = Image.new("RGBA", (40, 20), (255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))  # transparent -> white
    out = art.square_on_white(im, 16)
    assert out.mode == "RGB" and out.size == (16, 16)
    assert out.getpixel((8, 0)) == (255, 255, 255)  # padding above the wide picture
    r, g, b = out.getpixel((8, 8))
    assert r > 240 and g < 20 and b < 20


def test_tuxpaint_items_read_the_english_line_and_skip_pictures_without_text(tmp_path):
    stamps = tmp_path / "usr/share/tuxpaint/stamps/animals"
    stamps.mkdir(parents=True)
    Image.new("RGBA", (30, 10), (0, 128, 0, 255)).save(stamps / "frog.png")
    (stamps / "frog.txt").write_text("A green Frog.\nfr.utf8=Une grenouille verte.\n", encoding="utf-8")
    Image.new("RGB", (10, 10)).save(stamps / "frog_mirror.png")  # no .txt: not a stamp of its own
    items = list(art.tuxpaint_items(tmp_path))
    assert [(n, c) for n, c, _ in items] == [("animals-frog", ["a green frog", "frog"])]
    assert items[0][2](8).size == (8, 8)


def test_iconify_items_keep_the_largest_size_and_build_sentences(tmp_path):
    (tmp_path / "package").mkdir()
    body = '<rect width="10" height="10" fill="#f00"/>'
    icons = {"alert-16": {"body": body}, "alert-24": {"body": body}, "egg": {"body": body, "width": 20}}
    (tmp_path / "package/icons.json").write_text(json.dumps({"icons": icons, "width": 10, "height": 10}))
    got = [(n, c) for n, c, _ in art.iconify_items(tmp_path, "a glossy colour icon of ", largest_only=True)]
    assert got == [("alert-24", ["a glossy colour icon of an alert", "alert"]),
                   ("egg", ["a glossy colour icon of an egg", "egg"])]


def test_build_writes_a_folder_set_dalle_reads(tmp_path, monkeypatch):
    pytest.importorskip("cairosvg")
    pkg = tmp_path / "src/package"
    (pkg / "flags/1x1").mkdir(parents=True)
    for code, colour in (("aa", "#f00"), ("bb", "#00f")):
        (pkg / f"flags/1x1/{code}.svg").write_text(
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10"><rect width="10" height="10" fill="{colour}"/></svg>')
    (pkg / "country.json").write_text(json.dumps([{"code": "aa", "name": "Aland", "flag_1x1": "flags/1x1/aa.svg"},
                                                  {"code": "bb", "name": "Bland", "flag_1x1": "flags/1x1/bb.svg"}]))
    monkeypatch.setattr(art, "fetch", lambda registry, package, dest: Path("unused.tgz"))
    monkeypatch.setattr(art, "unpack", lambda archive, dest: tmp_path / "src")
    n = art.build(tmp_path / "out", ["flags"], size=12, seed=0, downloads=None)
    assert n == 2
    ds = FolderDataset(tmp_path / "out")
    captions = sorted(ds[i].captions[0] for i in range(len(ds)))
    assert captions == ["the flag of aland", "the flag of bland"]
    assert ds[0].image.size == (12, 12)


def test_unknown_source_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        art.main(["--out", "x", "--sources", "flags,emoji"])
    assert e.value.code == 2
    assert "unknown source(s) emoji" in capsys.readouterr().err
