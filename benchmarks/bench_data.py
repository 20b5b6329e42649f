"""Images per second through decode + augment + batching (dalle.data.make_loader).

Two sources, written to a temporary folder first (not timed):
  shapes  - the shapes set's 64x64 PNGs (write_shapes), no crop (the shapes preset);
  photos  - 320x240 JPEGs (smooth colour fields with noise, PIL), the paper's random
            crop (0.75..1 of the short side) resized to 256.
Each is read with 0 and 2 DataLoader workers.

Then WebDataset shards (the shapes images packed as KEY.png + KEY.txt into one
.tar): how fast IndexedShards reads the member headers when opened (headers/s),
how fast it serves samples at random indices (samples/s; read only, and read +
decode), and the streaming reader's pass over the same shard for comparison.

    .venv/bin/python benchmarks/bench_data.py [--count 2000] [--photo-count 500] [--workers 0 2]
                                              [--shard-samples 2000]
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalle.data import (
    PAPER_CROP_SCALE,
    SHAPES_CROP_SCALE,
    FolderDataset,
    IndexedShards,
    WebDatasetShards,
    make_loader,
)


def write_photos(out: Path, count: int, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:240, 0:320]
    for i in range(count):
        a, b, c = rng.uniform(0.01, 0.05, 3)
        base = np.stack([np.sin(a * xx), np.cos(b * yy), np.sin(c * (xx + yy))], -1) * 100 + 128
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(out / f"{i:06d}.jpg", quality=90)
        (out / f"{i:06d}.txt").write_text(f"photo number {i}\na picture\n")
    return out


def write_shapes_folder(out: Path, count: int) -> Path:
    try:
        from dalle.data.shapes import write_shapes
    except ImportError:  # before the shapes writer exists: flat squares on black
        out.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            im = Image.new("RGB", (64, 64))
            im.paste((230, 25, 25), (10 + i % 20, 12, 30 + i % 20, 32))
            im.save(out / f"{i:06d}.png")
            (out / f"{i:06d}.txt").write_text("a red square\n")
        return out
    return Path(write_shapes(out, count, progress=False))


def measure(folder: Path, image_size: int, crop_scale, batch: int, workers: int) -> float:
    ds = FolderDataset(folder)
    steps = len(ds) // batch
    loader = make_loader(ds, batch, image_size, crop_scale=crop_scale, steps=steps, num_workers=workers)
    start = time.perf_counter()
    n = 0
    for images, _ in loader:
        n += images.shape[0]
    return n / (time.perf_counter() - start)


def write_shard(folder: Path, out: Path, samples: int) -> Path:
    """``samples`` KEY.png + KEY.txt pairs (the folder's images, repeated as needed) in one uncompressed tar."""
    images = sorted(folder.glob("*.png"))
    with tarfile.open(out, "w") as tar:
        for i in range(samples):
            image = images[i % len(images)]
            for name, data in ((f"{i:08d}.png", image.read_bytes()), (f"{i:08d}.txt", image.with_suffix(".txt").read_bytes())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out


def best_of(repeats: int, fn) -> float:
    """The fastest of ``repeats`` runs of ``fn()`` in seconds (the machine is shared)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_shards(shard: Path, samples: int, reads: int = 2000) -> list[tuple[str, float, str]]:
    members = 2 * samples
    index_s = best_of(3, lambda: IndexedShards([shard]))
    ds = IndexedShards([shard])
    order = torch.randint(len(ds), (reads,), generator=torch.Generator().manual_seed(0)).tolist()
    read_s = best_of(3, lambda: [ds._group(i) for i in order])  # the bytes only: seek + read
    load_s = best_of(3, lambda: [ds[i] for i in order])  # as the trainers call it: read + decode
    stream_s = best_of(3, lambda: sum(1 for _ in WebDatasetShards([shard])))
    ds.close()
    return [
        ("index: member headers read", members / index_s, "headers/s"),
        ("random access: bytes read", reads / read_s, "samples/s"),
        ("random access: read + decode", reads / load_s, "samples/s"),
        ("stream (reference): read + decode", samples / stream_s, "samples/s"),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=2000, help="shapes images")
    p.add_argument("--photo-count", type=int, default=500, help="320x240 JPEGs (0 to skip)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--shard-samples", type=int, default=2000, help="samples in the WebDataset shard (0 to skip)")
    args = p.parse_args()
    torch.set_num_threads(1)  # decoding is per-process; keep the comparison about workers
    with tempfile.TemporaryDirectory() as tmp:
        sources = [("shapes 64px PNG, no crop", write_shapes_folder(Path(tmp, "shapes"), args.count), 64, SHAPES_CROP_SCALE)]
        if args.photo_count:
            sources.append(("photos 320x240 JPEG -> 256 crop", write_photos(Path(tmp, "photos"), args.photo_count), 256, PAPER_CROP_SCALE))
        print(f"{'source':34s} {'workers':>7s} {'images/s':>10s}")
        for name, folder, size, scale in sources:
            for w in args.workers:
                rate = measure(folder, size, scale, args.batch, w)
                print(f"{name:34s} {w:7d} {rate:10.0f}")
        if args.shard_samples:
            shard = write_shard(sources[0][1], Path(tmp, "shard.tar"), args.shard_samples)
            print(f"\nWebDataset shard: {args.shard_samples} shapes samples, {2 * args.shard_samples} members, "
                  f"{shard.stat().st_size / 2**20:.1f} MiB")
            for name, rate, unit in measure_shards(shard, args.shard_samples):
                print(f"{name:34s} {rate:10.0f} {unit}")


if __name__ == "__main__":
    main()
