"""Random access to WebDataset shards (IndexedShards) and the streaming reader's clear refusal of it."""

from __future__ import annotations

import copy
import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from dalle.cli import EXIT_USAGE, main
from dalle.data import (
    BadImageError,
    DataError,
    IndexedShards,
    Sample,
    Skipped,
    StreamingOnlyError,
    TooManyBadImagesError,
    WebDatasetShards,
    iter_samples,
    open_dataset,
)


def png(colour=(255, 0, 0), size=(8, 6), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    """Members in order; ``None`` data writes a directory entry."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def tricky_shard(path: Path) -> Path:
    """Every grouping rule of the streaming reader, and bad samples of each kind."""
    noise = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    return write_tar(path, [
        ("./a.png", png((10, 20, 30))), ("a.txt", b"first a\r\nsecond a\n"),          # ./ prefix, two lines
        ("dir/", None),                                                                # a directory entry
        ("dir/b.jpg", png((0, 200, 0), fmt="JPEG")),
        ("dir/b.json", json.dumps({"caption": ["b one", "b two"]}).encode()),          # caption list
        (".hidden.png", png()), ("noext", b"x"),                                       # belong to no sample
        ("c.png", b"<html>not found</html>"), ("c.txt", b"broken image"),              # bad image
        ("d.png", png((0, 0, 255))),                                                   # no caption
        ("e.txt", b"caption without image"),                                           # no image
        ("f.png", png((1, 2, 3))), ("g.png", png((4, 5, 6))), ("f.txt", b"late f"),    # key f comes back
        ("h.png", png((7, 8, 9))), ("h.seg.png", png()), ("h.txt", b"h caption"),     # extension "seg.png"
        ("i.png", png((9, 9, 9))), ("i.txt", b"overwritten"), ("i.txt", b"i wins"),    # the later copy wins
        ("j.png", png((50, 60, 70))), ("j.npy", noise), ("j.txt", b"j caption"),       # big member in between
        ("k.png", png((255, 255, 255))), ("k.jpg", png((0, 0, 0), fmt="JPEG")),        # jpg preferred
        ("k.json", json.dumps({"caption": "k caption", "other": 1}).encode()),
    ])  # fmt: skip


def truncated_shard(path: Path) -> Path:
    rng = np.random.default_rng(1)
    members = []
    for i in range(3):
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        members += [(f"t{i}.png", buf.getvalue()), (f"t{i}.txt", f"t {i}".encode())]
    write_tar(path, members)
    path.write_bytes(path.read_bytes()[:30_000])  # cut inside the third image
    return path


def indexed_items(ds: IndexedShards) -> list[Sample | Skipped]:
    out: list[Sample | Skipped] = []
    for i in range(len(ds)):
        try:
            out.append(ds.load(i))
        except BadImageError as e:
            out.append(Skipped(e.key, e.reason))
    return out


def same(a: Sample | Skipped, b: Sample | Skipped) -> bool:
    if isinstance(a, Skipped) or isinstance(b, Skipped):
        return a == b
    return (a.key, a.captions) == (b.key, b.captions) and np.array_equal(np.asarray(a.image), np.asarray(b.image))


@pytest.fixture
def shards(make_shards, tmp_path) -> list[Path]:
    paths = make_shards(2, 3)
    return [*paths, tricky_shard(tmp_path / "shards" / "00002.tar"), truncated_shard(tmp_path / "shards" / "00003.tar")]


# --- Same samples as the stream ------------------------------------------------------------


def test_indexing_gives_the_streams_samples_in_the_streams_order(shards):
    streamed = list(WebDatasetShards(shards).iter_items())
    ds = IndexedShards(shards, max_bad_fraction=None)
    indexed = indexed_items(ds)
    broken = str(shards[3])
    # The stream reports the truncated shard where it breaks; the index did so when it was built.
    (cut,) = [s for s in streamed if getattr(s, "key", None) == broken]
    assert "unexpected end of data" in cut.reason and "unexpected end of data in t2.png" in ds.skipped.reasons[broken]
    streamed = [s for s in streamed if getattr(s, "key", None) != broken]
    assert len(indexed) == len(streamed) == len(ds)
    assert all(same(a, b) for a, b in zip(indexed, streamed))
    keys = [ds.key(i) for i in range(len(ds))]
    assert keys[:6] == [f"{s:04d}{k:05d}" for s in range(2) for k in range(3)]
    assert keys[6:] == ["a", "dir/b", "c", "d", "e", "f", "g", "f", "h", "i", "j", "k", "t0", "t1"]
    good = {s.key: s for s in indexed if isinstance(s, Sample)}
    assert good["a"].captions == ["first a", "second a"] and good["dir/b"].captions == ["b one", "b two"]
    assert good["i"].captions == ["i wins"] and good["j"].captions == ["j caption"]
    assert np.asarray(good["k"].image).max() < 30  # the black jpg, not the white png
    assert np.asarray(good["a"].image)[0, 0].tolist() == [10, 20, 30]
    reasons = {s.key: s.reason for s in indexed if isinstance(s, Skipped)}
    tricky = str(shards[2])
    assert set(reasons) == {f"{tricky}:{k}" for k in ("c", "d", "e", "f", "g")}
    assert "not an image" in reasons[f"{tricky}:c"] and "no caption" in reasons[f"{tricky}:d"]
    assert "no image" in reasons[f"{tricky}:e"]


def test_order_and_samples_do_not_depend_on_how_the_shards_are_named(shards, tmp_path):
    folder = IndexedShards(tmp_path / "shards", max_bad_fraction=None)
    pattern = IndexedShards(str(tmp_path / "shards" / "{00000..00003}.tar"), max_bad_fraction=None)
    listed = IndexedShards(list(reversed(shards)), max_bad_fraction=None)
    assert folder.shards == pattern.shards == [str(p) for p in shards]
    assert [folder.key(i) for i in range(len(folder))] == [pattern.key(i) for i in range(len(pattern))]
    assert listed.shards == [str(p) for p in reversed(shards)]  # an explicit list keeps its order
    assert all(same(a, b) for a, b in zip(indexed_items(folder), indexed_items(pattern)))


def test_bad_items_are_skipped_counted_and_substituted(shards):
    ds = IndexedShards(shards[2:], max_bad_fraction=None)
    assert ds.skipped.reasons.keys() == {str(shards[3])}  # the truncated shard, counted once when opened
    c = [ds.key(i) for i in range(len(ds))].index("c")
    assert ds[c].key == "h"  # c, d, e, f, g are bad: the next good item stands in
    assert {f"{shards[2]}:{k}" for k in "cdefg"} <= set(ds.skipped.reasons)
    skipped = ds.skipped.skipped
    assert ds[c].key == "h" and ds.skipped.skipped == skipped  # bad indices are remembered, not decoded again
    assert [s.key for s in iter_samples(IndexedShards(shards[2:], max_bad_fraction=None))] == [
        "a", "dir/b", "h", "i", "j", "k", "t0", "t1"
    ]  # fmt: skip
    with pytest.raises(TooManyBadImagesError, match="could not be used"):
        list(iter_samples(IndexedShards(shards[2:])))  # 5 bad of 13 is past the default 5%
    with pytest.raises(TooManyBadImagesError):
        IndexedShards(shards[2:], max_bad=0)


def test_captions_are_read_without_the_images(shards):
    ds = IndexedShards(shards, max_bad_fraction=None)
    captions = {s.key: s.captions for s in iter_samples(IndexedShards(shards, max_bad_fraction=None))}
    captions["c"] = ["broken image"]  # its image is bad, but images are not decoded
    expected = [c for i in range(len(ds)) for c in captions.get(ds.key(i), [])]
    assert list(ds.iter_captions()) == expected
    stream = WebDatasetShards(shards)
    assert list(stream.iter_captions()) == list(ds.iter_captions())
    first_seven_items = [c for i in range(7) for c in captions.get(ds.key(i), [])]  # the limit counts items
    assert list(ds.iter_captions(7)) == list(stream.iter_captions(7)) == first_seven_items


# --- Files, processes, copies ----------------------------------------------------------------


def test_dataloader_workers_read_the_same_items_through_their_own_files(shards):
    ds = IndexedShards(shards[:3], max_bad_fraction=None, max_open_files=2)
    good = [i for i in range(len(ds)) if ds.key(i) not in set("cdefg")]
    direct = [ds[i] for i in good]
    assert len(ds._handles) <= 2  # least recently used files are closed
    parent = dict(ds._handles)
    loader = DataLoader(ds, batch_size=None, sampler=good, num_workers=2, collate_fn=lambda s: s)
    assert all(same(a, b) for a, b in zip(loader, direct))
    assert ds._handles == parent and not any(f.closed for f in parent.values())  # the workers used their own
    twin = copy.deepcopy(ds)  # as a spawned worker gets it: no open files
    assert not twin._handles and same(twin[good[-1]], direct[-1])
    ds.close()
    twin.close()
    assert all(f.closed for f in parent.values()) and not ds._handles
    assert same(ds[good[0]], direct[0])  # reopened on demand
    ds.close()


def test_a_shard_changed_after_indexing_is_reported(make_shards):
    (path,) = make_shards(1, 2)
    ds = IndexedShards([path])
    with open(path, "ab") as f:
        f.write(b"\0" * 1024)
    with pytest.raises(DataError, match="changed after it was indexed"):
        ds[0]


def test_shards_without_any_sample_are_refused(tmp_path):
    empty = write_tar(tmp_path / "empty.tar", [("readme", b"no extension")])
    with pytest.raises(DataError, match="no sample"):
        IndexedShards([empty])


# --- Which reader, and the streaming reader's refusal --------------------------------------------


def gzip_copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(gzip.compress(src.read_bytes()))
    return dst


def test_open_dataset_picks_the_indexed_reader_for_local_plain_tars(make_shards, tmp_path):
    paths = make_shards(2, 2)
    folder = tmp_path / "shards"
    for spec in (folder, str(folder / "*.tar"), str(folder / "{00000..00001}.tar"), paths, paths[0]):
        assert isinstance(open_dataset(spec), IndexedShards), spec
    for kwargs in ({"streaming": True}, {"rank": 0, "world_size": 1}, {"shuffle_buffer": 4}):
        assert isinstance(open_dataset(folder, **kwargs), WebDatasetShards), kwargs
    tgz = gzip_copy(paths[0], tmp_path / "s.tar.gz")
    disguised = gzip_copy(paths[0], tmp_path / "gz-named.tar")  # compressed although named .tar
    for spec in (tgz, disguised, "https://example.com/shard-{000..003}.tar"):
        assert isinstance(open_dataset(spec), WebDatasetShards), spec
    assert [s.key for s in open_dataset(tgz)] == [s.key for s in iter_samples(open_dataset(paths[0]))]
    with pytest.raises(DataError, match="gzip-compressed.*decompress"):
        open_dataset(tgz, streaming=False)
    with pytest.raises(DataError, match="URL.*download"):
        IndexedShards("https://example.com/shard-000.tar")


def test_a_stream_refuses_random_access_saying_what_to_use(make_shards, tmp_path):
    (path,) = make_shards(1, 3)
    tgz = WebDatasetShards(gzip_copy(path, tmp_path / "s.tar.gz"))
    with pytest.raises(StreamingOnlyError, match="random access.*decompress them to plain .tar") as e:
        len(tgz)
    assert isinstance(e.value, DataError) and isinstance(e.value, TypeError)
    with pytest.raises(StreamingOnlyError, match="are URLs.*download them first"):
        WebDatasetShards("http://example.com/a.tar")[0]
    with pytest.raises(StreamingOnlyError, match="opened for streaming.*open_dataset"):
        WebDatasetShards(path)[0]
    # Still an iterable everywhere that asks: list(), truth, DataLoader, iter_samples.
    assert tgz and len(list(tgz)) == 3
    assert [s.key for s in iter_samples(tgz)] == [s.key for s in DataLoader(tgz, batch_size=None, collate_fn=lambda s: s)]


# --- Through the command line ------------------------------------------------------------------


@pytest.fixture
def shape_shards(folder_factory, tmp_path) -> Path:
    """Twelve shapes images packed as img2dataset would: two shards of KEY.png + KEY.txt."""
    folder = folder_factory(tmp_path / "images", 12)
    out = tmp_path / "wds"
    out.mkdir()
    images = sorted(folder.glob("*.png"))
    for s in range(2):
        members = []
        for image in images[s::2]:
            members += [(image.name, image.read_bytes()), (image.with_suffix(".txt").name, image.with_suffix(".txt").read_bytes())]
        write_tar(out / f"shard-{s}.tar", members)
    return out


def test_cli_trains_tokenizer_and_dvae_on_shards(shape_shards, tmp_path, capsys):
    out = tmp_path / "model"
    common = ["--data", str(shape_shards), "--out", str(out), "--preset", "tiny", "--device", "cpu"]
    assert main(["train", "tokenizer", *common]) == 0
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert main(["train", "dvae", *common, "--steps", "2"]) == 0
    assert (out / "dvae" / "model.safetensors").is_file()


def test_cli_names_the_fix_when_a_stream_is_given_to_the_dvae(shape_shards, tmp_path, capsys):
    tgz = gzip_copy(shape_shards / "shard-0.tar", tmp_path / "shard-0.tar.gz")
    code = main(["train", "dvae", "--data", str(tgz), "--out", str(tmp_path / "m"), "--preset", "tiny", "--steps", "1",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "internal error" not in err
    assert "random access" in err and "decompress" in err and os.fspath(tgz) in err
