#!/usr/bin/env bash
# Installs the reference code the conversion tests (tests/convert/) compare against, from PyPI:
#   - DALL-E==0.1               OpenAI's dVAE package (dall_e: Encoder, Decoder)
#   - clip-anytorch==2.6.0      OpenAI's CLIP code (clip/model.py, clip/simple_tokenizer.py) and
#                               CLIP's BPE vocabulary, bpe_simple_vocab_16e6.txt.gz
#   - taming-transformers==0.0.1 taming's VQGAN modules (Encoder, Decoder, VectorQuantizer)
# They declare torchvision (and others: blobfile, mypy, pytorch-lightning, omegaconf), which would
# replace the pinned CPU torch or pull in much more: the `reference` extra first adds what their
# modules import (attrs, requests, ftfy, regex), then they go in with --no-deps (pip then skips
# its dependency check, so no conflict report).  The script fails if torch changed.
#
# Usage: bash scripts/install_reference.sh        (after the README's set-up)
set -euo pipefail
cd "$(dirname "$0")/.."

PIP=${PIP:-.venv/bin/pip}
PYTHON=${PYTHON:-.venv/bin/python}
before=$("$PYTHON" -c "import torch; print(torch.__version__)")
"$PIP" install -q -e '.[test,reference]'
"$PIP" install -q --no-deps "DALL-E==0.1" "clip-anytorch==2.6.0" "taming-transformers==0.0.1"
after=$("$PYTHON" -c "import torch; print(torch.__version__)")
if [ "$before" != "$after" ]; then
    echo "error: installing the reference packages changed torch from $before to $after" >&2
    exit 1
fi
"$PYTHON" -c "import dall_e, ftfy, regex, yaml, importlib.util as u; assert u.find_spec('clip') and u.find_spec('taming')"
echo "reference packages installed (torch $after unchanged)"
