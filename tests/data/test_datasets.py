"""Readers (folder, COCO, WebDataset), auto-detection, safe image loading and bad-file accounting."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from dalle.data import (
    BadImageError,
    CocoDataset,
    DataError,
    FolderDataset,
    Sample,
    SkipCounter,
    TooManyBadImagesError,
    WebDatasetShards,
    iter_samples,
    load_image,
    open_dataset,
    read_captions_file,
)
from dalle.data.webdataset import expand_braces


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def noisy(size=(48, 40), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` (a decompression bomb's signature)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# --- The folder reader -----------------------------------------------------------------


def test_folder_dataset_reads_images_and_every_caption_line(shapes_dir):
    ds = FolderDataset(shapes_dir)
    assert len(ds) == 6
    for i in range(len(ds)):
        s = ds[i]
        assert isinstance(s.image, Image.Image) and s.image.mode == "RGB" and s.image.size == (64, 64)
        txt = (shapes_dir / f"{s.key}.txt").read_text(encoding="utf-8")
        assert s.captions == [line for line in txt.splitlines() if line.strip()]
        assert np.array_equal(np.asarray(s.image), np.asarray(Image.open(shapes_dir / f"{s.key}.png").convert("RGB")))
    assert [ds.key(i) for i in range(6)] == sorted(p.stem for p in shapes_dir.glob("*.png"))
    assert ds.skipped.skipped == 0


def test_folder_dataset_is_recursive_and_ignores_hidden_folders(shapes_dir):
    (shapes_dir / "sub").mkdir()
    shutil.copy(shapes_dir / "000000.png", shapes_dir / "sub" / "x.png")
    (shapes_dir / "sub" / "x.txt").write_text("nested caption\n")
    (shapes_dir / ".cache").mkdir()
    shutil.copy(shapes_dir / "000000.png", shapes_dir / ".cache" / "y.png")
    (shapes_dir / ".cache" / "y.txt").write_text("hidden\n")
    ds = FolderDataset(shapes_dir)
    assert len(ds) == 7
    assert ds[6].key == "sub/x" and ds[6].captions == ["nested caption"]


def test_image_without_captions_file_is_counted_and_threshold_applies(shapes_dir):
    shutil.copy(shapes_dir / "000000.png", shapes_dir / "orphan.png")
    with pytest.raises(TooManyBadImagesError, match="orphan.png"):
        FolderDataset(shapes_dir)  # 1 of 7 = 14% > 5%
    ds = FolderDataset(shapes_dir, max_bad_fraction=0.5)
    assert len(ds) == 6 and ds.skipped.reasons == {"orphan.png": "no captions file orphan.txt"}


def test_folder_without_captions_says_what_is_needed(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"none has a same-named \.txt"):
        FolderDataset(tmp_path)


CAPTION = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\ufeff"), min_size=1, max_size=30
).map(str.strip).filter(bool)
BLANK = st.sampled_from(["", " ", "\t", "  \t "])


@settings(max_examples=40, deadline=None)
@given(
    captions=st.lists(CAPTION, min_size=1, max_size=6),
    blanks=st.lists(st.tuples(st.integers(0, 6), BLANK), max_size=4),
    crlf=st.booleans(),
)
def test_captions_round_trip_through_the_txt_reader(captions, blanks, crlf):
    lines = list(captions)
    for pos, blank in sorted(blanks, reverse=True):
        lines.insert(min(pos, len(lines)), blank)
    text = ("\r\n" if crlf else "\n").join(lines)
    with tempfile.TemporaryDirectory() as d:
        Image.new("RGB", (4, 4), (1, 2, 3)).save(Path(d, "a.png"))
        Path(d, "a.txt").write_bytes(text.encode("utf-8"))
        sample = FolderDataset(d)[0]
    assert sample.captions == captions


def test_captions_file_byte_order_mark_and_bad_encoding(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffa red circle\n\n".encode("utf-8"))
    assert read_captions_file(tmp_path / "a.txt") == ["a red circle"]
    (tmp_path / "b.txt").write_bytes(b"caf\xe9\n")  # latin-1
    with pytest.raises(BadImageError, match="not UTF-8"):
        read_captions_file(tmp_path / "b.txt")
    (tmp_path / "c.txt").write_text("\n  \n")
    with pytest.raises(BadImageError, match="no caption"):
        read_captions_file(tmp_path / "c.txt")


# --- Safe image loading ------------------------------------------------------------------


def test_load_image_converts_grayscale_and_palette():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "L")
    out = np.asarray(load_image(encode(gray)))
    assert out.shape == (8, 8, 3) and (out[..., 0] == np.asarray(gray)).all() and (out[..., 0] == out[..., 2]).all()

    pal = Image.new("P", (4, 4))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 1), 1)
    out = np.asarray(load_image(encode(pal)))
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (200, 100, 50)


def test_load_image_composites_transparency_over_black():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(200, 100, 50, 255), (200, 100, 50, 0), (200, 100, 50, 128)])
    out = np.asarray(load_image(encode(rgba))).astype(int)
    assert tuple(out[0, 0]) == (200, 100, 50)
    assert tuple(out[0, 1]) == (0, 0, 0)
    assert np.abs(out[0, 2] - np.array([100, 50, 25])).max() <= 1

    la = Image.new("LA", (2, 1))
    la.putdata([(90, 255), (90, 0)])
    out = np.asarray(load_image(encode(la)))
    assert tuple(out[0, 0]) == (90, 90, 90) and tuple(out[0, 1]) == (0, 0, 0)

    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 255, 255, 0, 255, 0] + [0] * 762)
    pal.putdata([0, 1])
    pal.info["transparency"] = 0  # palette entry 0 (white) is transparent
    out = np.asarray(load_image(encode(pal, transparency=0)))
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[0, 1]) == (0, 255, 0)


def test_load_image_converts_cmyk_jpeg():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    im = load_image(encode(cmyk, "JPEG", quality=95))
    r, g, b = np.asarray(im).reshape(-1, 3).mean(0)
    assert im.mode == "RGB" and r > 240 and g < 15 and b < 15


def test_load_image_scales_16_bit():
    a = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    im16 = Image.fromarray(a)
    assert im16.mode == "I;16"
    out = np.asarray(load_image(encode(im16)))
    assert list(out[0, :, 0]) == [0, 1, 128, 255]


def test_load_image_refuses_float_images(tmp_path):
    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(BadImageError, match="floating-point"):
        load_image(tmp_path / "f.tiff")


def test_load_image_rejects_truncated_and_non_images(tmp_path):
    data = encode(noisy((64, 64)))
    with pytest.raises(BadImageError, match="truncated|cannot decode"):
        load_image(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="not an image"):
        load_image(b"<html><body>404 Not Found</body></html>")
    with pytest.raises(BadImageError, match="not found"):
        load_image(tmp_path / "missing.png")


def test_decompression_bombs_are_refused_before_decoding(monkeypatch):
    # Declared 9000 x 9000 = 81 Mpx: above our 64 Mpx limit (below Pillow's own).
    with pytest.raises(BadImageError, match="decompression bomb refused: declared size 9000x9000"):
        load_image(png_with_declared_size(9000, 9000))
    # Declared 50000 x 50000: Pillow's guard raises DecompressionBombError first; handled too.
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(png_with_declared_size(50_000, 50_000))
    # A lower limit set by the caller, and Pillow's warning range, with a real image.
    data = encode(noisy((100, 100)))
    with pytest.raises(BadImageError, match="max_pixels=5000"):
        load_image(data, max_pixels=5000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 px > 2 x 1000: Pillow refuses
    with pytest.raises(BadImageError, match="refused by Pillow"):
        load_image(data)


def _bad_folder(root: Path) -> Path:
    """Six good images plus one of each kind of bad file, each with a caption."""
    files = {
        "b_truncated.png": encode(noisy((64, 64)))[:300],
        "c_html.jpg": b"<html>nope</html>",
        "d_gray.png": encode(Image.new("L", (20, 20), 77)),
        "e_rgba.png": encode(Image.new("RGBA", (20, 20), (9, 9, 9, 0))),
        "f_cmyk.jpg": encode(Image.new("CMYK", (20, 20), (0, 0, 0, 0)), "JPEG"),
        "g_sixteen.png": encode(Image.fromarray(np.full((5, 5), 4000, np.uint16))),
        "h_bomb.png": png_with_declared_size(9000, 9000),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(f"caption of {name}\n")
    return root


def test_folder_skips_bad_files_counts_them_and_substitutes_in_getitem(shapes_dir):
    ds = FolderDataset(_bad_folder(shapes_dir), max_bad_fraction=None)
    assert len(ds) == 13
    keys = [ds.key(i) for i in range(len(ds))]
    trunc = keys.index("b_truncated")
    with pytest.raises(BadImageError) as e:
        ds.load(trunc)
    assert e.value.key == "b_truncated.png"
    # dataset[i] of a bad item returns the next good one, and counts the bad ones once.
    sub = ds[trunc]
    assert isinstance(sub, Sample) and sub.key == "d_gray"
    assert set(ds.skipped.reasons) == {"b_truncated.png", "c_html.jpg"}
    assert ds[keys.index("h_bomb")].key == "000000"  # wraps round to the start
    assert "decompression bomb" in ds.skipped.reasons["h_bomb.png"]
    ds[trunc]
    assert ds.skipped.skipped == 3  # a known-bad index is not decoded (or counted) again

    good = [s.key for s in iter_samples(FolderDataset(shapes_dir, max_bad_fraction=None))]
    assert good == [k for k in keys if k not in ("b_truncated", "c_html", "h_bomb")]


def test_too_many_bad_files_stop_the_run_naming_them(shapes_dir):
    _bad_folder(shapes_dir)
    with pytest.raises(TooManyBadImagesError) as e:  # 3 of 13 = 23% > 5%, checked at the end of the pass
        list(iter_samples(FolderDataset(shapes_dir)))
    assert all(name in str(e.value) for name in ("b_truncated.png", "c_html.jpg", "h_bomb.png"))
    ds = FolderDataset(shapes_dir, max_bad_fraction=None, max_bad=1)
    with pytest.raises(TooManyBadImagesError, match="max_bad=1"):
        for i in range(len(ds)):
            ds[i]
    assert len(list(iter_samples(FolderDataset(shapes_dir, max_bad_fraction=0.3)))) == 10


def test_skip_counter_fraction_waits_for_min_seen():
    c = SkipCounter(max_bad_fraction=0.1, min_seen=20)
    c.skip("a", "bad")
    c.skip("b", "bad")  # 2 of 2, but too few seen to judge
    c.ok(8)
    with pytest.raises(TooManyBadImagesError, match="2 of 10"):
        c.check(final=True)
    c.ok(20)  # 2 of 30 = 6.7%
    c.check()
    assert "2 skipped" in c.summary() and "a (bad)" in c.summary()


# --- MS-COCO -----------------------------------------------------------------------------


def _coco(root: Path, shapes_dir: Path, split: str = "train2017") -> dict:
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for n, png in enumerate(sorted(shapes_dir.glob("*.png"))):
        name = f"COCO_{n:012d}.png"
        shutil.copy(png, root / split / name)
        images.append({"id": 100 + n, "file_name": name, "width": 64, "height": 64})
        for line in png.with_suffix(".txt").read_text().splitlines():
            annotations.append({"id": len(annotations), "image_id": 100 + n, "caption": line + " \n"})
    images.append({"id": 999, "file_name": "uncaptioned.png"})
    annotations.append({"id": 10_000, "image_id": 12345, "caption": "orphan"})
    data = {"info": {}, "images": images, "annotations": annotations}
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(data))
    return data


def test_coco_groups_all_captions_of_an_image(tmp_path, shapes_dir):
    _coco(tmp_path / "coco", shapes_dir)
    ds = open_dataset(tmp_path / "coco")
    assert isinstance(ds, CocoDataset) and len(ds) == 6 and ds.orphan_captions == 1
    folder = FolderDataset(shapes_dir)
    for i in range(6):
        s, f = ds[i], folder[i]
        assert s.key == f"COCO_{i:012d}" and s.captions == f.captions
        assert np.array_equal(np.asarray(s.image), np.asarray(f.image))
    by_json = open_dataset(tmp_path / "coco" / "annotations" / "captions_train2017.json")
    assert isinstance(by_json, CocoDataset) and len(by_json) == 6


def test_coco_errors_are_explicit(tmp_path, shapes_dir):
    _coco(tmp_path / "coco", shapes_dir)
    _coco(tmp_path / "coco", shapes_dir, split="val2017")
    with pytest.raises(DataError, match="several COCO caption files"):
        open_dataset(tmp_path / "coco")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="'annotations'"):
        CocoDataset(bad, tmp_path)
    os.remove(tmp_path / "coco" / "train2017" / "COCO_000000000002.png")
    ds = CocoDataset(tmp_path / "coco/annotations/captions_train2017.json", tmp_path / "coco/train2017", max_bad_fraction=None)
    assert ds[2].key == "COCO_000000000003" and ds.skipped.reasons == {"COCO_000000000002.png": "file not found"}


# --- WebDataset shards -----------------------------------------------------------------


def _key(sample: Sample) -> str:
    return sample.key


def test_webdataset_streams_samples_with_txt_and_json_captions(make_shards, tmp_path):
    make_shards(2, 3)
    ds = open_dataset(tmp_path / "shards", streaming=True)  # local plain tars open indexed unless asked to stream
    assert isinstance(ds, WebDatasetShards)
    samples = list(ds)
    assert [s.key for s in samples] == [f"{s:04d}{k:05d}" for s in range(2) for k in range(3)]
    for s in samples:
        assert s.image.mode == "RGB" and s.image.size == (40, 30)
        assert s.captions == [f"item {s.key}"]  # .txt and .json say the same: kept once


def test_webdataset_paths_globs_and_brace_patterns(make_shards, tmp_path):
    paths = make_shards(3, 2)
    assert expand_braces("a{08..10}b{x,y}") == ["a08bx", "a08by", "a09bx", "a09by", "a10bx", "a10by"]
    for spec in (str(tmp_path / "shards" / "{00000..00002}.tar"), str(tmp_path / "shards" / "*.tar"), paths, str(paths[0])):
        ds = open_dataset(spec, streaming=True)
        assert isinstance(ds, WebDatasetShards)
        assert len(list(ds)) == (2 if spec == str(paths[0]) else 6)
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(str(tmp_path / "shards" / "{00000..00005}.tar"))


@pytest.mark.parametrize("n_shards", [5, 1])  # by shard, and by sample when shards < consumers
def test_webdataset_splits_across_workers_and_ranks_without_duplication(make_shards, n_shards):
    paths = make_shards(n_shards, 7 if n_shards == 1 else 3)
    expected = {s.key for s in WebDatasetShards(paths)}
    seen = []
    for rank in range(2):
        ds = WebDatasetShards(paths, rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=_key)
        keys = list(loader)
        assert keys  # every rank gets work
        seen += keys
    assert len(seen) == len(set(seen)) == len(expected) and set(seen) == expected


def test_webdataset_rank_from_torchrun_environment(make_shards, monkeypatch):
    paths = make_shards(4, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = WebDatasetShards(paths)
    assert (ds.rank, ds.world_size) == (1, 2)
    assert [s.key for s in ds] == ["000100000", "000300000"]
    with pytest.raises(ValueError, match="rank"):
        WebDatasetShards(paths, rank=2, world_size=2)


def test_webdataset_shard_shuffle_depends_on_epoch_only(make_shards):
    paths = make_shards(6, 1)
    ds = WebDatasetShards(paths, shuffle_shards=True, seed=3)
    orders = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        orders.append([s.key for s in ds])
    assert orders[0] == orders[2] and orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])
    buffered = WebDatasetShards(paths, shuffle_buffer=4, seed=1)
    assert sorted(s.key for s in buffered) == sorted(orders[0])


def test_webdataset_skips_bad_samples_and_corrupt_shards(tmp_path):
    good = encode(Image.new("RGB", (8, 8), (255, 0, 0)))
    members = [
        ("a.png", good), ("a.txt", b"ok one"),
        ("b.jpg", b"<html>error</html>"), ("b.txt", b"broken image"),
        ("c.png", good), ("c.json", json.dumps({"caption": None}).encode()),
        ("d.png", good), ("d.json", json.dumps({"caption": "ok two"}).encode()),
    ]  # fmt: skip
    shard = write_tar(tmp_path / "s0.tar", members)
    big = [(f"k{i}.png", encode(noisy((64, 64), i))) for i in range(3)]
    corrupt = write_tar(tmp_path / "s1.tar", [m for i, (n, d) in enumerate(big) for m in ((n, d), (f"k{i}.txt", b"x"))])
    corrupt.write_bytes(corrupt.read_bytes()[:30_000])  # cut inside the third image
    ds = WebDatasetShards([shard, corrupt], max_bad_fraction=None)
    samples = list(ds)
    assert [s.key for s in samples] == ["a", "d", "k0", "k1"]
    reasons = ds.skipped.reasons
    assert set(reasons) == {f"{shard}:b", f"{shard}:c", str(corrupt)}
    assert "not an image" in reasons[f"{shard}:b"] and "no caption" in reasons[f"{shard}:c"]
    assert "corrupt" in reasons[str(corrupt)]
    with pytest.raises(TooManyBadImagesError):
        list(WebDatasetShards([shard, corrupt]))


# --- Auto-detection ----------------------------------------------------------------------


def test_open_dataset_detects_a_folder_and_names_what_it_looked_for(tmp_path, shapes_dir):
    assert isinstance(open_dataset(shapes_dir), FolderDataset)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path / "empty")
    assert all(s in str(e.value) for s in (".txt", "captions_*.json", ".tar"))
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "nowhere")


def test_load_image_applies_exif_rotation():
    im = Image.new("RGB", (20, 10), (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 5, 10))  # red strip on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    out = load_image(encode(im, "JPEG", exif=exif, quality=95))
    assert out.size == (10, 20)
    arr = np.asarray(out).astype(int)
    assert arr[:3, :, 0].mean() > 200 and arr[-3:, :, 0].mean() < 50  # the strip is now at the top
