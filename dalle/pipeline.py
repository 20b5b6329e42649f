"""Text-to-image generation end to end: tokenize, sample, decode, rerank.

``DallePipeline`` holds the four trained parts of a model folder (diffusers-style:
``tokenizer/``, ``dvae/``, ``transformer/``, ``clip/``) and turns a prompt into
images ranked by CLIP, or completes part of an existing image.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

ProgressCallback = Callable[[int, int], None]

import torch
from PIL import Image

from dalle.clip import CLIP, load_reranker
from dalle.data.preprocess import eval_transform
from dalle.dvae import DiscreteVAE, load_image_tokenizer
from dalle.io import ModelLoadError
from dalle.sampling import (
    StaticDecoder, check_guidance, generate_images_tokens, keep_rows_mask, prepare_for_sampling, region_mask,
    static_decoder_for, use_static_decoder,
)
from dalle.tokenizer import TextTokenizer
from dalle.transformer import DalleTransformer

COMPONENTS = ("tokenizer", "dvae", "transformer", "clip")


def bundled_model_dir() -> Path:
    """The small shapes model shipped inside the package (the default ``--model``)."""
    return Path(str(resources.files("dalle") / "bundled"))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class GenerationResult:
    """Kept images of one prompt, best first, with their CLIP scores."""

    prompt: str
    images: list[Image.Image]
    scores: list[float]
    seed: int
    all_scores: list[float] = field(default_factory=list)  # every candidate, in sampling order


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> RGB PIL images."""
    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in arrays]


def pil_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """A PIL image, centre-cropped to a square and resized, as [1, 3, size, size] in [0, 1]."""
    return eval_transform(image.convert("RGB"), size).unsqueeze(0)


