"""OpenAI's released dVAE (the ``dall_e`` package's ``encoder.pkl`` and ``decoder.pkl``) -> a dVAE folder.

OpenAI published the paper's image tokenizer as two pickled modules (``torch.save`` of
the whole ``dall_e.Encoder`` and ``dall_e.Decoder``): 256 px images to 32 x 32 codes
over 8192 entries.  Our :class:`~dalle.dvae.DiscreteVAE` has the same layout (see its
module docstring), so every released tensor has exactly one counterpart here; only the
names differ (``blocks.group_2.block_1.res_path.conv_3.w`` is our
``net.<i>.res_path.5.weight``).  The converted folder is a Gumbel dVAE with the
logit-Laplace output, usable wherever a dVAE folder is (``dalle train transformer
--dvae DIR``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dalle.config import DVAEConfig
from dalle.convert.safe_pickle import PickledObject, UnsafeFileError, class_name, module_tensors, read_torch_file
from dalle.dvae import DecoderBlock, DiscreteVAE, EncoderBlock

# What a released dVAE pickle may name: its own classes and torch's module containers.
STAND_INS = ("dall_e.", "torch.nn.modules.")
# The released Encoder and Decoder have four groups, widths n_hid x (1, 2, 4, 8).
RELEASED_GROUPS = 4
RELEASED_WIDTHS = (1, 2, 4, 8)
PAPER_IMAGE_SIZE = 256


def released_names(net: nn.Sequential, prefix: str) -> dict[str, str]:
    """Our ``state_dict`` name -> the released one, for an :class:`Encoder`/:class:`Decoder` ``net``.

    The released modules name their layers ``blocks.input``, ``blocks.group_<g>.block_<b>``
    (with ``id_path`` and ``res_path.conv_<k>``) and ``blocks.output.conv``; ours are
    positions in one ``nn.Sequential``, where a pool/up-sampling layer ends a group.
    """
    names: dict[str, str] = {}
    group, block = 1, 0
    convs = [i for i, layer in enumerate(net) if isinstance(layer, nn.Conv2d)]
    for i, layer in enumerate(net):
        ours = f"{prefix}.net.{i}"
        if isinstance(layer, (EncoderBlock, DecoderBlock)):
            block += 1
            theirs = f"blocks.group_{group}.block_{block}"
            if isinstance(layer.id_path, nn.Conv2d):
                names.update(_conv(f"{ours}.id_path", f"{theirs}.id_path"))
            res_convs = [j for j, m in enumerate(layer.res_path) if isinstance(m, nn.Conv2d)]
            for k, j in enumerate(res_convs, start=1):
                names.update(_conv(f"{ours}.res_path.{j}", f"{theirs}.res_path.conv_{k}"))
        elif isinstance(layer, (nn.MaxPool2d, nn.Upsample)):
            group, block = group + 1, 0
        elif isinstance(layer, nn.Conv2d):
            names.update(_conv(ours, "blocks.input" if i == convs[0] else "blocks.output.conv"))
    return names


def _conv(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.weight": f"{theirs}.w", f"{ours}.bias": f"{theirs}.b"}


def _read_part(path: str | Path, role: str, expected_class: str) -> tuple[PickledObject, dict[str, torch.Tensor]]:
    obj = read_torch_file(path, STAND_INS, what=f"{role} file {path}")
    if class_name(obj) != expected_class:
        found = class_name(obj) or type(obj).__name__
        raise UnsafeFileError(f"{role} file {path} holds a {found}, not the released {expected_class}")
    return obj, module_tensors(obj)


def _int_attribute(obj: PickledObject, name: str, path: str | Path) -> int:
    value = obj.attributes.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UnsafeFileError(f"{path} lacks the released module's {name} (got {value!r})")
    return value


def config_from_released(encoder: PickledObject, decoder: PickledObject, image_size: int,
                         enc_path: str | Path, dec_path: str | Path) -> DVAEConfig:
    """Our config for the released hyperparameters (read from the pickled modules' attributes)."""
    get_e = lambda name: _int_attribute(encoder, name, enc_path)  # noqa: E731
    get_d = lambda name: _int_attribute(decoder, name, dec_path)  # noqa: E731
    for name in ("n_hid", "n_blk_per_group", "vocab_size"):
        if get_e(name) != get_d(name):
            raise UnsafeFileError(f"encoder {name}={get_e(name)} but decoder {name}={get_d(name)}: not one released pair")
    if get_e("input_channels") != get_d("output_channels"):
        raise UnsafeFileError(f"encoder reads {get_e('input_channels')} channels but the decoder writes {get_d('output_channels')}")
    return DVAEConfig(
        image_size=image_size,
        channels=get_e("input_channels"),
        hidden_width=get_e("n_hid"),
        blocks_per_group=get_e("n_blk_per_group"),
        num_groups=RELEASED_GROUPS,
        codebook_size=get_e("vocab_size"),
        quantizer="gumbel",
        width_multipliers=RELEASED_WIDTHS,
        recon_loss="logit_laplace",
        straight_through=False,
        decoder_init_width=get_d("n_init"),
    )


def _fill(model: DiscreteVAE, part: str, tensors: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """Our ``part`` tensors taken from the released ones, checking names and shapes one to one."""
    net = getattr(model, part).net
    names = released_names(net, part)
    ours = {k: v for k, v in model.state_dict().items() if k.startswith(part + ".")}
    missing = sorted(set(names.values()) - set(tensors))
    unexpected = sorted(set(tensors) - set(names.values()))
    if missing or unexpected or set(names) != set(ours):
        raise UnsafeFileError(
            f"{path} does not have the released {part}'s tensors: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    out = {}
    for mine, theirs in names.items():
        t = tensors[theirs]
        if t.shape != ours[mine].shape:
            raise UnsafeFileError(f"{path}: {theirs} has shape {tuple(t.shape)}, expected {tuple(ours[mine].shape)}")
        out[mine] = t.to(torch.float32)
    return out


def convert_openai_dvae(encoder_path: str | Path, decoder_path: str | Path, out: str | Path,
                        image_size: int = PAPER_IMAGE_SIZE) -> Path:
    """Write a dVAE folder (config.json, model.safetensors, converted.json) from the released pair."""
    from dalle.convert import record_conversion

    encoder, enc_tensors = _read_part(encoder_path, "encoder", "dall_e.encoder.Encoder")
    decoder, dec_tensors = _read_part(decoder_path, "decoder", "dall_e.decoder.Decoder")
    config = config_from_released(encoder, decoder, image_size, encoder_path, decoder_path)
    with torch.device("meta"):  # names and shapes only; the weights come from the files
        skeleton = DiscreteVAE(config)
    state: dict[str, Any] = {}
    state.update(_fill(skeleton, "encoder", enc_tensors, encoder_path))
    state.update(_fill(skeleton, "decoder", dec_tensors, decoder_path))
    model = DiscreteVAE(config)
    model.load_state_dict(state, strict=True)
    folder = model.save_pretrained(out)
    record_conversion(folder, "openai-dvae", {"encoder": encoder_path, "decoder": decoder_path},
                      reference="OpenAI's dall_e package (github.com/openai/DALL-E), encoder.pkl + decoder.pkl")
    return folder
