#!/usr/bin/env bash
# Pack what benchmarks/device/speed.sh needs on a lent GPU machine (no internet there; its
# python3 is 3.12 with torch, numpy, scipy, pandas, sklearn, e3nn...) into the git-ignored
# folder .device/ of this checkout: wheels of the missing packages (cp312), MACE-MP-0 small
# (gzipped), the phonons data file (its hash keys the graph cache) and its float32 + float64
# graph caches (gzipped), about 50 MB: under the device tool's 64 MiB.
#   bash benchmarks/device/pack.sh          # here, once
#   then the device tool: run(command="bash benchmarks/device/speed.sh", carry=[".device"])
# Without cuequivariance's CUDA ops (cuequivariance-ops-torch-cu13 + -ops-cu13: 73 MB, over
# the limit) the cueq path is its torch fallback, so speed.sh leaves it out.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=.venv/bin
mkdir -p .git/info && { grep -qx "/.device/" .git/info/exclude 2>/dev/null || echo "/.device/" >> .git/info/exclude; }
rm -rf .device && mkdir -p .device/wheels .device/graphs .device/data
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .device/wheels \
  mace-torch==0.3.16 e3nn==0.4.4 ase==3.29.0 matscipy==1.3.1 lmdb==3.0.0 torch-ema==0.3 \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  matbench==0.6 cuequivariance==0.13.0 cuequivariance-torch==0.13.0 orjson==3.13.0 \
  pytz==2026.6
MODEL=$($BIN/python -c "from matxfer.model import weights_file; print(weights_file('small'))")
gzip -c "$MODEL" > ".device/$(basename "$MODEL").gz"
DATA=$($BIN/python -c "from matxfer.datasets.matbench import local_data_file; print(local_data_file('matbench_phonons'))")
cp "$DATA" .device/data/
for dtype in float32 float64; do  # the caches speed_paths.py reads (built here if missing)
  path=$($BIN/python - "$dtype" <<'PY'
import sys
from matxfer.config import load_config
from matxfer.graphs import task_graphs
from matxfer.model import build_model
cfg = load_config(overrides={"data.task": "matbench_phonons", "model.dtype": sys.argv[1]})
args = (cfg.data, build_model(cfg.model).graph_spec())  # the backbone's dtype: sys.argv[1]
task_graphs(*args, progress=False)
from matxfer.graphs import cache_file
print(cache_file(*args))
PY
)
  gzip -c "$path" > ".device/graphs/$(basename "$path").gz"
  cp "$path.sha256" .device/graphs/
done
du -sh .device
