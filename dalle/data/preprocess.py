"""Image preprocessing as in the paper, batching, and a reproducible DataLoader.

Training images get a random square crop whose side is a random fraction
(``crop_scale``) of the shorter side, resized to the model's image size.  There
is no horizontal flip: captions say "left of" and "right of", and a flipped
image would contradict its caption.  Evaluation uses the centred square of the
full shorter side instead, so it is deterministic.

The shapes set must not be cropped at all: its images are already 64 x 64 and
its captions name regions ("in the top left corner") and sizes that a crop
would falsify, so the shapes preset uses :data:`SHAPES_CROP_SCALE` ``(1, 1)``
(for a square image of the model's size that is the identity).

Randomness comes only from explicit ``torch.Generator`` s.  :func:`make_loader`
derives sample ``index`` of step ``step`` from ``(seed, step, index)``, so a
batch is the same whatever the number of workers and after a resume.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from dalle.data.images import Sample, Skipped

# The paper crops a random square of a mildly random size; 0.75..1 of the shorter
# side keeps most of the scene (and so most of what the caption names).
PAPER_CROP_SCALE = (0.75, 1.0)
SHAPES_CROP_SCALE = (1.0, 1.0)  # no crop: regions and sizes in captions must stay true

CropScale = tuple[float, float]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (e.g. ``(seed, step, index)``), well mixed."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_generator(seed: int | torch.Generator | None, *parts: int) -> torch.Generator:
    """A ``torch.Generator`` from a seed (mixed with ``parts``); a generator is returned as is."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    g.manual_seed(derive_seed(0 if seed is None else seed, *parts))
    return g


def _check_crop_scale(crop_scale: Sequence[float]) -> CropScale:
    if len(crop_scale) != 2:
        raise ValueError(f"crop_scale must be (min, max), got {crop_scale!r}")
    lo, hi = float(crop_scale[0]), float(crop_scale[1])
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale!r}")
    return lo, hi