def load_user_image(path: str | Path) -> Image.Image:
    """Open an image given by a user, with an error that says what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"image {path} is a folder; give an image file (PNG or JPEG)")
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        from dalle.data.images import BadImageError, load_image
    except ImportError:  # pragma: no cover - the data package is part of the install
        return Image.open(path).convert("RGB")
    try:
        return load_image(path)
    except BadImageError as e:
        if e.key is not None:
            raise
        raise BadImageError(e.reason, key=f"image {path}") from None  # say which file


UNKNOWN_REFUSED = 0.5  # a prompt with more than this share of unknown words is refused


def prompt_word_problem(tokenizer: TextTokenizer, prompt: str) -> tuple[str | None, str | None]:
    """``(error, warning)`` about words of ``prompt`` the model's vocabulary cannot read.

    Most words unknown: an error (the images would not depend on the prompt); some: a
    warning naming them.  Both say what the model does read.
    """
    if not hasattr(tokenizer, "unknown_words"):
        return None, None
    unknown, total = tokenizer.unknown_words(prompt)
    if not unknown:
        return None, None
    shown = ", ".join(repr(w) for w in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    reads = f"it reads the words of its training captions, e.g. {', '.join(tokenizer.known_words(8))}"
    if len(unknown) > UNKNOWN_REFUSED * total:
        return (f"the model cannot read {len(unknown)} of the {total} words of this prompt ({shown}): its images would "
                f"not follow it; {reads}"), None
    return None, f"the model cannot read {shown} and ignores it; {reads}"


def check_prompt_words(tokenizer: TextTokenizer, prompt: str, stacklevel: int = 2) -> None:
    """Raise ValueError for a prompt the model mostly cannot read; warn about single unknown words."""
    error, warning = prompt_word_problem(tokenizer, prompt)
    if error:
        raise ValueError(error)
    if warning:
        warnings.warn(warning, stacklevel=stacklevel)


class DallePipeline:
    """Prompt -> ranked images.  Build with :meth:`from_pretrained`.

    ``decoder`` is :func:`dalle.sampling.generate_images_tokens`'s: ``"auto"`` samples with a
    CUDA-graph :class:`StaticDecoder` on a GPU and the cached loop on the CPU.
    """

    # Static decoders kept at once (one per batch size); each holds a key/value cache:
    # 2 GB in bf16 at batch 32 for benchmarks/bench_gpu.py's model (12 layers, d_model 1024, 1280 tokens).
    MAX_DECODERS = 2

    def __init__(self, tokenizer: TextTokenizer, dvae: DiscreteVAE, transformer: DalleTransformer,
                 clip: CLIP | None = None, device: str | torch.device | None = None, decoder: str = "auto"):
        self.device = torch.device(device or default_device())
        use_static_decoder(decoder, self.device)  # a bad name fails here, not at the first prompt
        self.decoder = decoder
        self._decoders: dict[tuple[int, str], StaticDecoder | None] = {}  # made on first use, reused
        self.tokenizer = tokenizer
        self.dvae = dvae.to(self.device).eval()
        self.transformer = transformer.to(self.device).eval()
        self.clip = clip.to(self.device).eval() if clip is not None else None
        self._sampler: DalleTransformer | None = None  # made on first use
        grid = self.transformer.config.image_grid
        if self.dvae.grid_size != grid:
            raise ModelLoadError(f"the dVAE makes {self.dvae.grid_size}x{self.dvae.grid_size} tokens "
                                 f"but the transformer expects {grid}x{grid}")

    # --- folders -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | Path | None = None, device: str | torch.device | None = None) -> "DallePipeline":
        folder = Path(folder) if folder is not None else bundled_model_dir()
        if folder.is_file():
            raise ModelLoadError(f"{folder} is a file; give the model folder (the one holding tokenizer/, dvae/, transformer/)")
        if not folder.is_dir():
            raise ModelLoadError(f"model folder {folder} does not exist (train one with: dalle train all --data DIR --out {folder})")
        missing = [c for c in COMPONENTS[:3] if not (folder / c).is_dir()]
        if missing:
            raise ModelLoadError(f"model folder {folder} lacks {', '.join(missing)}/ (train it with dalle train ... --out {folder})")
        device = device or default_device()
        tokenizer = TextTokenizer.from_pretrained(folder / "tokenizer")
        dvae = load_image_tokenizer(folder / "dvae", device=device)
        transformer = DalleTransformer.from_pretrained(folder / "transformer", device=device)
        clip = load_reranker(folder / "clip", device=device) if (folder / "clip").is_dir() else None
        return cls(tokenizer, dvae, transformer, clip, device=device)

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.dvae.save_pretrained(folder / "dvae", dtype=dtype)
        self.transformer.save_pretrained(folder / "transformer", dtype=dtype)
        if self.clip is not None:
            self.clip.save_pretrained(folder / "clip", dtype=dtype)
        return folder

    @property
    def sampler(self) -> DalleTransformer:
        """An inference copy of the transformer with weights packed for fast decoding."""
        if self._sampler is None:
            self._sampler = prepare_for_sampling(self.transformer)
        return self._sampler

    def decoder_for(self, batch: int) -> StaticDecoder | str:
        """What :meth:`_sample` passes as ``decoder`` for batches of up to ``batch`` candidates.

        A :class:`StaticDecoder` is made once per batch size and reused, so its CUDA graph is
        captured once per pipeline, not per prompt; a smaller last batch runs padded in it.
        """
        key = (batch, self.decoder)
        if key not in self._decoders:
            while len(self._decoders) >= self.MAX_DECODERS:
                self._decoders.pop(next(iter(self._decoders)))  # the oldest
            self._decoders[key] = static_decoder_for(self.sampler, batch, self.decoder)
        return self._decoders[key] or "cached"

    @property
    def image_size(self) -> int:
        return self.dvae.config.image_size

    @property
    def grid(self) -> int:
        return self.transformer.config.image_grid

    # --- generation ----------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty; write what the image should show")
        check_prompt_words(self.tokenizer, prompt, stacklevel=4)
        ids, cut = self.tokenizer.encode_with_info(prompt)
        if cut:
            warnings.warn(f"prompt truncated: {cut} token(s) past the model's {self.tokenizer.text_len} were dropped",
                          stacklevel=3)
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def _sample(self, prompt: str, candidates: int, keep: int, seed: int, temperature: float, top_k: int | None,
                top_p: float | None, batch_size: int | None, known: torch.Tensor | None, keep_mask: torch.Tensor | None,
                progress: bool, progress_callback: ProgressCallback | None, guidance: float = 1.0) -> GenerationResult:
        if not 1 <= keep <= candidates:
            raise ValueError(f"keep must be between 1 and candidates ({candidates}), got {keep}")
        check_guidance(self.transformer, guidance)  # before any work
        text = self.encode_prompt(prompt)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        batch_size = batch_size or candidates
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of candidates, got {batch_size}")
        # Guided, every candidate runs two rows (its caption's and the null caption's).
        decoder = self.decoder_for(min(batch_size, candidates) * (1 if guidance == 1 else 2))
        images, scores = [], []
        batches = range(0, candidates, batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"sampling {prompt[:30]!r}", unit="batch", leave=False)
        for start in batches:
            n = min(batch_size, candidates - start)
            tokens = generate_images_tokens(
                self.sampler, text.expand(n, -1), temperature=temperature, top_k=top_k, top_p=top_p,
                generator=generator,
                known_tokens=None if known is None else known.expand(n, -1, -1),
                keep_mask=keep_mask, decoder=decoder, guidance=guidance,
            )
            pixels = self.dvae.decode(tokens).float()
            images.append(pixels)
            if self.clip is not None:
                scores.append(self.clip.score(self.reranker_text(prompt, text), pixels).float())
            if progress_callback is not None:
                progress_callback(start + n, candidates)
        pixels = torch.cat(images)
        if self.clip is not None:
            all_scores = torch.cat(scores)
            order = torch.argsort(all_scores, descending=True, stable=True)[:keep]
        else:  # no reranker: keep sampling order
            all_scores = torch.zeros(candidates, device=pixels.device)
            order = torch.arange(keep, device=pixels.device)
        kept = tensor_to_pil(pixels[order])
        return GenerationResult(prompt, kept, all_scores[order].tolist(), seed, all_scores.tolist())

    def reranker_text(self, prompt: str, text: torch.Tensor) -> torch.Tensor:
        """The prompt as the reranker reads it: our tokenizer's ids, or a converted CLIP's own tokens."""
        own = getattr(self.clip, "tokenizer", None)
        return text if own is None else own.encode_batch([prompt]).to(self.device)

    def __call__(self, prompt: str, candidates: int = 32, keep: int = 4, seed: int = 0, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, batch_size: int | None = None,
                 progress: bool = False, progress_callback: ProgressCallback | None = None,
                 guidance: float = 1.0) -> GenerationResult:
        """Sample ``candidates`` images for ``prompt`` and keep the ``keep`` CLIP ranks best.

        ``progress_callback(done, total)`` is called after each batch of candidates.
        ``guidance``: classifier-free guidance scale (1 = none; other values need a model
        trained with null captions, see :mod:`dalle.sampling`); it doubles the rows sampled.
        """
        return self._sample(prompt, candidates, keep, seed, temperature, top_k, top_p, batch_size, None, None, progress,
                            progress_callback, guidance)

    def image_tokens(self, image: Image.Image) -> torch.Tensor:
        """An image cut to the model's token grid: [1, grid, grid]."""
        return self.dvae.encode(pil_to_tensor(image, self.image_size).to(self.device))

    def complete(self, image: Image.Image, prompt: str, keep_rows: int | None = None,
                 region: tuple[int, int] | None = None, candidates: int = 32, keep: int = 4, seed: int = 0,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 batch_size: int | None = None, progress: bool = False,
                 progress_callback: ProgressCallback | None = None, guidance: float = 1.0) -> GenerationResult:
        """Regenerate the top-``keep_rows``-kept image, or the rectangle from ``region`` to the bottom-right
        (``guidance`` as in :meth:`__call__`)."""
        if (keep_rows is None) == (region is None):
            raise ValueError("give exactly one of keep_rows or region")
        if keep_rows is not None:
            if not 0 <= keep_rows < self.grid:
                raise ValueError(f"keep_rows must be in [0, {self.grid - 1}] for a {self.grid}x{self.grid} token grid, got {keep_rows}")
            mask = keep_rows_mask(self.grid, keep_rows)
        else:
            row, col = region
            if not (0 <= row < self.grid and 0 <= col < self.grid):
                raise ValueError(f"region ROW,COL must be inside the {self.grid}x{self.grid} token grid, got {row},{col}")
            mask = region_mask(self.grid, row, col)
        known = self.image_tokens(image)
        return self._sample(prompt, candidates, keep, seed, temperature, top_k, top_p, batch_size, known,
                            mask.to(self.device), progress, progress_callback, guidance)


