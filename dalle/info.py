"""``dalle info``: parameter counts and configs of a preset or a model folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dalle.config import DalleConfig, config_to_dict, get_preset


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


def describe_model(folder: Path) -> list[str]:
    from dalle.io import ModelLoadError
    from dalle.pipeline import bundled_model_dir

    folder = Path(folder) if folder is not None else bundled_model_dir()
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    if (folder / "config.json").is_file():  # one part's folder, e.g. the output of dalle convert
        return [f"part {folder}", *_describe_part(folder, folder.name)]
    lines = [f"model {folder}"]
    for part in ("tokenizer", "dvae", "transformer", "clip"):
        if not (folder / part / "config.json").is_file():
            lines.append(f"{part}: missing")
            continue
        lines += _describe_part(folder / part, part)
    return lines


def _describe_part(folder: Path, name: str) -> list[str]:
    weights = folder / "model.safetensors"
    size = f", {weights.stat().st_size / 1e6:.1f} MB" if weights.is_file() else ""
    config = json.dumps(json.loads((folder / "config.json").read_text()), separators=(",", ":"))
    lines = [f"{name}{size}: {config}"]
    conversion = describe_conversion(folder)
    if conversion:
        lines.append(f"{name}: {conversion}")
    return lines


__all__ = ["describe_model", "describe_preset", "config_to_dict"]
