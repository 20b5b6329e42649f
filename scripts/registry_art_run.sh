#!/bin/bash
# The registry-art target run: data, a 60-minute `dalle train all` with the small-64 preset,
# then the evaluation on the held-out split and the gallery.
#   bash scripts/registry_art_run.sh DATA_DIR MODEL_DIR [MINUTES]
# DATA_DIR is made by scripts/make_registry_art.py when it does not exist.  Threads: 2
# (OMP_WAIT_POLICY=PASSIVE: on a shared, oversubscribed CPU spinning OpenMP threads slow a
# 2-thread step many times over; see benchmarks/bench_transformer.py).
set -euo pipefail
DATA=${1:?data folder}
MODEL=${2:?model folder}
MINUTES=${3:-60}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=2 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
[ -d "$DATA" ] || "$PY" scripts/make_registry_art.py --out "$DATA"
date -u +"start %FT%TZ"
"$PY" -m dalle.cli train all --data "$DATA" --out "$MODEL" --preset small-64 --minutes "$MINUTES"
date -u +"trained %FT%TZ"
"$PY" scripts/gallery.py --model "$MODEL" --data "$DATA" --out "$MODEL/gallery.png"
# every held-out caption (158 with the default registry-art set), 8 candidates each
"$PY" -m dalle.cli eval --model "$MODEL" --data "$DATA" --captions 158 --candidates 8 --out "$MODEL/eval.json"
date -u +"done %FT%TZ"
