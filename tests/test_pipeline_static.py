"""The pipeline's choice of decoder: StaticDecoders made once per batch size, same images as the cached loop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for helpers/, whatever pytest's import mode

from helpers.tiny_pipeline import build_tiny_pipeline, shapes_image  # noqa: E402

import dalle.sampling as sampling  # noqa: E402
from dalle.sampling import StaticDecoder  # noqa: E402


@pytest.fixture()
def built(monkeypatch) -> list[StaticDecoder]:
    """Every StaticDecoder the sampler builds (on a GPU each one captures a CUDA graph)."""
    made: list[StaticDecoder] = []

    class Counted(StaticDecoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(sampling, "StaticDecoder", Counted)
    return made


def same_result(a, b) -> bool:
    return a.all_scores == b.all_scores and all(x.tobytes() == y.tobytes() for x, y in zip(a.images, b.images))


def test_static_pipeline_reuses_one_decoder_and_draws_the_cached_images(built):
    pipe = build_tiny_pipeline()
    assert pipe.decoder == "auto" and pipe.decoder_for(4) == "cached"  # the CPU: the cached loop
    cached = pipe("a red circle", candidates=5, keep=3, batch_size=2, seed=3)
    assert built == []
    pipe.decoder = "static"  # what "auto" picks on a GPU (here without a CUDA graph)
    static = pipe("a red circle", candidates=5, keep=3, batch_size=2, seed=3)  # batches of 2, 2 and 1 (padded)
    assert len(built) == 1 and built[0].batch == 2 and built[0].graph is None
    assert same_result(static, cached)
    other = pipe("a small blue square above a green triangle", candidates=4, keep=1, batch_size=2, seed=0)
    image = shapes_image()
    completed = pipe.complete(image, "a red circle", keep_rows=3, candidates=2, keep=2, seed=1)  # batch 2 again
    assert len(built) == 1  # one decoder (one graph) for every prompt with that batch size
    pipe.decoder = "cached"
    assert same_result(other, pipe("a small blue square above a green triangle", candidates=4, keep=1, batch_size=2,
                                   seed=0))
    assert same_result(completed, pipe.complete(image, "a red circle", keep_rows=3, candidates=2, keep=2, seed=1))


def test_static_decoders_kept_are_bounded_and_bad_choices_fail_early(built):
    pipe = build_tiny_pipeline()
    pipe.decoder = "static"
    first = pipe.decoder_for(3)
    assert pipe.decoder_for(3) is first
    for batch in (1, 2, 4):
        pipe.decoder_for(batch)
    assert len(pipe._decoders) == pipe.MAX_DECODERS and len(built) == 4
    assert all(d.model is pipe.sampler for d in built)
    with pytest.raises(ValueError, match="decoder must be one of"):
        type(pipe)(pipe.tokenizer, pipe.dvae, pipe.transformer, pipe.clip, device="cpu", decoder="graphs")
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        pipe("a red circle", candidates=2, keep=1, batch_size=-1)
