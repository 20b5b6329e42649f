#!/usr/bin/env bash
# Installs the reference code the conversion tests (tests/convert/) compare against, from PyPI:
#   - DALL-E==0.1         OpenAI's dVAE package (dall_e: Encoder, Decoder)
#   - clip-anytorch==2.6.0 OpenAI's CLIP code (clip/model.py, clip/simple_tokenizer.py) and
#                          CLIP's BPE vocabulary, bpe_simple_vocab_16e6.txt.gz
# Both declare torchvision (and DALL-E also blobfile, mypy, pytest), which would replace the
# pinned CPU torch: they go in with --no-deps, then the `reference` extra adds what their
# modules import (attrs, requests, ftfy, regex).  The script fails if torch changed.
#
# Usage: bash scripts/install_reference.sh        (after the README's set-up)
set -euo pipefail
cd "$(dirname "$0")/.."

PIP=${PIP:-.venv/bin/pip}
PYTHON=${PYTHON:-.venv/bin/python}
before=$("$PYTHON" -c "import torch; print(torch.__version__)")
"$PIP" install -q --no-deps "DALL-E==0.1" "clip-anytorch==2.6.0"
"$PIP" install -q -e '.[test,reference]'
after=$("$PYTHON" -c "import torch; print(torch.__version__)")
if [ "$before" != "$after" ]; then
    echo "error: installing the reference packages changed torch from $before to $after" >&2
    exit 1
fi
"$PYTHON" -c "import dall_e, ftfy, regex, importlib.util as u; assert u.find_spec('clip')" 
echo "reference packages installed (torch $after unchanged)"
