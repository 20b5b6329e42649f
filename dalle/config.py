"""Configuration dataclasses, one per component, and the named presets.

Every model folder stores its component's config as JSON next to the weights, so
loading a model never asks the user for hyperparameters.  Presets are plain
functions of no arguments returning a fresh :class:`DalleConfig`.

The paper's constants (Ramesh et al. 2021, appendix B) are named once here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

# --- The paper's constants -------------------------------------------------
PAPER_TEXT_VOCAB = 16384  # BPE vocabulary
PAPER_TEXT_LEN = 256  # text positions, each with its own padding token
PAPER_IMAGE_SIZE = 256  # pixels
PAPER_IMAGE_GRID = 32  # 32 x 32 image tokens
PAPER_IMAGE_VOCAB = 8192  # dVAE codebook
PAPER_BPE_DROPOUT = 0.1
PAPER_TEXT_LOSS_WEIGHT = 1 / 8
PAPER_IMAGE_LOSS_WEIGHT = 7 / 8

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or field that does not fit; the message says which."""


@dataclass
class TokenizerConfig:
    """BPE text tokenizer.

    Ids ``[0, vocab_size)`` are BPE tokens and special tokens; ids
    ``[vocab_size, vocab_size + text_len)`` are the per-position padding tokens
    (position ``i`` pads with id ``vocab_size + i``, as the paper does).
    """

    vocab_size: int = PAPER_TEXT_VOCAB
    text_len: int = PAPER_TEXT_LEN
    bpe_dropout: float = PAPER_BPE_DROPOUT

    @property
    def total_vocab(self) -> int:
        """Size of the transformer's text embedding table (BPE + padding ids)."""
        return self.vocab_size + self.text_len


