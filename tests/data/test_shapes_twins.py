"""Hard-negative twins never show what the split holds out (dalle/data/shapes_twins.py)."""

from __future__ import annotations

import numpy as np

from dalle.data import shapes
from dalle.data.shapes_twins import hard_negative_twins


def _twins(dataset: shapes.ShapesDataset, hook: bool, batches: int, batch: int = 50):
    rng = np.random.default_rng(0)
    out = []
    for b in range(batches):
        items = [dataset[i] for i in range(b * batch, (b + 1) * batch)]
        captions = [item.captions[int(rng.integers(len(item.captions)))] for item in items]
        twins, _ = dataset.hard_negatives(items, captions, rng) if hook else hard_negative_twins(items, captions, rng)
        out += twins
    return out


def test_training_twins_hold_no_held_out_pair_description_or_other_split():
    """Over 2,000 training items: no twin shows a held-out colour-shape pair, describes a
    held-out description, or is an image of the val/test split."""
    data = shapes.ShapesDataset("train", 2000, seed=0)
    twins = _twins(data, hook=True, batches=40)
    assert len(twins) >= 1900  # nearly every item gets one
    eval_captions = set()
    for split in ("val", "test"):
        for i in range(300):
            eval_captions.update(shapes.all_captions(shapes.make_item(0, split, i)[0]))
    kinds = set()
    for twin in twins:
        scene = twin.scene
        assert not any(o.held_out for o in scene.objects), scene
        assert scene.category != "zero_shot"
        assert shapes.split_owner(scene.objects) == "train", scene
        assert shapes.description(scene) not in shapes.HELD_OUT_DESCRIPTIONS[scene.kind], scene
        assert not eval_captions & set(twin.captions), scene
        kinds.add(scene.kind)
    assert kinds == set(shapes.KINDS)


def test_unfiltered_twins_would_leak():
    """Without the split's rule the same draws do leak (the check above can fail)."""
    data = shapes.ShapesDataset("train", 500, seed=0)
    twins = _twins(data, hook=False, batches=10)
    assert any(not shapes.belongs_to(twin.scene, "train") for twin in twins)
    assert any(any(o.held_out for o in twin.scene.objects) for twin in twins)
