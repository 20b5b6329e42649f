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


def describe_model(folder: Path, problems: list[str] | None = None) -> list[str]:
    """One line a component: its size, how its weights were verified (checksum), its config.

    A component that would not load gets a ``BROKEN`` line, and what is wrong with it is
    appended to ``problems`` (``dalle info`` then fails, naming them).
    """
    from dalle.config import CLIPConfig, DVAEConfig, TokenizerConfig, TransformerConfig
    from dalle.io import ModelLoadError, check_export, load_config_with_checksums
    from dalle.pipeline import bundled_model_dir

    folder = Path(folder) if folder is not None else bundled_model_dir()
    if folder.is_file():
        raise ModelLoadError(f"{folder} is a file; give the model folder (the one holding tokenizer/, dvae/, transformer/)")
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    lines = [f"model {folder}"]
    parts = {"tokenizer": (TokenizerConfig, "tokenizer.json"), "dvae": (DVAEConfig, "model.safetensors"),
             "transformer": (TransformerConfig, "model.safetensors"), "clip": (CLIPConfig, "model.safetensors")}
    for part, (config_cls, weights_name) in parts.items():
        if not (folder / part / "config.json").is_file():
            lines.append(f"{part}: missing")
            continue
        problem, checksum = check_export(folder / part, config_cls, weights_name)
        if problem is not None:
            lines.append(f"{part}: BROKEN: {problem}")
            if problems is not None:
                problems.append(f"{part}: {problem}")
            continue
        weights = folder / part / weights_name
        config, _ = load_config_with_checksums(config_cls, folder / part / "config.json")
        lines.append(f"{part}, {weights.stat().st_size / 1e6:.1f} MB, {checksum}: "
                     f"{json.dumps(config_to_dict(config), separators=(',', ':'))}")
    return lines


__all__ = ["describe_model", "describe_preset", "config_to_dict"]
