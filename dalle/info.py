"""``dalle info``: parameter counts and configs of a preset or a model folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dalle.config import PRESETS, DalleConfig, config_to_dict, get_preset

TIMINGS_FILE = Path(__file__).resolve().parent / "preset_timings.json"


def _transformer_counts(config: DalleConfig) -> tuple[int, int]:
    """(non-embedding, total) parameters, counted on the meta device: no weights are allocated."""
    from dalle.transformer import DalleTransformer

    with torch.device("meta"):
        model = DalleTransformer(config.transformer)
    return model.count_parameters(non_embedding=True), model.count_parameters(non_embedding=False)


def describe_preset(name: str) -> list[str]:
    config = get_preset(name)
    config.check()
    blocks, total = _transformer_counts(config)
    t = config.transformer
    return [
        f"preset {name}",
        # Kaplan et al.'s convention: the transformer's parameters without its embedding tables and heads.
        f"transformer_parameters {blocks}",
        f"transformer_parameters_with_embeddings {total}",
        f"layers {t.n_layers} heads {t.n_heads}x{t.head_dim} d_model {t.d_model} attention {t.attention}",
        f"sequence {t.text_len} text + {t.image_grid}x{t.image_grid} image tokens = {t.seq_len}",
        f"vocabulary {t.text_vocab} text (incl. {t.text_len} padding ids) + {t.image_vocab} image codes",
        f"dvae {config.dvae.image_size}px -> {config.dvae.grid_size}x{config.dvae.grid_size} x {config.dvae.codebook_size} codes",
    ]


def component_parameters(config: DalleConfig) -> dict[str, int]:
    """Parameters of the dVAE, transformer (with embeddings) and CLIP, built on the meta device."""
    from dalle.clip import CLIP
    from dalle.dvae import DiscreteVAE
    from dalle.transformer import DalleTransformer

    with torch.device("meta"):
        models = {"dvae": DiscreteVAE(config.dvae), "transformer": DalleTransformer(config.transformer),
                  "clip": CLIP(config.clip)}
    return {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}


def _compact(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def load_timings() -> dict:
    """What benchmarks/bench_presets.py measured (empty when it has not been run)."""
    try:
        return json.loads(TIMINGS_FILE.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _timing_text(row: dict | None) -> str:
    if not row:
        return "cpu_s_per_step not measured"
    parts = []
    for component in ("dvae", "transformer", "clip"):
        t = row.get(component)
        if t:
            mark = "~" if "scaled_from_batch" in t else ""
            seconds = t.get("cpu_seconds_per_step", t.get("seconds_per_step", float("nan")))
            parts.append(f"{component} {mark}{seconds:.3g}" if seconds < 1000 else f"{component} {mark}{seconds:.0f}")
    return "cpu_s_per_step " + " ".join(parts)


def describe_presets() -> list[str]:
    """One line a preset, its name first; a footnote says how the step times were measured."""
    timings = load_timings()
    measured = timings.get("presets", {})
    lines = []
    for name in PRESETS:
        config = get_preset(name)
        dv, tr = config.dvae, config.transformer
        params = component_parameters(config)
        first = (PRESETS[name].__doc__ or "").strip().splitlines()[0]
        lines.append(
            f"{name}  image {dv.image_size}px  tokens {dv.grid_size}x{dv.grid_size} ({dv.downsample}x down) "
            f"x {dv.codebook_size} codes  text {tr.text_len}  "
            f"params dvae {_compact(params['dvae'])} transformer {_compact(params['transformer'])} "
            f"clip {_compact(params['clip'])}  "
            f"batch {config.train.dvae_batch}/{config.train.transformer_batch}/{config.train.clip_batch}  "
            f"{_timing_text(measured.get(name))}  -- {first}")
    if timings:
        load = timings.get("load_average_1min")
        lines.append(
            f"# cpu_s_per_step: rough CPU seconds per training step (dvae/transformer/clip at the batches shown; "
            f"with {timings.get('threads')} thread(s) about the wall time on as many idle cores), measured by "
            f"{timings.get('command', 'benchmarks/bench_presets.py')} on {timings.get('cpu')} "
            f"({timings.get('cpu_count')} cores, load average {load} from other jobs), {timings.get('date')}; "
            "data loading and evaluations not included; ~ marks estimates timed at a smaller batch and scaled")
    return lines


def describe_conversion(folder: Path) -> str | None:
    """One line on where a converted part came from (``converted.json``), or None for a part trained here."""
    from dalle.convert import read_conversion

    record = read_conversion(folder)
    if record is None:
        return None
    sources = ", ".join(f"{role} {s.get('file')} (sha256 {str(s.get('sha256'))[:12]})"
                        for role, s in (record.get("sources") or {}).items() if isinstance(s, dict))
    when = f" on {record['date']}" if record.get("date") else ""
    return f"converted from {record.get('converted_from', '?')}: {sources}{when}, not trained here"


def describe_model(folder: Path, problems: list[str] | None = None) -> list[str]:
    """One line a component: its size, how its weights were verified (checksum), its config.

    A component whose files are damaged gets a ``BROKEN`` line, and what is wrong with it is
    appended to ``problems`` (``dalle info`` then fails, naming them).
    """
    from dalle.io import ModelLoadError
    from dalle.pipeline import bundled_model_dir

    folder = Path(folder) if folder is not None else bundled_model_dir()
    if folder.is_file():
        raise ModelLoadError(f"{folder} is a file; give the model folder (the one holding tokenizer/, dvae/, transformer/)")
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    if (folder / "config.json").is_file():  # one part's folder, e.g. the output of dalle convert
        return [f"part {folder}", *_describe_part(folder, folder.name, problems)]
    lines = [f"model {folder}"]
    for part in ("tokenizer", "dvae", "transformer", "clip"):
        if not (folder / part / "config.json").is_file():
            lines.append(f"{part}: missing")
            continue
        lines += _describe_part(folder / part, part, problems)
    return lines


def _describe_part(folder: Path, name: str, problems: list[str] | None) -> list[str]:
    from dalle.io import CHECKSUMS_KEY, check_export, read_json

    problem, checksum = check_export(folder)
    if problem is not None:
        if problems is not None:
            problems.append(f"{name}: {problem}")
        return [f"{name}: BROKEN: {problem}"]
    weights = next((folder / f for f in ("model.safetensors", "tokenizer.json") if (folder / f).is_file()), None)
    size = f", {weights.stat().st_size / 1e6:.1f} MB" if weights is not None else ""
    config = {k: v for k, v in read_json(folder / "config.json").items() if k != CHECKSUMS_KEY}
    lines = [f"{name}{size}, {checksum}: {json.dumps(config, separators=(',', ':'))}"]
    conversion = describe_conversion(folder)
    if conversion:
        lines.append(f"{name}: {conversion}")
    return lines


__all__ = ["describe_model", "describe_preset", "describe_presets", "component_parameters", "config_to_dict"]
