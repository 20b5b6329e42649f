"""The shapes generator keeps the contract of /work/shared/SHAPES.md."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from dalle.data import images, shapes
from dalle.data.shapes import (
    CATEGORIES,
    HELD_OUT,
    PALETTE,
    REGIONS,
    Scene,
    ShapeObject,
    ShapesDataset,
    captions_for,
    check_scene,
    generate_scene,
    read_scenes,
    shape_mask,
    split_owner,
    write_shapes,
)

SPEC_PALETTE = {
    "red": (230, 25, 25),
    "green": (30, 190, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "cyan": (30, 210, 220),
}
SPEC_HELD_OUT = {("purple", "triangle"), ("orange", "circle"), ("cyan", "square"), ("yellow", "triangle")}


@pytest.fixture(scope="module")
def samples():
    """300 items of each split, generated once."""
    return {split: [ShapesDataset(split, 300, seed=0)[i] for i in range(300)] for split in shapes.SPLITS}


def test_constants_are_the_contract():
    assert PALETTE == SPEC_PALETTE
    assert set(HELD_OUT) == SPEC_HELD_OUT
    assert shapes.SIZE_RANGES == {"small": (10, 14), "large": (22, 28)}
    assert REGIONS[0] == "top left" and REGIONS[4] == "center" and REGIONS[8] == "bottom right"


@pytest.mark.parametrize("size", [10, 11, 13, 14, 22, 25, 28])
def test_shape_masks(size):
    for name in shapes.SHAPES:
        m = shape_mask(name, size)
        ys, xs = np.nonzero(m)
        # The drawn shape spans exactly its size x size box.
        assert (xs.min(), xs.max(), ys.min(), ys.max()) == (0, size - 1, 0, size - 1), name
        assert np.array_equal(m, m[:, ::-1]), f"{name} is not left-right symmetric"
    assert shape_mask("square", size).all()
    assert 0.76 <= shape_mask("circle", size).mean() <= 0.82
    tri = shape_mask("triangle", size)
    assert 0.5 <= tri.mean() <= 0.61
    # Apex up: rows widen downwards and the bottom row is full.
    widths = tri.sum(axis=1)
    assert np.all(np.diff(widths) >= 0) and widths[-1] == size and widths[0] <= 2
    with pytest.raises(ValueError, match="shape must be one of"):
        shape_mask("star", size)


def test_scenes_keep_the_contract(samples):
    for split, items in samples.items():
        for s in items:
            check_scene(s.scene)  # bounds, gap, relation geometry, category vs held-out
            img = np.asarray(s.image)
            assert img.shape == (64, 64, 3) and img.dtype == np.uint8
            # Margins of 2 px stay black, and only palette colours are drawn (flat, no anti-aliasing).
            assert not img[:2].any() and not img[-2:].any() and not img[:, :2].any() and not img[:, -2:].any()
            packed = np.unique(img.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1]))
            colours = {(int(v) >> 16, (int(v) >> 8) & 255, int(v) & 255) for v in packed}
            assert colours <= set(SPEC_PALETTE.values()) | {(0, 0, 0)}
            assert colours - {(0, 0, 0)} == {PALETTE[o.colour] for o in s.scene.objects}
            # Pixel count per object = its mask (objects never overlap).
            for o in s.scene.objects:
                x0, y0, x1, y1 = o.bbox
                patch = np.all(img[y0:y1, x0:x1] == PALETTE[o.colour], axis=2)
                assert np.array_equal(patch, shape_mask(o.shape, o.size_px))


def test_pairs_relations_and_distinct_objects(samples):
    seen = set()
    for items in samples.values():
        for s in items:
            if len(s.scene.objects) != 2:
                continue
            a, b = s.scene.objects
            assert (a.colour, a.shape) != (b.colour, b.shape)
            dx, dy = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
            if s.scene.relation == "left of":
                assert dx >= 20 and abs(dy) <= 12
            else:
                assert s.scene.relation == "above" and dy >= 20 and abs(dx) <= 12
            seen.add(s.scene.relation)
    assert seen == {"left of", "above"}


def test_train_never_holds_a_held_out_pair():
    held_phrases = [f"{c} {s}" for c, s in SPEC_HELD_OUT]
    ds = ShapesDataset("train", 1500, seed=3)
    cats = set()
    for i in range(len(ds)):
        scene, captions = shapes.make_item(3, "train", i)
        assert not any((o.colour, o.shape) in SPEC_HELD_OUT for o in scene.objects)
        assert not any(p in c for p in held_phrases for c in captions)
        cats.add(scene.category)
    assert cats == set(CATEGORIES) - {"zero_shot"}
    with pytest.raises(ValueError, match="train split holds no zero_shot"):
        generate_scene(np.random.default_rng(0), "train", category="zero_shot")


def test_val_and_test_captions_are_never_training_captions():
    """Captions are held out, not only images: no caption a val/test scene can have is a
    caption a train scene can have, and every non-zero-shot val/test scene describes a
    held-out description (so every category of ``dalle eval`` asks for something unseen)."""
    train_captions = set()
    for i in range(3000):
        scene, _ = shapes.make_item(0, "train", i)
        assert shapes.belongs_to(scene, "train")
        assert shapes.description(scene) not in shapes.HELD_OUT_DESCRIPTIONS[scene.kind]
        train_captions.update(shapes.all_captions(scene))
    per_category = {c: 0 for c in CATEGORIES}
    for split in ("val", "test"):
        for i in range(600):
            scene, _ = shapes.make_item(0, split, i)
            assert shapes.belongs_to(scene, split)
            if scene.category != "zero_shot":
                assert shapes.description(scene) in shapes.HELD_OUT_DESCRIPTIONS[scene.kind]
            assert not train_captions & set(shapes.all_captions(scene)), scene
            per_category[scene.category] += 1
    assert all(n > 0 for n in per_category.values()), per_category


def test_held_out_descriptions_are_new_combinations_of_trained_parts():
    held = shapes.HELD_OUT_DESCRIPTIONS
    assert [len(held[k]) for k in shapes.KINDS] == [4, 8, 36, 38, 76]
    assert not held["single"] & SPEC_HELD_OUT
    for size, colour, shape in held["single_size"]:  # the other size of the pair is trained
        assert (("small" if size == "large" else "large"), colour, shape) not in held["single_size"]
    for first, relation, second in held["pair_relation"]:  # the mirror image is trained
        assert (second, relation, first) not in held["pair_relation"]
    # Regions: every cell and every colour-shape pair keeps most of its combinations in training.
    for region in REGIONS:
        assert sum(r == region for _, _, r in held["single_region"]) <= 10
    # A train scene is never given a held-out description, whatever the seed.
    rng = np.random.default_rng(7)
    for kind in shapes.KINDS:
        for _ in range(200):
            scene = generate_scene(rng, "train", category=kind)
            assert shapes.description(scene) not in held[kind]


def test_val_and_test_hold_zero_shot_alone_and_beside_others(samples):
    for split in ("val", "test"):
        zs = [s.scene for s in samples[split] if s.scene.category == "zero_shot"]
        assert 0.15 <= len(zs) / len(samples[split]) <= 0.35
        assert all(any((o.colour, o.shape) in SPEC_HELD_OUT for o in z.objects) for z in zs)
        assert {len(z.objects) for z in zs} == {1, 2}
        assert {z.kind for z in zs} == set(CATEGORIES) - {"zero_shot"}
        # Ordinary scenes of val/test never hold a held-out pair.
        others = [s.scene for s in samples[split] if s.scene.category != "zero_shot"]
        assert not any((o.colour, o.shape) in SPEC_HELD_OUT for sc in others for o in sc.objects)
        assert {sc.category for sc in others} == set(CATEGORIES) - {"zero_shot"}
    # Every held-out pair is asked for.
    asked = {
        (o.colour, o.shape)
        for split in ("val", "test")
        for s in samples[split]
        for o in s.scene.objects
        if s.scene.category == "zero_shot"
    }
    assert SPEC_HELD_OUT <= asked


def test_determinism_and_split_disjointness(samples):
    a, b = ShapesDataset("val", 50, seed=0), ShapesDataset("val", 50, seed=0)
    assert isinstance(a[0], images.Sample) and a[0].scene is not None  # the package's Sample, plus the scene
    for i in (0, 7, 49, -1):
        x, y = a[i], b[i]
        assert x.image.tobytes() == y.image.tobytes() and x.captions == y.captions and x.key == y.key
    assert a[-1].key == a[49].key
    other_seed = ShapesDataset("val", 50, seed=1)
    assert sum(a[i].image.tobytes() == other_seed[i].image.tobytes() for i in range(50)) == 0

    def digests(items):
        return {hashlib.sha1(s.image.tobytes()).hexdigest() for s in items}

    d = {split: digests(items) for split, items in samples.items()}
    assert not d["train"] & d["val"] and not d["train"] & d["test"] and not d["val"] & d["test"]
    # The guarantee behind it: each image belongs to exactly one split by its hash.
    for split, items in samples.items():
        assert all(split_owner(s.scene.objects) == split for s in items)


def test_captions(samples):
    article_error = re.compile(r"\ba [aeiou]|\ban [^aeiou\s]")
    for items in samples.values():
        for s in items:
            caps = s.captions
            assert 3 <= len(caps) <= 5 and len(set(caps)) == len(caps)
            for c in caps:
                assert c == c.lower() and c.strip() == c and not article_error.search(c), c
                for o in s.scene.objects:
                    assert f"{o.colour} {o.shape}" in c
            scene = s.scene
            if scene.kind == "single":
                assert not any(w in c for c in caps for w in ("small", "large", " the "))
            if scene.kind == "single_size":
                assert all(scene.objects[0].size_label in c for c in caps)
            if scene.kind == "single_region":
                phrases = shapes.REGION_PHRASES[scene.objects[0].region]
                assert all(any(c.endswith(p) or (p + " on a") in c for p in phrases) for c in caps)
            if scene.kind == "pair":
                assert all(" and " in c for c in caps)
            if scene.kind == "pair_relation":
                horizontal = scene.relation == "left of"
                want = ("to the left of", "to the right of") if horizontal else ("above", "below")
                assert all(any(w in c for w in want) for c in caps)
    orange = Scene((ShapeObject("orange", "circle", 12, 10, 10),), None, "zero_shot", "single")
    assert captions_for(orange, np.random.default_rng(0), count=1) == ["an orange circle"]
    large = Scene((ShapeObject("orange", "square", 24, 2, 2),), None, "single_size", "single_size")
    assert captions_for(large, np.random.default_rng(0), count=1) == ["a large orange square"]


def test_region_captions_cover_the_grid():
    rng = np.random.default_rng(5)
    regions = set()
    for _ in range(400):
        scene = generate_scene(rng, "train", category="single_region")
        o = scene.objects[0]
        regions.add(o.region)
        # The centre keeps 2 px away from the grid lines, so the region is unambiguous.
        for v in o.centre:
            assert min(abs(v - 64 / 3), abs(v - 128 / 3)) >= 2
    assert regions == set(REGIONS)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        ShapesDataset("dev")
    with pytest.raises(ValueError, match="size must be >= 0"):
        ShapesDataset("train", size=-1)
    with pytest.raises(IndexError):
        ShapesDataset("train", size=3)[3]
    with pytest.raises(ValueError, match="category must be one of"):
        generate_scene(np.random.default_rng(0), "val", category="triple")
    with pytest.raises(ValueError, match="closer than 2 px"):
        check_scene(Scene((ShapeObject("red", "circle", 12, 1, 10),), None, "single", "single"))


def test_write_shapes(tmp_path):
    out = write_shapes(tmp_path / "set", 12, split="val", seed=4, progress=False)
    ds = ShapesDataset("val", 12, seed=4)
    records = read_scenes(out)
    assert [stem for stem, _ in records] == [f"{i:06d}" for i in range(12)]
    for i, (stem, scene) in enumerate(records):
        s = ds[i]
        with Image.open(out / f"{stem}.png") as im:
            assert im.mode == "RGB" and im.size == (64, 64)
            assert np.array_equal(np.asarray(im), np.asarray(s.image))
        assert (out / f"{stem}.txt").read_text().splitlines() == s.captions
        assert scene == s.scene
    line = json.loads((out / "scenes.jsonl").read_text().splitlines()[0])
    assert {"file", "category", "objects", "relation"} <= set(line)
    with pytest.raises(ValueError, match="count must be >= 1"):
        write_shapes(tmp_path / "x", 0)
    with pytest.raises(ValueError, match="split must be one of"):
        write_shapes(tmp_path / "x", 3, split="dev")


def test_write_shapes_two_processes_match_one(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes, "_WRITE_CHUNK", 40)  # several tasks for the two workers
    one = write_shapes(tmp_path / "one", 110, split="train", seed=2, progress=False, workers=1)
    two = write_shapes(tmp_path / "two", 110, split="train", seed=2, progress=False, workers=2)
    assert (one / "scenes.jsonl").read_text() == (two / "scenes.jsonl").read_text()
    for stem in ("000000", "000077", "000109"):
        assert (one / f"{stem}.png").read_bytes() == (two / f"{stem}.png").read_bytes()
        assert (one / f"{stem}.txt").read_text() == (two / f"{stem}.txt").read_text()
