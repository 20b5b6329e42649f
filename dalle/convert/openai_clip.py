"""OpenAI's released CLIP (``ViT-B-32.pt``, ``RN50.pt``, ...) -> a CLIP folder used as the reranker.

OpenAI publishes each CLIP as a TorchScript archive.  Its tensors are read from the
archive's records (:mod:`dalle.convert.safe_pickle`; the archive's code is never
compiled or run), the hyperparameters are read off their shapes, and the folder gets
:class:`dalle.openai_clip.OpenAICLIP`'s config, the weights as safetensors and CLIP's
BPE merge list (taken from an installed package that ships it, or ``--vocab``).
A plain ``torch.save`` of the state dict (e.g. open_clip's ``openai`` checkpoints) is
read the same way.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import torch

from dalle.convert.safe_pickle import UnsafeFileError, module_tensors, read_torch_file
from dalle.openai_clip import VOCAB_FILE, OpenAICLIP, OpenAICLIPConfig

# TorchScript objects and, for state-dict files, torch's module containers.
STAND_INS = ("__torch__.", "torch.nn.modules.")
# Tensors of the released archives that are not weights: sizes saved as attributes and
# the text tower's causal mask (rebuilt by the model).
NOT_WEIGHTS = re.compile(r"^(input_resolution|context_length|vocab_size)$|(^|\.)attn_mask$")
# Packages that ship CLIP's merge list next to their code.
VOCAB_PACKAGES = ("open_clip", "clip")


def find_vocab() -> Path | None:
    """CLIP's ``bpe_simple_vocab_16e6.txt.gz`` from an installed package (found without importing it)."""
    for name in VOCAB_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / VOCAB_FILE
            if path.is_file():
                return path
    return None


def read_released_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    obj = read_torch_file(path, STAND_INS, what=f"CLIP file {path}")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = module_tensors(obj)
    tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    if "token_embedding.weight" not in tensors:
        raise UnsafeFileError(f"{path} holds no CLIP text tower (token_embedding.weight); is it an OpenAI CLIP file?")
    return {k: v for k, v in tensors.items() if not NOT_WEIGHTS.search(k)}


def _count(tensors: dict[str, torch.Tensor], pattern: str) -> int:
    found = {m.group(1) for k in tensors if (m := re.match(pattern, k))}
    return len(found)


def config_from_tensors(t: dict[str, torch.Tensor]) -> OpenAICLIPConfig:
    """The released hyperparameters, read off the tensors' shapes (heads: width / 64, as released)."""
    text_width = t["ln_final.weight"].shape[0]
    common = dict(
        embed_dim=t["text_projection"].shape[1],
        context_length=t["positional_embedding"].shape[0],
        vocab_size=t["token_embedding.weight"].shape[0],
        text_width=text_width,
        text_layers=_count(t, r"transformer\.resblocks\.(\d+)\."),
        text_heads=max(text_width // 64, 1),
    )
    if "visual.proj" in t:  # a vision transformer
        width, patch = t["visual.conv1.weight"].shape[0], t["visual.conv1.weight"].shape[-1]
        grid = round((t["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        return OpenAICLIPConfig(image_size=grid * patch, vision_width=width, vision_patch_size=patch,
                                vision_layers=_count(t, r"visual\.transformer\.resblocks\.(\d+)\."),
                                vision_heads=max(width // 64, 1), **common)
    if "visual.attnpool.positional_embedding" in t:  # the modified ResNet
        width = t["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((t["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = tuple(_count(t, rf"visual\.layer{i}\.(\d+)\.") for i in range(1, 5))
        return OpenAICLIPConfig(image_size=grid * 32, vision_width=width, resnet_layers=layers,
                                vision_heads=width * 32 // 64, vision_layers=0, vision_patch_size=32, **common)
    raise UnsafeFileError("the file's image tower is neither CLIP's vision transformer nor its ResNet")


def convert_openai_clip(model_path: str | Path, out: str | Path, vocab: str | Path | None = None) -> Path:
    """Write a CLIP folder (config.json, model.safetensors, the BPE merge list, converted.json)."""
    from dalle.clip_tokenizer import CLIPTokenizer
    from dalle.convert import record_conversion
    from dalle.io import check_state_dict

    vocab_path = Path(vocab) if vocab is not None else find_vocab()
    if vocab_path is None:
        raise FileNotFoundError(
            f"CLIP's vocabulary {VOCAB_FILE} was not found in an installed package ({', '.join(VOCAB_PACKAGES)}); "
            "pass --vocab PATH (it ships in the open_clip_torch and clip-anytorch packages)")
    tokenizer = CLIPTokenizer(vocab_path)  # a readable merge list, or a clear error
    tensors = read_released_tensors(model_path)
    config = config_from_tensors(tensors)
    if tokenizer.vocab_size != config.vocab_size:
        raise UnsafeFileError(f"{vocab_path} gives {tokenizer.vocab_size} tokens but the model has {config.vocab_size}")
    with torch.device("meta"):
        skeleton = OpenAICLIP(config)
    check_state_dict(skeleton, tensors, str(model_path))
    model = OpenAICLIP(config)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    # Released CLIPs are stored in fp16: keep that size on disk (loading computes in fp32).
    halves = all(v.dtype == torch.float16 for v in tensors.values() if v.is_floating_point())
    folder = model.save_pretrained(out, dtype=torch.float16 if halves else None)
    shutil.copy2(vocab_path, folder / VOCAB_FILE)
    record_conversion(folder, "openai-clip", {"model": model_path, "vocabulary": vocab_path},
                      reference="OpenAI's CLIP (github.com/openai/CLIP), a released TorchScript archive",
                      image_tower="ResNet" if config.is_resnet else "ViT")
    return folder