@dataclass
class DVAEConfig:
    """Discrete VAE (image tokenizer).

    The encoder has ``num_groups`` groups of residual blocks with a 2x max-pool
    between consecutive groups, so the grid is ``image_size / 2**(num_groups-1)``.
    """

    image_size: int = PAPER_IMAGE_SIZE
    channels: int = 3
    hidden_width: int = 256
    blocks_per_group: int = 2
    num_groups: int = 4
    codebook_size: int = PAPER_IMAGE_VOCAB
    quantizer: Literal["gumbel", "vq"] = "gumbel"
    code_dim: int = 64  # embedding width of the VQ codebook (VQ only)
    # Width of each group is hidden_width * multiplier (full resolution first; the
    # decoder mirrors them).  The paper's dVAE uses 1, 2, 4, 8.
    width_multipliers: tuple[int, ...] = (1, 2, 4, 8)
    # Final weight (beta) of the KL to the uniform prior, reached after the warm-up;
    # the paper's is 6.6.  Gumbel quantiser only.
    kl_weight: float = 6.6
    # Reconstruction term: "logit_laplace" (the paper's NLL with a per-pixel learned
    # scale) or "mse" (on [0, 1] pixels).
    recon_loss: Literal["logit_laplace", "mse"] = "logit_laplace"
    # Gumbel only: feed the decoder the one-hot argmax of the relaxed sample while the
    # gradient follows the relaxation (straight-through); False is the paper's.
    straight_through: bool = False

    def __post_init__(self) -> None:
        self.width_multipliers = tuple(self.width_multipliers)  # JSON gives a list

    @property
    def downsample(self) -> int:
        return 2 ** (self.num_groups - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample


@dataclass
class TransformerConfig:
    """Decoder-only transformer over ``text_len`` text then ``image_grid**2`` image tokens.

    ``attention`` = ``"sparse"`` uses the paper's per-layer schedule (column when
    ``(i - 2) % 4 == 0``, convolutional in the last layer, row elsewhere);
    ``"full"`` uses dense causal attention in every layer.  ``attention_impl`` picks the
    kernel of the sparse layers: ``"dense"`` (masked scaled-dot-product attention, the
    reference), ``"flex"`` (FlexAttention block masks, which skip the masked-out tiles) or
    ``"auto"`` (flex on CUDA, dense elsewhere); it changes speed, not results.
    """

    n_layers: int = 64
    n_heads: int = 62
    head_dim: int = 64
    text_vocab: int = PAPER_TEXT_VOCAB + PAPER_TEXT_LEN  # BPE ids + per-position pads
    text_len: int = PAPER_TEXT_LEN
    image_vocab: int = PAPER_IMAGE_VOCAB
    image_grid: int = PAPER_IMAGE_GRID
    attention: Literal["sparse", "full"] = "sparse"
    conv_kernel: int = 11
    mlp_ratio: int = 4
    dropout: float = 0.0
    text_loss_weight: float = PAPER_TEXT_LOSS_WEIGHT
    image_loss_weight: float = PAPER_IMAGE_LOSS_WEIGHT
    attention_impl: Literal["auto", "dense", "flex"] = "auto"

    @property
    def d_model(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def image_len(self) -> int:
        return self.image_grid * self.image_grid

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len


@dataclass
class CLIPConfig:
    """Contrastive text-image model used to rerank samples."""

    text_vocab: int = PAPER_TEXT_VOCAB + PAPER_TEXT_LEN
    text_len: int = PAPER_TEXT_LEN
    text_layers: int = 4
    text_width: int = 256
    text_heads: int = 4
    image_size: int = PAPER_IMAGE_SIZE
    patch_size: int = 16
    image_layers: int = 4
    image_width: int = 256
    image_heads: int = 4
    embed_dim: int = 256


@dataclass
class TrainConfig:
    """How long and how fast each component trains (scaled schedules use ``steps``)."""

    dvae_steps: int = 3000
    dvae_batch: int = 32
    dvae_lr: float = 1e-3
    transformer_steps: int = 3000
    transformer_batch: int = 32
    transformer_lr: float = 1e-3
    transformer_warmup: int = 200
    clip_steps: int = 1500
    clip_batch: int = 64
    clip_lr: float = 1e-3
    grad_accum: int = 1
    ema_decay: float = 0.999
    seed: int = 0
    shapes_size: int = 50_000  # items of the shapes set streamed by ``--data shapes`` (token cache size)
    # Validation split (dalle.training.state.validation_split): the last items of the data set,
    # held out of every stage's training batches, so the logs and fit reports compare training
    # figures with figures on images no stage has seen.  A fraction of the data, at least
    # ``val_min`` items (but never over a fifth of a small set), at most ``val_max``; ``val_fraction=0``
    # turns it off.  Defaults and why: the docstring of validation_split.
    val_fraction: float = 0.02
    val_min: int = 16
    val_max: int = 256


@dataclass
class DalleConfig:
    """All components of one model folder."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    dvae: DVAEConfig = field(default_factory=DVAEConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self) -> None:
        """Raise :class:`ConfigError` if the components disagree with each other."""
        tok, dv, tr, cl = self.tokenizer, self.dvae, self.transformer, self.clip
        problems = []
        if tr.text_vocab != tok.total_vocab:
            problems.append(f"transformer.text_vocab={tr.text_vocab} but tokenizer has {tok.total_vocab} ids")
        if tr.text_len != tok.text_len:
            problems.append(f"transformer.text_len={tr.text_len} but tokenizer.text_len={tok.text_len}")
        if tr.image_vocab != dv.codebook_size:
            problems.append(f"transformer.image_vocab={tr.image_vocab} but dvae.codebook_size={dv.codebook_size}")
        if tr.image_grid != dv.grid_size:
            problems.append(f"transformer.image_grid={tr.image_grid} but the dVAE grid is {dv.grid_size}")
        if cl.text_vocab != tok.total_vocab or cl.text_len != tok.text_len:
            problems.append("clip text vocabulary/length differ from the tokenizer's")
        if cl.image_size != dv.image_size:
            problems.append(f"clip.image_size={cl.image_size} but dvae.image_size={dv.image_size}")
        if dv.image_size % dv.downsample:
            problems.append(f"dvae.image_size={dv.image_size} is not divisible by {dv.downsample}")
        if problems:
            raise ConfigError("inconsistent config: " + "; ".join(problems))


# --- (de)serialisation -------------------------------------------------------


def config_from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, naming unknown or ill-typed fields."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} for {cls.__name__}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)  # type: ignore[call-arg]
        if dataclasses.is_dataclass(default):
            kwargs[name] = config_from_dict(type(default), value, f"{where}.{name}")
        else:
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ConfigError(f"{where}.{name}: expected a number, got {value!r}")
                value = type(default)(value) if isinstance(default, float) else value
            kwargs[name] = value
    return cls(**kwargs)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")


def load_config(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"missing config file {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, dict):
        data.pop("checksums", None)  # an export's checksums of its files (dalle.io), not a config field
    return config_from_dict(cls, data, str(path))


# --- Presets -----------------------------------------------------------------


def paper() -> DalleConfig:
    """The paper's 12-billion-parameter model at 256 px."""
    return DalleConfig(
        tokenizer=TokenizerConfig(),
        dvae=DVAEConfig(),
        transformer=TransformerConfig(),
        clip=CLIPConfig(text_layers=12, text_width=512, text_heads=8, image_layers=12, image_width=768, image_heads=12, embed_dim=512),
    )


def _shapes_base(text_len: int = 32, vocab: int = 512) -> tuple[TokenizerConfig, DVAEConfig]:
    tok = TokenizerConfig(vocab_size=vocab, text_len=text_len)
    # VQ with an MSE reconstruction: on this data it reached ~28 dB in 2,000 CPU steps where the
    # Gumbel relaxation collapsed the codebook (benchmarks/bench_dvae.py compares both).  The
    # paper's per-pixel-scale logit-Laplace got 16.8 dB in 1,000 steps (it sharpens the black
    # background and gives up on objects).  For quantizer="gumbel" on this preset: straight-
    # through samples and beta 0.2 on the MSE scale (the soft relaxation collapsed to one code).
    dv = DVAEConfig(image_size=64, hidden_width=16, blocks_per_group=1, num_groups=4, codebook_size=512,
                    quantizer="vq", recon_loss="mse", kl_weight=0.2, straight_through=True)
    return tok, dv


def shapes() -> DalleConfig:
    """The CPU preset for the shapes set (shared/SHAPES.md): 64 px, 8x8 tokens, 512 codes."""
    tok, dv = _shapes_base()
    return DalleConfig(
        tokenizer=tok,
        dvae=dv,
        transformer=TransformerConfig(
            n_layers=4, n_heads=4, head_dim=64, text_vocab=tok.total_vocab, text_len=tok.text_len,
            image_vocab=dv.codebook_size, image_grid=dv.grid_size, attention="full", conv_kernel=5,
        ),
        clip=CLIPConfig(
            text_vocab=tok.total_vocab, text_len=tok.text_len, text_layers=2, text_width=128, text_heads=4,
            image_size=dv.image_size, patch_size=8, image_layers=2, image_width=128, image_heads=4, embed_dim=128,
        ),
        train=TrainConfig(dvae_lr=2e-3),
    )


def tiny() -> DalleConfig:
    """A minutes-scale preset for tests and smoke runs (same data layout as ``shapes``)."""
    cfg = shapes()
    cfg.dvae.hidden_width = 16
    cfg.transformer.n_layers = 2
    cfg.transformer.n_heads = 2
    cfg.transformer.head_dim = 16
    cfg.clip.text_layers = cfg.clip.image_layers = 1
    cfg.clip.text_width = cfg.clip.image_width = cfg.clip.embed_dim = 32
    cfg.clip.text_heads = cfg.clip.image_heads = 2
    cfg.train = TrainConfig(dvae_steps=20, dvae_batch=8, transformer_steps=20, transformer_batch=8,
                            transformer_warmup=5, clip_steps=20, clip_batch=8, shapes_size=256)
    return cfg


PRESETS: dict[str, Callable[[], DalleConfig]] = {"paper": paper, "shapes": shapes, "tiny": tiny}


def get_preset(name: str) -> DalleConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()
