"""Configuration dataclasses, one per component, and the named presets.

Every model folder stores its component's config as JSON next to the weights, so
loading a model never asks the user for hyperparameters.  Presets are plain
functions of no arguments returning a fresh :class:`DalleConfig`.

The paper's constants (Ramesh et al. 2021, appendix B) are named once here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
import types
import typing
from typing import Any, Callable, Literal, TypeVar, Union

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
    # Channels of the decoder's 1x1 input convolution over the (soft) one-hot code; its
    # first residual block then widens them to the first decoder group (with a 1x1
    # convolution on the identity path).  OpenAI's released dVAE maps the 8192 one-hot
    # channels to 128 here.  0: straight to the first decoder group's width, the layout of
    # model folders written before this field existed (see LEGACY_DEFAULTS).
    decoder_init_width: int = 128

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

    ``null_caption_fraction`` (beyond the paper): the share of training captions replaced by
    the null caption (every text position its padding token), which teaches the model
    p(image) beside p(image | text), so that it can be sampled with classifier-free guidance
    (:mod:`dalle.sampling`).  Every preset trains with 0.1 (as Ho & Salimans' 10-20%): the
    other 90% of captions still teach p(image | text), and a model that cannot be guided
    cannot be tuned at sampling time.  The dataclass default, 0, is what a config saved
    before the field existed means: such a model was never shown the null caption, and
    sampling refuses to guide it.
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
    null_caption_fraction: float = 0.0

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
    # Dropout on the attention and MLP outputs of both encoders while training (against
    # memorising a small set); it leaves the weights' shapes alone.
    dropout: float = 0.0


@dataclass
class TrainConfig:
    """How long and how fast each component trains (scaled schedules use ``steps``)."""

    dvae_steps: int = 3000
    dvae_batch: int = 32
    dvae_lr: float = 1e-3  # peak step size; cosine down to 1/80 of it (the paper: 1e-4 -> 1.25e-6)
    # Shares of the dVAE run spent annealing the Gumbel temperature 1 -> 1/16 (the paper: its
    # first 150k of 3M updates, 5%) and warming the KL weight up from 0 (the paper: 5k updates).
    dvae_temperature_fraction: float = 0.05
    dvae_kl_warmup_fraction: float = 0.05
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
    # Transformer early stopping: the weight average is evaluated on the validation split every
    # ``transformer_eval_every`` steps; the run ends once ``transformer_patience`` evaluations in a
    # row have not lowered the validation bits per image token (0: never stop early), and the
    # weights of the best evaluation are the ones exported (dalle/training/transformer.py).
    transformer_eval_every: int = 500
    transformer_patience: int = 3
    # CLIP against memorising a small set: a random square crop of the image (side a uniform
    # fraction in [min, max] of the shorter side, resized back; (1, 1) turns it off, as the shapes
    # set needs: its captions name regions and sizes a crop would falsify), never a flip
    # (captions say left and right), and AdamW weight decay on the weight matrices.
    clip_crop_scale: tuple[float, float] = (1.0, 1.0)
    clip_weight_decay: float = 0.1

    # Parts used as they are rather than trained here: "" trains the part; otherwise what
    # the folder's part was converted from ("openai-dvae", "openai-clip", ...; "folder" for a
    # part trained elsewhere), set by ``dalle train --dvae DIR`` / ``--clip DIR``.  A preset
    # that names one (``paper-openai-dvae``) asks for the folder and trains no such part.
    pretrained_dvae: str = ""
    pretrained_clip: str = ""

    def __post_init__(self) -> None:
        self.clip_crop_scale = tuple(self.clip_crop_scale)  # type: ignore[assignment]  # JSON gives a list


@dataclass
class DataConfig:
    """How the training data is read (every stage reads it the same way)."""

    # Largest share of the data set's items that may be unusable (unreadable images, items
    # without a caption, samples lost in a broken shard) before training stops and lists
    # them.  Checked over the whole set before the first stage, so no stage trains on data
    # a later one refuses.  ``dalle train --set data.max_bad_fraction=0.2`` raises it.
    max_bad_fraction: float = 0.05


@dataclass
class DalleConfig:
    """All components of one model folder."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    dvae: DVAEConfig = field(default_factory=DVAEConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

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
        if not 0.0 <= self.data.max_bad_fraction <= 1.0:
            problems.append(f"data.max_bad_fraction={self.data.max_bad_fraction} must be between 0 and 1")
        if not 0.0 <= tr.null_caption_fraction < 1.0:
            problems.append(f"transformer.null_caption_fraction={tr.null_caption_fraction} must be in [0, 1) "
                            "(0.1 is the presets' share of null captions)")
        if dv.image_size % dv.downsample:
            problems.append(f"dvae.image_size={dv.image_size} is not divisible by {dv.downsample}")
        if problems:
            raise ConfigError("inconsistent config: " + "; ".join(problems))