def random_crop_box(
    width: int, height: int, crop_scale: Sequence[float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of a random square whose side is ``U(crop_scale)`` x the shorter side."""
    lo, hi = _check_crop_scale(crop_scale)
    short = min(width, height)
    u = float(torch.rand((), generator=generator))
    side = max(1, min(short, round((lo + (hi - lo) * u) * short)))
    left = int(torch.randint(width - side + 1, (), generator=generator))
    top = int(torch.randint(height - side + 1, (), generator=generator))
    return left, top, left + side, top + side


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square of side ``min(width, height)``."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def crop_resize(image: Image.Image, box: tuple[int, int, int, int], image_size: int) -> Image.Image:
    """Crop ``box`` and resize to ``image_size`` square (bicubic, antialiased when shrinking)."""
    if box == (0, 0, image.width, image.height) and image.size == (image_size, image_size):
        return image  # nothing to do: keeps the shapes set's pixels exact
    if box[2] - box[0] == image_size and box[3] - box[1] == image_size:
        return image.crop(box)
    # reducing_gap: shrink by an integer factor first (fast), then bicubic; quality is unchanged at 3.
    return image.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 ``[3, H, W]`` in [0, 1]."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode} (load images with dalle.data.load_image)")
    array = np.array(image, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0).contiguous()


def train_transform(
    image: Image.Image,
    image_size: int,
    crop_scale: Sequence[float] = PAPER_CROP_SCALE,
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    """Random square crop (side ``U(crop_scale)`` x the shorter side), resize; no flip. -> ``[3, S, S]``."""
    g = make_generator(generator)
    box = random_crop_box(image.width, image.height, crop_scale, g)
    return to_tensor(crop_resize(image, box, image_size))


def eval_transform(image: Image.Image, image_size: int) -> torch.Tensor:
    """Centre square crop of the full shorter side, resize. -> ``[3, S, S]``."""
    return to_tensor(crop_resize(image, center_crop_box(image.width, image.height), image_size))


def pick_caption(captions: Sequence[str], generator: torch.Generator) -> str:
    """One of ``captions`` uniformly at random (a training step sees one of an image's captions)."""
    if not captions:
        raise ValueError("an item has no caption; every image needs at least one")
    return captions[int(torch.randint(len(captions), (), generator=generator))]


def collate_batch(
    samples: Sequence[Sample | Skipped | None],
    image_size: int,
    rng: torch.Generator | int | None = None,
    training: bool = True,
    crop_scale: Sequence[float] = PAPER_CROP_SCALE,
) -> tuple[torch.Tensor, list[str]]:
    """Batch ``samples`` -> ``(images [B, 3, S, S] in [0, 1], one caption per image)``.

    ``None`` and :class:`Skipped` entries are dropped (so ``B`` may be smaller
    than ``len(samples)``).  ``rng`` (a generator or a seed) drives, in sample
    order, the caption choice and, when ``training``, the crop; evaluation takes
    the first caption and the centre crop.
    """
    g = make_generator(rng)
    images, captions = [], []
    for sample in samples:
        if sample is None or isinstance(sample, Skipped):
            continue
        if training:
            captions.append(pick_caption(sample.captions, g))
            images.append(train_transform(sample.image, image_size, crop_scale, g))
        else:
            if not sample.captions:
                raise ValueError(f"item {sample.key} has no caption")
            captions.append(sample.captions[0])
            images.append(eval_transform(sample.image, image_size))
    if not images:
        return torch.empty(0, 3, image_size, image_size), []
    return torch.stack(images), captions


# --- A reproducible DataLoader ---------------------------------------------------------------


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for each step, ``[(step, index), ...]``: the indices are a function of ``(seed, step)``.

    Training (``shuffle``): epoch ``e`` visits a permutation drawn from
    ``(seed, e)``, ``len // batch_size`` full batches an epoch (a data set smaller
    than a batch gives all its items each step); it runs for ``steps`` steps from
    ``start_step``, or forever when ``steps`` is None.  Evaluation: one pass in
    order, the last batch possibly smaller.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int = 0, start_step: int = 0, steps: int | None = None, shuffle: bool = True
    ):
        if n < 1:
            raise ValueError("cannot batch an empty data set")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.start_step = start_step
        if not shuffle and steps is None:
            steps = math.ceil(n / batch_size) - start_step
        self.steps = steps
        self.per_epoch = max(1, n // batch_size)
        self._perm_epoch: int | None = None
        self._perm: list[int] = []

    def indices(self, step: int) -> list[int]:
        if not self.shuffle:
            return list(range(step * self.batch_size, min(self.n, (step + 1) * self.batch_size)))
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._perm_epoch:
            g = make_generator(self.seed, 104_729, epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.steps is None or step < self.start_step + self.steps:
            yield [(step, i) for i in self.indices(step)]
            step += 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless StepBatchSampler (steps=None) has no length")
        return max(0, self.steps)


class _StepIndexed(Dataset):
    """``dataset[(step, index)] -> (step, index, dataset[index])`` so the collate knows the step."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int, Sample]:
        step, index = key
        return step, index, self.dataset[index]


class StepCollate:
    """Collate of :func:`make_loader` (map-style): sample ``index`` of ``step`` uses ``(seed, step, index)``."""

    def __init__(self, image_size: int, training: bool, crop_scale: Sequence[float], seed: int):
        self.image_size, self.training, self.seed = image_size, training, seed
        self.crop_scale = _check_crop_scale(crop_scale)

    def __call__(self, items: Sequence[tuple[int, int, Sample]]) -> tuple[torch.Tensor, list[str]]:
        images, captions = [], []
        for step, index, sample in items:
            one, caption = collate_batch(
                [sample], self.image_size, make_generator(self.seed, step, index), self.training, self.crop_scale
            )
            images.append(one)
            captions += caption
        return torch.cat(images), captions


class StreamCollate:
    """Collate of :func:`make_loader` for streams: one generator per worker, from ``(seed, worker)``.

    A stream has no step-indexed access, so its batches are reproducible for the
    same shards, worker count and seed, but not from a step number alone.
    """

    def __init__(self, image_size: int, training: bool, crop_scale: Sequence[float], seed: int):
        self.image_size, self.training, self.seed = image_size, training, seed
        self.crop_scale = _check_crop_scale(crop_scale)
        self._generator: torch.Generator | None = None

    def __call__(self, samples: Sequence[Sample]) -> tuple[torch.Tensor, list[str]]:
        if self._generator is None:
            info = get_worker_info()
            self._generator = make_generator(self.seed, 7919, info.id if info else -1)
        return collate_batch(samples, self.image_size, self._generator, self.training, self.crop_scale)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    image_size: int,
    *,
    training: bool = True,
    crop_scale: Sequence[float] = PAPER_CROP_SCALE,
    seed: int = 0,
    start_step: int = 0,
    steps: int | None = None,
    num_workers: int = 0,
    pin_memory: bool | None = None,
    **loader_kwargs: Any,
) -> DataLoader:
    """A DataLoader yielding ``(images [B, 3, S, S], captions)``.

    Map-style data sets: the batch of step ``s`` (which items, which caption, which
    crop) depends only on ``(seed, s)``, with any number of workers, so a resumed
    run passes ``start_step`` and sees the same batches.  Training loaders are
    endless unless ``steps`` is given; evaluation loaders make one ordered pass.
    Iterable data sets (WebDataset shards) are batched as they stream, one pass.

    Decoding is the slow part, so ``num_workers`` > 0 helps once images are larger
    than the shapes set's; memory is pinned only when CUDA is available
    (``pin_memory=None``), since pinning without a GPU only costs time.
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    common = dict(num_workers=num_workers, pin_memory=pin_memory, **loader_kwargs)
    if num_workers > 0:
        common.setdefault("prefetch_factor", 4)
    if isinstance(dataset, IterableDataset):
        return DataLoader(
            dataset, batch_size=batch_size, collate_fn=StreamCollate(image_size, training, crop_scale, seed), **common
        )
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, steps, shuffle=training)  # type: ignore[arg-type]
    return DataLoader(
        _StepIndexed(dataset),
        batch_sampler=sampler,
        collate_fn=StepCollate(image_size, training, crop_scale, seed),
        **common,
    )


__all__ = [
    "PAPER_CROP_SCALE",
    "SHAPES_CROP_SCALE",
    "StepBatchSampler",
    "center_crop_box",
    "collate_batch",
    "crop_resize",
    "derive_seed",
    "eval_transform",
    "make_generator",
    "make_loader",
    "pick_caption",
    "random_crop_box",
    "to_tensor",
    "train_transform",
]
