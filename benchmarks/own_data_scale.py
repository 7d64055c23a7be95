"""Your own data at scale (issue 21): rows/s and peak memory of building the graph cache of a
generated N-structure extended-XYZ file, streamed (matxfer's path) vs the same rows first
loaded into one frame of structures (the baseline), each in a fresh process, one command:

    .venv/bin/python benchmarks/own_data_scale.py [--structures 20000]

The file repeats the 200 example structures (examples/phonons200) with seeded random
displacements (0.02 Å) and new ids. Writes benchmarks/results/own_data_scale.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ase.io import iread, write

HERE = Path(__file__).parent
EXAMPLE = HERE.parent / "examples/phonons200/phonons200.extxyz"

CHILD = """
import json, resource, sys, time
import torch
from matxfer.config import DataConfig
from matxfer.model import graph_spec, load_backbone
bb = load_backbone("small", "pretrained", 0, torch.float32)
data = DataConfig(task="scale", cache_dir=sys.argv[2],
                  source={"path": sys.argv[1], "target": "last_phdos_peak", "id_key": "id"})
spec = graph_spec(bb)  # float32
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if sys.argv[3] == "streamed":
    from matxfer.graphs import task_graphs
    n = len(task_graphs(data, spec, progress=False))
else:  # baseline: every structure in memory first, then the graphs
    from matxfer.datasets.loading import load_rows
    from matxfer.graphs import build_graph_set
    frame = load_rows(data).frame
    n = len(build_graph_set(list(frame.index), list(frame["structure"]),
                            frame["target"].to_numpy(), spec, False))
took = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from pathlib import Path
cache = sum(f.stat().st_size for f in Path(sys.argv[2]).glob("*.pt")) / 2**20
print(json.dumps({"rows": n, "seconds": round(took, 2), "rows_per_s": round(n / took, 1),
                  "graph_cache_mib": round(cache, 1),
                  "peak_rss_mib": round(peak / 1024, 1),
                  "rss_before_mib": round(before / 1024, 1)}))
"""


def generate(path: Path, n: int, seed: int = 0) -> None:
    base = list(iread(EXAMPLE, index=":"))
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        atoms = base[i % len(base)].copy()
        atoms.positions += rng.normal(0, 0.02, atoms.positions.shape)
        atoms.info = {"id": f"gen-{i:06d}",
                      "last_phdos_peak": base[i % len(base)].info["last_phdos_peak"]}
        images.append(atoms)
    write(path, images, format="extxyz")


def measure(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "generated.extxyz"
        start = time.perf_counter()
        generate(data, n)
        made = time.perf_counter() - start
        size = data.stat().st_size / 2**20
        runs = {}
        for mode in ("baseline", "streamed"):
            proc = subprocess.run([sys.executable, "-c", CHILD, str(data), str(tmp / mode), mode],
                                  capture_output=True, text=True, check=True)
            runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    base, stream = runs["baseline"], runs["streamed"]
    return {"command": f"python benchmarks/own_data_scale.py --structures {n}",
            "structures": n, "file_mib": round(size, 1),
            "generate_s": round(made, 1), "baseline_all_in_memory": base, "streamed": stream,
            "ratio_rows_per_s_streamed_vs_baseline": round(stream["rows_per_s"]
                                                           / base["rows_per_s"], 3),
            "peak_rss_growth_mib": {
                mode: round(r["peak_rss_mib"] - r["rss_before_mib"], 1)
                for mode, r in runs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=20000)
    result = measure(parser.parse_args().structures)
    (HERE / "results" / "own_data_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
