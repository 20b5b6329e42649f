"""OpenAI's released CLIP -> our CLIP folder, checked against OpenAI's own CLIP code.

The reference is OpenAI's ``clip/model.py`` and ``clip/simple_tokenizer.py`` as packaged on
PyPI by ``clip-anytorch`` (the ``reference`` test extra; its tokenizer needs ftfy and regex).
The two modules are loaded from their files: the package's ``__init__`` imports
torchvision, which has no wheel for the pinned CPU torch on PyPI (see README).  Each
reference model gets random weights, is saved the way OpenAI saved theirs (a TorchScript
archive), converted, and compared: same tokens, same image and text embeddings (1e-5).
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dalle.cli import main
from dalle.clip_tokenizer import CLIPTokenizer
from dalle.convert import read_conversion
from dalle.convert.openai_clip import find_vocab
from dalle.convert.safe_pickle import UnsafeFileError
from dalle.openai_clip import PIXEL_MEAN, PIXEL_STD, OpenAICLIP

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a red circle", "A small blue square above a green triangle!", "two cats & 3 dogs, isn't it?",
            "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e at 12:30pm", "  spaces\tand\nnewlines  ", "emoji-free unicode: \u00df\u00f8\u00e5"]


def load_reference(name: str):
    spec = importlib.util.find_spec("clip")
    path = Path(spec.submodule_search_locations[0]) / f"{name}.py" if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        pytest.skip("the reference extra: pip install --no-deps clip-anytorch==2.6.0 ftfy regex")
    loader = importlib.util.spec_from_file_location(f"clip_reference_{name}", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ref():
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    return load_reference("model")


def randomise(model: torch.nn.Module) -> None:
    """Move every tensor off its initial value (zero biases, unit norms), so a misplaced one shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)


def build(ref, resnet: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if resnet:  # RN-style: 4 stages of one bottleneck, 64 px -> a 2x2 attention pool
        model = ref.CLIP(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8,
                         vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=128,
                         transformer_heads=2, transformer_layers=2)
    else:  # ViT-style: 32 px in 8 px patches, two heads in each tower
        model = ref.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
                         context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
                         transformer_layers=2)
    randomise(model)
    return model.eval()


def save_torchscript(model: torch.nn.Module, path: Path) -> None:
    """As OpenAI shipped their CLIPs: a TorchScript archive of the traced model."""
    size = model.visual.input_resolution
    text = torch.zeros(2, 77, dtype=torch.long)
    text[:, :4] = torch.tensor([49406, 320, 1000, 49407])
    torch.jit.save(torch.jit.trace(model, (torch.randn(2, 3, size, size), text)), str(path))


@pytest.fixture(scope="module")
def tokenizer():
    vocab = find_vocab()
    if vocab is None:
        pytest.skip("CLIP's vocabulary ships with the reference extra (clip-anytorch)")
    return CLIPTokenizer(vocab)


def test_tokens_are_clips(tokenizer):
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    reference = load_reference("simple_tokenizer").SimpleTokenizer()
    ids = tokenizer.encode_batch(CAPTIONS)
    assert ids.shape == (len(CAPTIONS), 77) and tokenizer.vocab_size == 49408
    for row, caption in zip(ids, CAPTIONS):
        expected = [49406, *reference.encode(caption), 49407]
        assert row[: len(expected)].tolist() == expected and not row[len(expected):].any(), caption
    long = tokenizer.encode_batch(["word " * 200])[0]
    assert long[0] == 49406 and long[-1] == 49407 and (long != 0).all()


