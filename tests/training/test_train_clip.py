"""The CLIP training loop: it learns a toy set, logs, saves, evaluates, resumes exactly."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field

import pytest
import torch
from PIL import Image

from dalle.clip import CLIP
from dalle.config import CLIPConfig, DalleConfig, TrainConfig
from dalle.training.clip import (augmented_image, caption_positives, diagnose_clip, draw_batch, evaluate_clip, image_to_tensor,
                                 retrieval_at_1, train_clip)

COLOURS = {"red": (230, 25, 25), "blue": (40, 70, 230)}
SIDES = ("left", "right")
SIZE = 16
TEXT_LEN = 8


@dataclass
class Item:
    image: Image.Image
    captions: list[str] = field(default_factory=list)


def toy_image(colour: str, side: str, top: int = 5) -> Image.Image:
    """A 5x5 square of ``colour`` in the ``side`` half of a black 16x16 canvas."""
    image = Image.new("RGB", (SIZE, SIZE))
    left = 1 if side == "left" else 10
    image.paste(COLOURS[colour], (left, top, left + 5, top + 5))
    return image


def toy_dataset(n: int, seed: int = 0) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        colour, side = rng.choice(list(COLOURS)), rng.choice(SIDES)
        items.append(Item(toy_image(colour, side, top=rng.randint(1, 10)),
                          [f"a {colour} square on the {side}", f"{colour} square {side}"]))
    return items


class WordTokenizer:
    """Stand-in for dalle.tokenizer.TextTokenizer: one id per word, then per-position pads."""

    def __init__(self, words: list[str], text_len: int):
        self.ids = {w: i for i, w in enumerate(words)}
        self.text_len = text_len
        self.vocab_size = len(words)

    def encode_batch(self, captions: list[str], *, training: bool = False, seed: int | None = None) -> torch.Tensor:
        # Whole words never drop out, so ``training`` and ``seed`` change nothing here.
        rows = []
        for caption in captions:
            ids = [self.ids[w] for w in caption.split()][: self.text_len]
            rows.append(ids + [self.vocab_size + i for i in range(len(ids), self.text_len)])
        return torch.tensor(rows, dtype=torch.long)


TOKENIZER = WordTokenizer(["a", "square", "on", "the", *COLOURS, *SIDES], TEXT_LEN)


def toy_config(steps: int = 60, batch: int = 8) -> DalleConfig:
    clip = CLIPConfig(text_vocab=TOKENIZER.vocab_size + TEXT_LEN, text_len=TEXT_LEN, text_layers=1, text_width=32,
                      text_heads=2, image_size=SIZE, patch_size=4, image_layers=1, image_width=32, image_heads=2,
                      embed_dim=32)
    return DalleConfig(clip=clip, train=TrainConfig(clip_steps=steps, clip_batch=batch, clip_lr=2e-3, seed=3))


pytestmark = pytest.mark.usefixtures("one_thread")


def test_image_to_tensor_is_unit_range_and_resizes():
    t = image_to_tensor(toy_image("red", "left"), SIZE)
    assert t.shape == (3, SIZE, SIZE) and t.dtype == torch.float32
    assert t.min() == 0 and abs(t.max().item() - 230 / 255) < 1e-6
    assert image_to_tensor(Image.new("RGB", (40, 30), (255, 255, 255)), SIZE).shape == (3, SIZE, SIZE)


def test_batches_depend_only_on_seed_and_step():
    data = toy_dataset(30)
    a = draw_batch(data, 8, seed=1, step=5)
    b = draw_batch(data, 8, seed=1, step=5)
    c = draw_batch(data, 8, seed=1, step=6)
    assert [id(i) for i in a[0]] == [id(i) for i in b[0]] and a[1] == b[1]
    assert [id(i) for i in a[0]] != [id(i) for i in c[0]]
    assert len(set(map(id, a[0]))) == 8, "a batch holds distinct items when the data set allows"


def test_caption_positives_mark_every_fitting_pair():
    items = [Item(toy_image("red", "left"), ["red square left"]), Item(toy_image("red", "left", 2), ["red square left"]),
             Item(toy_image("blue", "left"), ["blue square left"])]
    positives = caption_positives(["red square left", "red square left", "blue square left"], items)
    assert positives.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


def test_training_learns_colour_and_side_and_writes_its_files(tmp_path):
    data = toy_dataset(64, seed=0)
    folder = train_clip(data, TOKENIZER, tmp_path, toy_config(steps=150))
    assert folder == tmp_path / "clip"
    model = CLIP.from_pretrained(folder)

    # Each caption must pick its own image among the four (colour x side) scenes.
    scenes = [(c, s) for c in COLOURS for s in SIDES]
    images = torch.stack([image_to_tensor(toy_image(c, s, top=6), SIZE) for c, s in scenes])
    for k, (colour, side) in enumerate(scenes):
        text = TOKENIZER.encode_batch([f"a {colour} square on the {side}"])
        scores = model.score(text, images)
        assert scores.argmax().item() == k, (colour, side, scores)

    with open(tmp_path / "logs" / "clip.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(10, 151, 10))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    # The last 12 of the 64 items were held out; with four scenes, a trained model finds a
    # fitting image for every caption, on unseen items as on training ones.
    fit = json.loads((tmp_path / "logs" / "clip_fit.json").read_text())
    assert (fit["train_items"], fit["val_items"], fit["pool"]) == (52, 12, 12)
    assert fit["val_r_at_1"] >= 0.9 and fit["train_r_at_1"] >= 0.9 and fit["diagnoses"] == [], fit
    assert float(rows[-1]["val_r_at_1"]) == fit["val_r_at_1"] and not rows[0]["val_r_at_1"]
    assert float(rows[-1]["mean_loss"]) > 0
    untrained = CLIP(toy_config().clip)
    r1, captions = retrieval_at_1(untrained, data, range(52, 64), TOKENIZER, pool=12)
    assert captions == 12 and r1 < fit["val_r_at_1"]

    held_out = toy_dataset(40, seed=99)
    metrics = evaluate_clip(model, held_out, TOKENIZER, n=40, seed=0)
    # Only four distinct scenes exist, so own-image R@1 is about 1/10 by construction;
    # the caption-consistent rate is what a correct model gets right.
    assert metrics["r_at_1_caption_consistent"] == 1.0, metrics
    assert 0.0 <= metrics["r_at_1"] <= metrics["r_at_5"] <= 1.0
    assert metrics["n"] == 40


class Preempted(Exception):
    pass


class CrashingDataset(list):
    """Raises after ``limit`` item reads, like a job killed mid-run."""

    def __init__(self, items, limit):
        super().__init__(items)
        self.reads, self.limit = 0, limit
        if hasattr(items, "hard_negatives"):  # the wrapped set's twins (the CLIP loop's hook)
            self.hard_negatives = items.hard_negatives

    def __getitem__(self, index):
        self.reads += 1
        if self.reads > self.limit:
            raise Preempted
        return super().__getitem__(index)


@pytest.mark.parametrize("regularised", [False, True], ids=["plain", "crops-dropout-decay"])
def test_resume_is_exact(tmp_path, regularised):
    data = toy_dataset(24, seed=1)
    config = toy_config(steps=7, batch=6)
    if regularised:  # the random crops and dropout draws are replayed exactly too
        config.train.clip_crop_scale, config.train.clip_weight_decay, config.clip.dropout = (0.6, 0.9), 0.3, 0.2
    straight = CLIP.from_pretrained(train_clip(data, TOKENIZER, tmp_path / "a", config, log_every=2))

    # Dies while drawing the sixth step's batch; the last checkpoint is after four steps.
    with pytest.raises(Preempted):
        train_clip(CrashingDataset(data, limit=5 * 6 + 2), TOKENIZER, tmp_path / "b", config,
                   log_every=2, checkpoint_every=2)
    assert (tmp_path / "b" / "checkpoints" / "clip" / "step_00000004").is_dir()
    resumed = CLIP.from_pretrained(train_clip(data, TOKENIZER, tmp_path / "b", config, resume=True, log_every=2))

    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    with open(tmp_path / "b" / "logs" / "clip.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [2, 4, 6, 7], "the log keeps one row per step, none repeated after the resume"
    rows = lambda p: [{k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
                      for r in csv.DictReader(open(p / "logs" / "clip.csv"))]
    assert rows(tmp_path / "a") == rows(tmp_path / "b")  # mean losses and retrieval included
    fit = lambda p: json.loads((p / "logs" / "clip_fit.json").read_text())  # noqa: E731
    assert fit(tmp_path / "a") == fit(tmp_path / "b") and fit(tmp_path / "a")["val_items"] == 4


def test_minutes_budget_stops_and_saves(tmp_path):
    folder = train_clip(toy_dataset(16), TOKENIZER, tmp_path, toy_config(steps=10**6), minutes=0.02)
    assert CLIP.from_pretrained(folder).config.image_size == SIZE


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        train_clip(toy_dataset(1), TOKENIZER, tmp_path, toy_config())
    with pytest.raises(ValueError, match="steps"):
        train_clip(toy_dataset(4), TOKENIZER, tmp_path, toy_config(), steps=0)


# --- Hard negatives on the shapes set ---------------------------------------------------


def test_perturbed_scenes_break_the_caption_in_one_attribute():
    import numpy as np

    from dalle.data.shapes import ShapesDataset, check_scene, render
    from dalle.evaluation.shapes_judge import judge
    from dalle.data.shapes_twins import PERTURBATIONS, perturb_scene

    rng = np.random.default_rng(0)
    seen = set()
    for item in ShapesDataset("val", 60, seed=0):
        caption = item.captions[int(rng.integers(len(item.captions)))]
        assert judge(item.image, caption), (caption, "the set's own image must pass")
        for what in PERTURBATIONS:
            scene = perturb_scene(item.scene, caption, what, rng)
            if scene is None:
                continue
            seen.add(what)
            check_scene(scene)
            changed = [(a, b) for a, b in zip(item.scene.objects, scene.objects) if a != b]
            assert len(changed) == (2 if what == "relation" else 1), (what, changed)
            # The independent judge must reject the caption on the perturbed image.
            assert not judge(render(scene), caption), (what, caption, scene)
    assert seen == set(PERTURBATIONS)


def test_hard_negative_evaluation_reports_every_attribute():
    from dalle.data.shapes import ShapesDataset
    from dalle.data.shapes_twins import PERTURBATIONS
    from dalle.training.clip import evaluate_clip_hard_negatives

    words = sorted({w for item in ShapesDataset("val", 200, seed=0) for c in item.captions for w in c.split()})
    tokenizer = WordTokenizer(words, 16)
    config = CLIPConfig(text_vocab=len(words) + 16, text_len=16, text_layers=1, text_width=32, text_heads=2,
                        image_size=64, patch_size=16, image_layers=1, image_width=32, image_heads=2, embed_dim=32)
    torch.manual_seed(0)
    result = evaluate_clip_hard_negatives(CLIP(config), ShapesDataset("val", 200, seed=0), tokenizer, n=60)
    assert result["n"] == 60
    assert set(result["pairwise"]) == set(PERTURBATIONS)
    assert all(0.0 <= v <= 1.0 for v in result["pairwise"].values())
    assert 0.0 <= result["top1_among_hard"] <= 1.0 and 0.0 <= result["pairwise_all"] <= 1.0
    assert sum(result["pairs"].values()) >= 2 * 60, "colour and shape apply to every caption"


def test_twins_are_near_misses_with_their_own_true_caption():
    import numpy as np

    from dalle.data.shapes import ShapesDataset
    from dalle.evaluation.shapes_judge import judge
    from dalle.data.shapes_twins import hard_negative_twins

    items, captions = draw_batch(ShapesDataset("train", 500, seed=0), 48, seed=0, step=0)
    twins, twin_captions = hard_negative_twins(items, captions, np.random.default_rng(0))
    assert len(twins) == len(items)
    for item, caption, twin, twin_caption in zip(items, captions, twins, twin_captions):
        assert judge(twin.image, twin_caption) and not judge(twin.image, caption), (caption, twin_caption)
        assert not judge(item.image, twin_caption), (caption, twin_caption)
    positives = caption_positives(captions + twin_captions, items + twins)
    n = len(items)
    assert not positives[:n, n:].diagonal().any() and not positives[n:, :n].diagonal().any()


def shapes_word_tokenizer(text_len: int = 24) -> WordTokenizer:
    from dalle.data import shapes

    words = {"a", "an", "and", "of", "the", "to", "in", "on", "at", "near", "picture", "image", "drawing", "black",
             "background", "corner", "middle", "center", "top", "bottom", "left", "right", "above", "below",
             "small", "large", *shapes.COLOURS, *shapes.SHAPES}
    return WordTokenizer(sorted(words), text_len)


def test_shapes_training_with_twins_resumes_exactly(tmp_path):
    from dalle.data.shapes import ShapesDataset

    tokenizer = shapes_word_tokenizer()
    clip = CLIPConfig(text_vocab=tokenizer.vocab_size + tokenizer.text_len, text_len=tokenizer.text_len,
                      text_layers=1, text_width=32, text_heads=2, image_size=64, patch_size=16, image_layers=1,
                      image_width=32, image_heads=2, embed_dim=32)
    config = DalleConfig(clip=clip, train=TrainConfig(clip_steps=5, clip_batch=4, clip_lr=1e-3, seed=0))
    data = ShapesDataset("train", 100, seed=0)
    straight = CLIP.from_pretrained(train_clip(data, tokenizer, tmp_path / "a", config, log_every=1))
    with pytest.raises(Preempted):  # dies in the fourth step, after the checkpoint of step 2
        train_clip(CrashingDataset(data, limit=3 * 4 + 1), tokenizer, tmp_path / "b", config, checkpoint_every=2)
    resumed = CLIP.from_pretrained(train_clip(data, tokenizer, tmp_path / "b", config, resume=True))
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def clip_codes(**figures) -> set[str]:
    figures = {"train_r1": 0.8, "val_r1": 0.75, "pool": 16, "captions": 64, **figures}
    found = diagnose_clip(**figures)
    assert all(d.message for d in found)
    return {d.code for d in found}


def test_diagnose_clip_quiet_on_a_healthy_run():
    assert clip_codes() == set()
    assert clip_codes(val_r1=None) == set()


def test_diagnose_clip_near_chance():
    assert clip_codes(train_r1=0.1, val_r1=0.08) == {"near_chance"}  # chance among 16 is 6%
    assert clip_codes(train_r1=0.1, val_r1=None) == {"near_chance"}  # judged on training captions then
    assert clip_codes(train_r1=0.3, val_r1=0.25) == set()
    assert clip_codes(train_r1=0.3, val_r1=0.3, pool=4) == {"near_chance"}  # chance among 4 is 25%


def test_diagnose_clip_memorising_beyond_the_noise():
    assert clip_codes(train_r1=0.95, val_r1=0.5) == {"memorising"}
    assert clip_codes(train_r1=0.9, val_r1=0.75) == set()  # 15 points: within the margin
    # 100% against 50% on two captions each is a coin toss, not evidence.
    assert clip_codes(train_r1=1.0, val_r1=0.5, captions=2) == set()


def test_augmented_views_are_crops_drawn_from_seed_step_and_index():
    image = toy_image("red", "left")
    plain = augmented_image(image, SIZE, (1.0, 1.0), seed=0, step=0, index=0)
    assert torch.equal(plain, image_to_tensor(image, SIZE))  # (1, 1): no augmentation
    view = lambda step, index: augmented_image(image, SIZE, (0.5, 0.8), seed=0, step=step, index=index)  # noqa: E731
    assert torch.equal(view(3, 1), view(3, 1))
    assert not torch.equal(view(3, 1), view(3, 2)) and not torch.equal(view(3, 1), plain)
    assert view(3, 1).shape == (3, SIZE, SIZE)
    # Never mirrored: over many views the red square's centre stays in the left half.
    for step in range(20):
        red = (view(step, 0)[0] > 0.5) & (view(step, 0)[2] < 0.5)
        if red.any():
            assert red.nonzero()[:, 1].float().mean() < SIZE / 2


def test_bad_crop_scale_is_refused(tmp_path):
    config = toy_config()
    config.train.clip_crop_scale = (0.9, 0.5)
    with pytest.raises(ValueError, match="train.clip_crop_scale"):
        train_clip(toy_dataset(4), TOKENIZER, tmp_path, config)
