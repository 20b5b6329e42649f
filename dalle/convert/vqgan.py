"""A taming-transformers VQGAN (``last.ckpt`` + ``model.yaml``) -> an image tokenizer folder.

taming-transformers publishes each VQGAN as a PyTorch Lightning checkpoint (a pickled
dict whose ``state_dict`` holds the weights, beside training state: optimizer moments,
callback state, step counters) and a YAML config whose ``model.params`` give the
architecture (``ddconfig``, ``n_embed``, ``embed_dim``).  The checkpoint is read with
:mod:`dalle.convert.safe_pickle` (Lightning's and numpy's objects in the training state
become inert records); the autoencoder's tensors map one to one onto
:class:`dalle.vqgan.VQGAN`; the loss's tensors (discriminator, LPIPS) are left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dalle.convert.safe_pickle import UnsafeFileError, read_torch_file
from dalle.vqgan import VQGAN, VQGANConfig

# A Lightning checkpoint's training state names Lightning's callback classes, numpy
# scalars and dtypes (and their byte strings), argparse namespaces of hyperparameters.
STAND_INS = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "numpy.", "_codecs.encode",
             "argparse.Namespace", "omegaconf.", "torch.nn.modules.")
SUPPORTED_TARGETS = ("taming.models.vqgan.VQModel",)


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with huggingface_hub (via tokenizers)
        raise UnsafeFileError("reading a VQGAN config needs PyYAML (pip install pyyaml)") from None
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UnsafeFileError(f"{path} is not a readable YAML file ({e})") from None
    if not isinstance(data, dict):
        raise UnsafeFileError(f"{path} is not a taming-transformers config (no mapping at the top)")
    return data


def config_from_yaml(data: dict[str, Any], path: str | Path, image_size: int | None = None) -> VQGANConfig:
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    target = model.get("target", "")
    if target not in SUPPORTED_TARGETS:
        raise UnsafeFileError(f"{path}: model.target is {target!r}; only {', '.join(SUPPORTED_TARGETS)} converts "
                              "(the Gumbel and segmentation VQGANs do not)")
    params = model.get("params") or {}
    dd = params.get("ddconfig") or {}
    try:
        if dd.get("double_z", False) or dd["in_channels"] != dd["out_ch"]:
            raise UnsafeFileError(f"{path}: ddconfig has double_z or differing in/out channels, not a VQGAN image model")
        return VQGANConfig(
            image_size=int(image_size or dd["resolution"]), channels=int(dd["in_channels"]), ch=int(dd["ch"]),
            ch_mult=tuple(int(m) for m in dd["ch_mult"]), num_res_blocks=int(dd["num_res_blocks"]),
            attn_resolutions=tuple(int(r) for r in dd.get("attn_resolutions", [])), z_channels=int(dd["z_channels"]),
            embed_dim=int(params["embed_dim"]), codebook_size=int(params["n_embed"]),
            attn_resolution_base=int(dd["resolution"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UnsafeFileError(f"{path}: model.params lacks or mistypes {e} (expected ddconfig, n_embed, embed_dim)") from None


def read_checkpoint_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The autoencoder's tensors of a Lightning checkpoint (``state_dict`` less ``loss.*``)."""
    ckpt = read_torch_file(path, STAND_INS, what=f"VQGAN checkpoint {path}")
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise UnsafeFileError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith("loss.")}


def convert_vqgan(ckpt_path: str | Path, config_path: str | Path, out: str | Path, image_size: int | None = None) -> Path:
    """Write an image tokenizer folder (config.json, model.safetensors, converted.json)."""
    from dalle.convert import record_conversion
    from dalle.io import check_state_dict

    config = config_from_yaml(read_yaml(config_path), config_path, image_size)
    tensors = read_checkpoint_weights(ckpt_path)
    with torch.device("meta"):
        skeleton = VQGAN(config)
    check_state_dict(skeleton, tensors, str(ckpt_path))
    model = VQGAN(config)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    folder = model.save_pretrained(out)
    record_conversion(folder, "taming-vqgan", {"checkpoint": ckpt_path, "config": config_path},
                      reference="taming-transformers (github.com/CompVis/taming-transformers), VQModel")
    return folder