# --- (de)serialisation -------------------------------------------------------

# Fields added after model folders were first written, with the value that a file
# lacking the field meant (the behaviour of the code that wrote it).  A new config takes
# the dataclass default; an old file keeps what it was trained with.
LEGACY_DEFAULTS: dict[type, dict[str, Any]] = {
    DVAEConfig: {"decoder_init_width": 0},
}


def config_from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, naming unknown or ill-typed fields."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} for {cls.__name__}")
    kwargs = {name: value for name, value in LEGACY_DEFAULTS.get(cls, {}).items() if name not in data}
    for name, value in data.items():
        default = getattr(cls(), name)  # type: ignore[call-arg]
        if dataclasses.is_dataclass(default):
            kwargs[name] = config_from_dict(type(default), value, f"{where}.{name}")
        else:
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ConfigError(f"{where}.{name}: expected a number, got {value!r}")
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{where}.{name}: expected a finite number, got {value!r}")
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


# --- command-line overrides (``dalle train --set SECTION.KEY=VALUE``) ------------------

# Fields that change what a trained component computes or the shape of its weights live in
# these sections; every other section (``train`` and any section added later, e.g. ``data``)
# only steers training.  Fields of these sections listed in TRAINING_ONLY_FIELDS change the
# training, not the trained model, so ``--resume`` accepts them.
ARCHITECTURE_SECTIONS = ("tokenizer", "dvae", "transformer", "clip")
TRAINING_ONLY_FIELDS: dict[str, set[str]] = {
    "tokenizer": {"bpe_dropout"},
    "dvae": {"kl_weight", "recon_loss", "straight_through"},
    "transformer": {"dropout", "text_loss_weight", "image_loss_weight", "attention_impl", "null_caption_fraction"},
    "clip": {"dropout"},
}

# Fields of one component that another component's config must repeat (DalleConfig.check);
# an override of the source moves the copy along unless the copy is overridden too.
DERIVED_FIELDS: dict[str, Callable[["DalleConfig"], Any]] = {
    "transformer.text_vocab": lambda c: c.tokenizer.total_vocab,
    "transformer.text_len": lambda c: c.tokenizer.text_len,
    "transformer.image_vocab": lambda c: c.dvae.codebook_size,
    "transformer.image_grid": lambda c: c.dvae.grid_size,
    "clip.text_vocab": lambda c: c.tokenizer.total_vocab,
    "clip.text_len": lambda c: c.tokenizer.text_len,
    "clip.image_size": lambda c: c.dvae.image_size,
}


# Fields that pick which items are held out (or what the data is): every stage trained so far
# used them, so changing them under a trained stage would let it be judged on images it saw.
SPLIT_FIELDS = {"train.val_fraction", "train.val_min", "train.val_max", "train.seed", "train.shapes_size"}