@pytest.mark.parametrize("resnet", [False, True], ids=["vit", "resnet"])
def test_converted_clip_gives_the_released_embeddings(ref, tokenizer, resnet, tmp_path, capsys):
    model = build(ref, resnet)
    save_torchscript(model, tmp_path / "clip.pt")
    assert main(["convert", "openai-clip", str(tmp_path / "clip.pt"), "--out", str(tmp_path / "out")]) == 0
    assert "converted openai-clip" in capsys.readouterr().out
    ours = OpenAICLIP.from_pretrained(tmp_path / "out")
    assert ours.config.is_resnet == resnet
    size = ours.config.image_size
    pixels = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    normalised = (pixels - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    tokens = tokenizer.encode_batch(CAPTIONS[:3])
    with torch.no_grad():
        ref_image, ref_text = model.encode_image(normalised), model.encode_text(tokens)
        torch.testing.assert_close(ours.image_features(normalised), ref_image, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.text_features(tokens), ref_text, atol=1e-5, rtol=0)
        # The reranker's path: [0, 1] images in, CLIP's normalisation applied inside.
        torch.testing.assert_close(ours.encode_image(pixels), F.normalize(ref_image, dim=-1), atol=1e-5, rtol=0)
    assert ref_image.std() > 0.05 and ref_text.std() > 0.05  # the comparison is not of near-zeros
    record = read_conversion(tmp_path / "out")
    assert record["converted_from"] == "openai-clip" and record["image_tower"] == ("ResNet" if resnet else "ViT")


def test_files_that_are_not_clip_are_refused(tmp_path, capsys):
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.randn(1, 2)), str(tmp_path / "linear.pt"))
    with pytest.raises(UnsafeFileError, match="no CLIP text tower"):
        from dalle.convert.openai_clip import read_released_tensors

        read_released_tensors(tmp_path / "linear.pt")
    assert main(["convert", "openai-clip", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def model_with_openai_clip(ref, tmp_path_factory):
    """The tiny pipeline's folder with a converted OpenAI CLIP as its reranker."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers.tiny_pipeline import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("model")
    pipe = build_tiny_pipeline()
    pipe.clip = None
    pipe.save_pretrained(folder)
    save_torchscript(build(ref, resnet=False), folder / "clip.pt")
    assert main(["convert", "openai-clip", str(folder / "clip.pt"), "--out", str(folder / "clip")]) == 0
    (folder / "clip.pt").unlink()
    return folder


def test_generate_reranks_with_a_converted_clip(model_with_openai_clip, tmp_path):
    from dalle.pipeline import DallePipeline, pil_to_tensor

    pipe = DallePipeline.from_pretrained(model_with_openai_clip, device="cpu")
    assert isinstance(pipe.clip, OpenAICLIP)
    result = pipe("a red circle", candidates=4, keep=4, seed=0)
    assert result.scores == sorted(result.scores, reverse=True)
    tokens = pipe.clip.tokenizer.encode_batch(["a red circle"])
    assert torch.equal(pipe.reranker_text("a red circle", pipe.encode_prompt("a red circle")), tokens)
    rescored = pipe.clip.score(tokens, torch.cat([pil_to_tensor(im, 64) for im in result.images]))
    torch.testing.assert_close(rescored, torch.tensor(result.scores), atol=5e-3, rtol=0)  # 8-bit pixels
    assert main(["generate", "a red circle", "--model", str(model_with_openai_clip), "--candidates", "3",
                 "--keep", "2", "--out", str(tmp_path / "gen")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["clip_score"] >= rows[1]["clip_score"]


def test_the_page_reranks_with_a_converted_clip(model_with_openai_clip):
    from dalle.pipeline import DallePipeline
    from dalle.serve import make_server

    srv = make_server(lambda: DallePipeline.from_pretrained(model_with_openai_clip, device="cpu"), "127.0.0.1", 0,
                      quiet=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        body = json.dumps({"prompt": "a red circle", "candidates": 3, "keep": 2, "seed": 1}).encode()
        req = urllib.request.Request(srv.url.rstrip("/") + "/api/generate", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as response:
            job = json.loads(response.read())
        deadline = time.monotonic() + 60
        while job["state"] not in ("done", "error") and time.monotonic() < deadline:
            time.sleep(0.05)
            with urllib.request.urlopen(srv.url.rstrip("/") + f"/api/jobs/{job['id']}", timeout=30) as response:
                job = json.loads(response.read())
        assert job["state"] == "done", job.get("error")
        with srv.worker.model_lock:
            expected = srv.pipeline("a red circle", candidates=3, keep=2, seed=1)
        assert [r["score"] for r in job["results"]] == pytest.approx(expected.scores)
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)
