#!/usr/bin/env bash
# One device session: smoke-test the CUDA path, train the bundled model, export, evaluate.
# Writes into $OUT (the device tool's output folder) or ./gpu_out.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
MIN=${MINUTES:-6.5}
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m dalle.cli train all --data shapes --out /tmp/smoke --preset tiny --steps 5 --device cuda >/tmp/smoke.log 2>&1 \
  && python3 -m dalle.cli generate "a red circle" --model /tmp/smoke --candidates 4 --keep 2 --out /tmp/smoke_out --device cuda \
  || { tail -40 /tmp/smoke.log; echo SMOKE FAILED; exit 3; }
echo SMOKE OK
start=$(date +%s)
python3 -m dalle.cli train all --data shapes --out /tmp/bundled --preset shapes --minutes "$MIN" --device cuda 2>&1 \
  | tr '\r' '\n' | grep -vE '^\s*(dvae|clip|transformer|encoding|tokens).*[0-9]+%\|' | tail -60
echo "train seconds $(( $(date +%s) - start ))"
python3 scripts/export_model.py /tmp/bundled /tmp/export --dtype float16 || exit 4
mkdir -p /tmp/export/logs && cp /tmp/bundled/logs/*.csv /tmp/export/logs/ 2>/dev/null
(cd /tmp && tar cf - export | split -b 15M - "$OUT/bundled.tar.part-")
timeout 150 python3 -m dalle.cli eval --model /tmp/export --out "$OUT/eval.json" --device cuda 2>&1 | tr '\r' '\n' | grep -v '%|' | tail -20
ls -la "$OUT"