MANIFEST = "manifest.jsonl"


def check_output_folder(out: str | Path) -> Path:
    """Make sure ``out`` can take images and a manifest, before any sampling (ValueError says why not).

    An existing manifest must be readable, since :func:`write_results` appends to it.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the images and {MANIFEST}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to --out {out} ({e.strerror or e}); choose a folder you can write to") from None
    manifest = out / MANIFEST
    if manifest.exists():
        try:
            for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip() and not isinstance(json.loads(line), dict):
                    raise ValueError
        except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{manifest} is not a manifest this program can add to; move it away or choose "
                             "another --out") from None
    return out


def _free_name(out: Path, stem: str, taken: set[str]) -> str:
    """``stem.png``, or ``stem_2.png``, ``stem_3.png``... when an earlier run wrote that name already."""
    name, k = f"{stem}.png", 1
    while name in taken or (out / name).exists():
        k += 1
        name = f"{stem}_{k}.png"
    taken.add(name)
    return name


def write_results(results: Sequence[GenerationResult], out: str | Path) -> Path:
    """Write kept images as PNG, one grid a prompt, and ``manifest.jsonl`` (shared/INTERFACE.md).

    The manifest is appended to: a second run into the same folder adds its rows (and
    never overwrites an earlier run's images: a taken name gets a number).  Each image is
    written whole (under a temporary name, then renamed) before its row, and the row is
    flushed at once, so a folder never holds a listed image that is missing.
    """
    out = check_output_folder(out)
    manifest = out / MANIFEST
    taken: set[str] = set()
    with open(manifest, "a", encoding="utf-8") as f:
        for p_index, result in enumerate(results):
            stem = _slug(result.prompt)
            for rank, (image, score) in enumerate(zip(result.images, result.scores)):
                name = _free_name(out, f"{stem}_{p_index:03d}_s{result.seed}_r{rank}", taken)
                _save_png(image, out / name)
                f.write(json.dumps({"prompt": result.prompt, "file": name, "rank": rank, "clip_score": float(score),
                                    "seed": result.seed}) + "\n")
                f.flush()
            _save_png(make_grid(result.images), out / _free_name(out, f"{stem}_{p_index:03d}_s{result.seed}_grid", taken))
    return manifest


def _save_png(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def make_grid(images: Sequence[Image.Image], columns: int | None = None, pad: int = 2) -> Image.Image:
    columns = columns or min(len(images), 8)
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), (64, 64, 64))
    for i, image in enumerate(images):
        grid.paste(image, (pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)))
    return grid


def _slug(text: str, limit: int = 40) -> str:
    slug = "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_")
    while "__" in slug:
        slug = slug.replace("__", "_")
    return slug[:limit] or "prompt"