def is_architecture_field(section: str, key: str) -> bool:
    """True when changing ``section.key`` changes a trained component (so a resume cannot take it)."""
    return section in ARCHITECTURE_SECTIONS and key not in TRAINING_ONLY_FIELDS.get(section, set())


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "comma-separated " + _type_name(typing.get_args(tp)[0]) + "s"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def parse_field_value(tp: Any, text: str, where: str) -> Any:
    """Parse the command-line text ``text`` as a value of the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"--set {where}={text}: expected {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if text == str(choice):
                return choice
        raise ConfigError(f"--set {where}={text}: choose one of {', '.join(str(c) for c in choices)}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.lower() in ("none", "null", ""):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_field_value(arg, text, where)
            except ConfigError:
                pass
        raise bad
    if origin is tuple:
        args = typing.get_args(tp)
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(parts)
        if len(parts) != len(args):
            raise bad
        try:
            return tuple(parse_field_value(a, p.strip(), where) for a, p in zip(args, parts))
        except ConfigError:
            raise bad from None
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise bad
    if tp is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            try:  # 1e4 is a fine way to write ten thousand steps
                value = float(text)
            except ValueError:
                raise bad from None
            if not value.is_integer():
                raise bad from None
            return int(value)
    if tp is float:
        try:
            value = float(text)
        except ValueError:
            raise bad from None
        if not math.isfinite(value):
            raise ConfigError(f"--set {where}: give a finite number, got {text!r}")
        return value
    if tp is str:
        return text
    raise ConfigError(f"--set {where}: fields of type {_type_name(tp)} cannot be set from the command line")


def split_override(text: str) -> tuple[str, str, str]:
    """``"dvae.codebook_size=1024"`` -> ``("dvae", "codebook_size", "1024")``."""
    name, sep, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"--set takes SECTION.KEY=VALUE (e.g. --set dvae.codebook_size=1024), got {text!r}")
    return section, key.strip(), value.strip()


def apply_overrides(config: "DalleConfig", overrides: list[str]) -> tuple["DalleConfig", dict[str, Any]]:
    """A copy of ``config`` with each ``SECTION.KEY=VALUE`` of ``overrides`` applied.

    Works on whatever sections :class:`DalleConfig` has (a section added later needs no change
    here).  Copies of a changed field in other components (:data:`DERIVED_FIELDS`, e.g.
    ``transformer.image_vocab`` for ``dvae.codebook_size``) follow it unless they are
    overridden themselves.  Returns the new config and ``{"section.key": value}`` of the
    overrides.  Raises :class:`ConfigError` naming the field and the valid ones.
    """
    config = copy.deepcopy(config)
    sections = {f.name: f for f in dataclasses.fields(config)}
    section_types = _field_types(type(config))
    done: dict[str, Any] = {}
    for text in overrides:
        section, key, raw = split_override(text)
        if section not in sections:
            raise ConfigError(f"--set {section}.{key}: no section {section!r}; sections: {', '.join(sections)}")
        part = getattr(config, section)
        fields = _field_types(section_types[section])
        if key not in fields:
            raise ConfigError(f"--set {section}.{key}: {section} has no field {key!r}; "
                              f"its fields: {', '.join(f.name for f in dataclasses.fields(part))}")
        value = parse_field_value(fields[key], raw, f"{section}.{key}")
        setattr(part, key, value)
        if hasattr(part, "__post_init__"):
            part.__post_init__()
        done[f"{section}.{key}"] = value
    if "dvae.num_groups" in done and "dvae.width_multipliers" not in done:
        # One width per group: keep the first ones, doubling past the end.
        widths = list(config.dvae.width_multipliers[: config.dvae.num_groups])
        while len(widths) < config.dvae.num_groups:
            widths.append(widths[-1] * 2 if widths else 1)
        config.dvae.width_multipliers = tuple(widths)
    for name, derive in DERIVED_FIELDS.items():
        if name not in done:
            section, key = name.split(".")
            setattr(getattr(config, section), key, derive(config))
    return config, done


def config_changes(old: Any, new: Any) -> list[tuple[str, str, Any, Any]]:
    """``(section, key, old, new)`` for every field that differs between two configs."""
    changes = []
    for f in dataclasses.fields(new):
        a, b = getattr(old, f.name, None), getattr(new, f.name)
        if a is None or not dataclasses.is_dataclass(b):
            continue
        for g in dataclasses.fields(b):
            if getattr(a, g.name, None) != getattr(b, g.name):
                changes.append((f.name, g.name, getattr(a, g.name, None), getattr(b, g.name)))
    return changes


# --- Presets -----------------------------------------------------------------
# Share of training captions replaced by the null caption, for classifier-free guidance
# (TransformerConfig.null_caption_fraction says why this value).
PRESET_NULL_CAPTION_FRACTION = 0.1


def paper() -> DalleConfig:
    """The paper's 12-billion-parameter model at 256 px."""
    return DalleConfig(
        tokenizer=TokenizerConfig(),
        dvae=DVAEConfig(),
        transformer=TransformerConfig(null_caption_fraction=PRESET_NULL_CAPTION_FRACTION),
        clip=CLIPConfig(text_layers=12, text_width=512, text_heads=8, image_layers=12, image_width=768, image_heads=12, embed_dim=512),
        train=TrainConfig(dvae_lr=1e-4),  # appendix A.2: step size 1e-4 -> 1.25e-6
    )


