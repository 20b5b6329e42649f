#!/usr/bin/env bash
# Train the bundled model (dalle/bundled) from scratch with the shapes preset and export it in fp16.
#   scripts/train_bundled.sh [MINUTES] [DEVICE] [WORKDIR] [TRAIN OPTIONS...]
# Options after the third argument go to `dalle train all` (e.g. --set transformer.attention=full).
# The same recipe runs on 2 CPU cores (slowly) or a GPU; README says which trained the shipped one.
set -euo pipefail
MINUTES=${1:-60}
DEVICE=${2:-cpu}
WORK=${3:-runs/bundled}
shift $(( $# < 3 ? $# : 3 ))
PY=${PYTHON:-python3}
"$PY" -m dalle.cli train all --data shapes --out "$WORK" --preset shapes --minutes "$MINUTES" --device "$DEVICE" --resume "$@"
"$PY" scripts/export_model.py "$WORK" "${DEST:-dalle/bundled}" --dtype float16
