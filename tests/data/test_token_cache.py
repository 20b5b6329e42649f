"""The token cache: built with a real (if simple) encoder, read back, resumed, refused when stale."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalle.data import (
    FolderDataset,
    StaleCacheError,
    TokenCache,
    TokenCacheError,
    WebDatasetShards,
    build_token_cache,
    eval_transform,
    fingerprint_state_dict,
    iter_samples,
)


def patch_colour_codes(images: torch.Tensor) -> torch.Tensor:
    """A stand-in dVAE encoder: each 8x8 patch's mean colour, 4 levels a channel -> one of 64 codes."""
    levels = (F.avg_pool2d(images, 8) * 3.999).floor().long()  # [B, 3, g, g] in 0..3
    return levels[:, 0] * 16 + levels[:, 1] * 4 + levels[:, 2]


class CountingEncoder:
    def __init__(self, fail_on_call: int | None = None):
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        return patch_colour_codes(images)


def test_round_trip_with_a_bad_image_left_out(shapes_dir, tmp_path):
    (shapes_dir / "000002b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (shapes_dir / "000002b.txt").write_text("a caption of a broken file\n")
    ds = FolderDataset(shapes_dir, max_bad_fraction=0.5)
    cache = build_token_cache(
        ds, patch_colour_codes, tmp_path / "cache", 64, batch_size=4, progress=False,
        fingerprint="dvae-A", codebook_size=64, source=str(shapes_dir),
    )  # fmt: skip
    good = list(iter_samples(FolderDataset(shapes_dir, max_bad_fraction=0.5)))
    assert len(cache) == len(good) == 6
    for i, sample in enumerate(good):
        tokens, captions = cache[i]
        expected = patch_colour_codes(eval_transform(sample.image, 64)[None])[0]
        assert tokens.dtype == torch.int64 and tokens.shape == (8, 8)
        assert torch.equal(tokens, expected) and captions == sample.captions
    assert len(set(cache.tokens.reshape(6, -1).sum(1).tolist())) > 1  # the images differ, so do the grids
    stored = np.load(tmp_path / "cache" / "tokens.npy", mmap_mode="r")
    assert stored.dtype == np.uint16 and stored.shape == (6, 8, 8) and isinstance(stored, np.memmap)
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["count"] == 6 and meta["skipped"] == 1 and list(meta["skipped_items"]) == ["000002b.png"]
    assert (meta["grid"], meta["codebook_size"], meta["fingerprint"]) == (8, 64, "dvae-A")
    batch, caps = cache.batch([4, 1])
    assert torch.equal(batch[1], cache[1][0]) and caps[0] == cache[4][1]
    assert not (tmp_path / "cache.partial").exists()


def test_stale_fingerprint_is_detected(shapes_dir, tmp_path):
    ds = FolderDataset(shapes_dir)
    out = tmp_path / "cache"
    build_token_cache(ds, patch_colour_codes, out, 64, progress=False, fingerprint="dvae-A", codebook_size=64)
    assert TokenCache(out, fingerprint="dvae-A").fingerprint == "dvae-A"
    with pytest.raises(StaleCacheError, match="dvae-A"):
        TokenCache(out, fingerprint="dvae-B")
    enc = CountingEncoder()
    again = build_token_cache(ds, enc, out, 64, progress=False, fingerprint="dvae-A", codebook_size=64)
    assert enc.calls == 0 and len(again) == 6  # up to date: reused, nothing encoded
    with pytest.raises(StaleCacheError, match="overwrite=True"):
        build_token_cache(ds, enc, out, 64, progress=False, fingerprint="dvae-B", codebook_size=64)
    rebuilt = build_token_cache(ds, enc, out, 64, progress=False, fingerprint="dvae-B", codebook_size=64, overwrite=True)
    assert enc.calls == 1 and rebuilt.fingerprint == "dvae-B"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "shapes"]


def test_an_interrupted_build_resumes_where_it_stopped(shapes_dir, tmp_path):
    ds = FolderDataset(shapes_dir)
    args = dict(image_size=64, batch_size=2, progress=False, fingerprint="f", codebook_size=64)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_token_cache(ds, CountingEncoder(fail_on_call=3), tmp_path / "cache", **args)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(TokenCacheError, match="unfinished build"):
        TokenCache(tmp_path / "cache")
    enc = CountingEncoder()
    resumed = build_token_cache(ds, enc, tmp_path / "cache", **args)
    assert enc.calls == 1  # only the third batch of three was left
    fresh = build_token_cache(ds, patch_colour_codes, tmp_path / "fresh", **args)
    assert np.array_equal(resumed.tokens, fresh.tokens)
    assert [resumed[i][1] for i in range(6)] == [fresh[i][1] for i in range(6)]


def test_missing_or_corrupt_caches_are_explained(shapes_dir, tmp_path):
    with pytest.raises(TokenCacheError, match="meta.json is missing"):
        TokenCache(tmp_path / "nothing")
    out = tmp_path / "cache"
    build_token_cache(FolderDataset(shapes_dir), patch_colour_codes, out, 64, progress=False, codebook_size=64)
    lines = (out / "captions.jsonl").read_text().splitlines(keepends=True)
    (out / "captions.jsonl").write_text("".join(lines[:-1]))
    with pytest.raises(TokenCacheError, match="5 lines for 6"):
        TokenCache(out)
    (out / "captions.jsonl").write_text("".join(lines))
    data = (out / "tokens.npy").read_bytes()
    (out / "tokens.npy").write_bytes(data[:-10])
    with pytest.raises(TokenCacheError, match="corrupt"):
        TokenCache(out)
    (out / "meta.json").write_text("{not json")
    with pytest.raises(TokenCacheError, match="corrupt"):
        TokenCache(out)


@pytest.mark.parametrize(
    "bad_encode, error, match",
    [
        (lambda x: patch_colour_codes(x)[:, :4], ValueError, r"\[B=6, g, g\]"),
        (lambda x: patch_colour_codes(x).float(), TypeError, "integer"),
        (lambda x: patch_colour_codes(x) + 64, ValueError, "outside the codebook"),
    ],
)
def test_encoder_output_is_checked(shapes_dir, tmp_path, bad_encode, error, match):
    with pytest.raises(error, match=match):
        build_token_cache(FolderDataset(shapes_dir), bad_encode, tmp_path / "c", 64, progress=False, codebook_size=64)


def test_streams_and_large_codebooks(make_shards, tmp_path):
    make_shards(2, 3)
    ds = WebDatasetShards(tmp_path / "shards")
    cache = build_token_cache(ds, patch_colour_codes, tmp_path / "c", 32, batch_size=4, progress=False, codebook_size=70_000)
    assert len(cache) == 6 and cache.tokens.dtype == np.int32 and cache.grid == 4
    assert cache[5][1] == ["item 000100002"]


def test_fingerprint_follows_the_weights():
    net = torch.nn.Linear(3, 2)
    a = fingerprint_state_dict(net)
    assert a == fingerprint_state_dict(net.state_dict())
    with torch.no_grad():
        net.weight[0, 0] += 1e-3
    assert fingerprint_state_dict(net) != a