def _shapes_base(text_len: int = 32, vocab: int = 512) -> tuple[TokenizerConfig, DVAEConfig]:
    tok = TokenizerConfig(vocab_size=vocab, text_len=text_len)
    # VQ with an MSE reconstruction, not the paper's Gumbel dVAE: side by side for 20 minutes on
    # shared CPU cores (1 thread each, benchmarks/sweep_dvae.py, BENCHMARKS.md), VQ reached 23.4 dB
    # with 88% of the codes on held-out images, the paper's recipe (logit-Laplace, beta 6.6
    # warmed up, temperature 1 -> 1/16 over 5% of the run, soft relaxation) 13.0 dB with 15%: at
    # beta 6.6 the posterior stays near uniform (KL ~0.002 nats a position), so the decoder learns
    # the mean image; lower beta collapses the codebook instead.  For quantizer="gumbel" on this
    # preset the fields below give straight-through samples and beta 0.2 on the MSE scale (the
    # soft relaxation collapsed to one code there in earlier probes).
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
            # The paper's row/row/column/conv schedule (figure 11's masks; the conv window 5x5 on
            # the 8x8 grid, as 11x11 on the paper's 32x32).
            image_vocab=dv.codebook_size, image_grid=dv.grid_size, attention="sparse", conv_kernel=5,
            null_caption_fraction=PRESET_NULL_CAPTION_FRACTION,
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


# --- Presets for users' own captioned images ---------------------------------------------
# Captions of real pictures are longer and more varied than the shapes set's, so these keep
# 64 text positions (128 at 256 px) and a larger BPE vocabulary.  All use the VQ quantiser
# with an MSE reconstruction, the one that trained reliably here (see _shapes_base).  The
# token grid is the main choice: 8x down-sampling (the paper's 256 -> 32) leaves an 8x8 grid
# at 64 px, too coarse for real pictures (a 15k-icon probe: 20.9 dB, visibly blurred, against
# 24.4 dB at 16x16 tokens over 1024 codes and hidden width 32, in comparable minutes).
# ``dalle info --presets`` lists sizes, parameters and measured CPU step times.


