"""Export a trained model folder for shipping: fp16 safetensors, configs and tokenizer only.

    python scripts/export_model.py runs/bundled dalle/bundled [--dtype float16]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from dalle.pipeline import DallePipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="model folder written by dalle train all")
    parser.add_argument("dest", type=Path, help="folder to write (replaced)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    args = parser.parse_args()
    pipe = DallePipeline.from_pretrained(args.source, device="cpu")
    tmp = args.dest.with_name(args.dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, dtype=getattr(torch, args.dtype))
    for extra in ("dalle.json",):
        if (args.source / extra).is_file():
            shutil.copy(args.source / extra, tmp / extra)
    shutil.rmtree(args.dest, ignore_errors=True)
    tmp.rename(args.dest)
    total = sum(p.stat().st_size for p in args.dest.rglob("*") if p.is_file())
    print(f"exported {args.source} -> {args.dest} ({total / 1e6:.1f} MB, {args.dtype})")


if __name__ == "__main__":
    main()
