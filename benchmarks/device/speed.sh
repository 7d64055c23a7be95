#!/usr/bin/env bash
# On the lent GPU machine, from the repo root, with .device/ carried (benchmarks/device/pack.sh):
# every speed path of benchmarks/speed_paths.py on CUDA, float32 (speed) then float64 (the
# issue's 1e-5 "same results" bar), results and log under $OUT. ~5-8 min on one H200.
# Dry run here: PY=.venv/bin/python DEVICE=cpu SKIP_INSTALL=1 STRUCTURES=32 VARIANTS=restrict
set -uo pipefail
OUT=${OUT:-runs/device}; mkdir -p "$OUT"
PY=${PY:-python3}; DEVICE=${DEVICE:-cuda}; STRUCTURES=${STRUCTURES:-640}
exec > >(tee "$OUT/speed_log.txt") 2>&1
if [ -z "${SKIP_INSTALL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .device/wheels/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/mx/graphs
for f in .device/graphs/*.gz; do gunzip -c "$f" > "/tmp/mx/graphs/$(basename "$f" .gz)"; done
cp .device/graphs/*.sha256 /tmp/mx/graphs/
model=$(ls .device/*.model.gz); gunzip -c "$model" > "/tmp/mx/$(basename "$model" .gz)"
export MATXFER_CACHE=/tmp/mx/graphs MATXFER_MODEL=/tmp/mx/$(basename "$model" .gz)
export MATMINER_DATA=$PWD/.device/data
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
$PY -c "import torch, e3nn; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'e3nn', e3nn.__version__)"
VARIANTS=${VARIANTS:-compile prefetch restrict edge_budget}
$PY -c "import cuequivariance_ops_torch" 2>/dev/null && VARIANTS="cueq $VARIANTS"
# shellcheck disable=SC2086
timeout 330 $PY benchmarks/speed_paths.py --device "$DEVICE" --structures "$STRUCTURES" \
  --epochs 3 --variants $VARIANTS --out "$OUT/speed_paths_$DEVICE.json"
# shellcheck disable=SC2086
timeout 150 $PY benchmarks/speed_paths.py --device "$DEVICE" --dtype float64 \
  --structures $((STRUCTURES / 4)) --epochs 2 --variants $VARIANTS \
  --out "$OUT/speed_paths_${DEVICE}_float64.json"