def _user_preset(*, image_size: int, num_groups: int, hidden_width: int, blocks_per_group: int,
                 codebook_size: int, vocab: int, text_len: int, layers: int, heads: int, attention: str,
                 clip_layers: int, clip_width: int, clip_patch: int, train: TrainConfig) -> DalleConfig:
    tok = TokenizerConfig(vocab_size=vocab, text_len=text_len)
    dv = DVAEConfig(image_size=image_size, hidden_width=hidden_width, blocks_per_group=blocks_per_group,
                    num_groups=num_groups, codebook_size=codebook_size, quantizer="vq", recon_loss="mse",
                    width_multipliers=tuple(2**i for i in range(num_groups)))
    return DalleConfig(
        tokenizer=tok,
        dvae=dv,
        transformer=TransformerConfig(
            n_layers=layers, n_heads=heads, head_dim=64, text_vocab=tok.total_vocab, text_len=tok.text_len,
            image_vocab=dv.codebook_size, image_grid=dv.grid_size, attention=attention,  # type: ignore[arg-type]
            conv_kernel=11 if dv.grid_size >= 16 else 5, dropout=0.1,
            null_caption_fraction=PRESET_NULL_CAPTION_FRACTION,
        ),
        clip=CLIPConfig(
            text_vocab=tok.total_vocab, text_len=tok.text_len, text_layers=clip_layers, text_width=clip_width,
            text_heads=clip_width // 64, image_size=dv.image_size, patch_size=clip_patch, image_layers=clip_layers,
            image_width=clip_width, image_heads=clip_width // 64, embed_dim=clip_width, dropout=0.1,
        ),
        # Against memorising sets of a few thousand pictures: crops, decay and dropout for CLIP.
        train=dataclasses.replace(train, clip_crop_scale=(0.8, 1.0), clip_weight_decay=0.2),
    )


def small_64() -> DalleConfig:
    """64 px pictures on a laptop CPU: 16x16 tokens (4x down-sampling) over 1024 codes."""
    return _user_preset(
        image_size=64, num_groups=3, hidden_width=32, blocks_per_group=1, codebook_size=1024,
        vocab=2048, text_len=64, layers=4, heads=4, attention="full", clip_layers=2, clip_width=128, clip_patch=8,
        # 256 image tokens cost a transformer step 4x the shapes preset's 64: a smaller batch
        # keeps the steps of a CPU hour in the hundreds.
        # Evaluations every 200 steps: a CPU hour holds about a thousand, and early stopping needs several.
        train=TrainConfig(dvae_lr=2e-3, dvae_batch=32, transformer_batch=16, clip_batch=64,
                          transformer_eval_every=200),
    )


def base_128() -> DalleConfig:
    """128 px pictures, CPU for a start or a GPU: 16x16 tokens (8x down-sampling) over 2048 codes."""
    return _user_preset(
        image_size=128, num_groups=4, hidden_width=64, blocks_per_group=2, codebook_size=2048,
        vocab=8192, text_len=64, layers=12, heads=8, attention="sparse", clip_layers=4, clip_width=256, clip_patch=16,
        train=TrainConfig(dvae_steps=20_000, transformer_steps=50_000, clip_steps=10_000),
    )


def base_256() -> DalleConfig:
    """The paper's 256 px with 32x32 tokens (8x down-sampling) over 8192 codes, for a GPU."""
    return _user_preset(
        image_size=256, num_groups=4, hidden_width=128, blocks_per_group=2, codebook_size=PAPER_IMAGE_VOCAB,
        vocab=PAPER_TEXT_VOCAB, text_len=128, layers=24, heads=16, attention="sparse", clip_layers=8,
        clip_width=512, clip_patch=16,
        train=TrainConfig(dvae_steps=50_000, transformer_steps=100_000, transformer_lr=4.5e-4, clip_steps=20_000),
    )


def paper_openai_dvae() -> DalleConfig:
    """The paper's transformer on OpenAI's released dVAE (256 px, 32x32 tokens, 8192 codes), not trained here.

    Convert the released pair first (``dalle convert openai-dvae encoder.pkl decoder.pkl
    --out D``) and pass ``--dvae D`` to ``dalle train``.  The dVAE section is the released
    layout (the paper's), so the folder's weights fit it one to one.
    """
    cfg = paper()
    cfg.train.pretrained_dvae = "openai-dvae"
    return cfg


PRESETS: dict[str, Callable[[], DalleConfig]] = {
    "small-64": small_64, "base-128": base_128, "base-256": base_256,
    "shapes": shapes, "tiny": tiny, "paper": paper, "paper-openai-dvae": paper_openai_dvae,
}


def get_preset(name: str) -> DalleConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()
