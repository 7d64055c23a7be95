#!/bin/bash
# End-to-end torch.compile check on CPU: the same `matxfer train` (jdft2d fold 0, 40 epochs,
# L2-SP + BSS, one thread each) with compile off and inductor side by side, inductor with a
# cold cache (its one-off compile counted). Writes <out>/{off,inductor}/ and <out>/*.log.
#   bash benchmarks/compile_cpu.sh [out=runs/compile_cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/compile_cpu}
mkdir -p "$OUT"
COMMON=(--task matbench_jdft2d --fold 0 --epochs 40 --val-fraction 0.1 --pooling mean
        --l2sp 1e-3 --bss 1.5e-3 --threads 1 --quiet --overwrite)
CACHE=$(mktemp -d)
/usr/bin/time -v .venv/bin/matxfer train "${COMMON[@]}" --compile off --out "$OUT/off" \
    > "$OUT/off.log" 2>&1 &
TORCHINDUCTOR_CACHE_DIR=$CACHE /usr/bin/time -v .venv/bin/matxfer train "${COMMON[@]}" \
    --compile inductor --out "$OUT/inductor" > "$OUT/inductor.log" 2>&1 &
wait
rm -rf "$CACHE"
grep -H "Elapsed" "$OUT"/*.log
