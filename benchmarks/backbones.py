"""What each backbone costs per epoch on this machine, measured side by side in one process:

    .venv/bin/python benchmarks/backbones.py [--task matbench_jdft2d] [--epochs 2]

Per backbone (MACE-MP-0 small, CHGNet 0.3.0): parameters the property model trains, graph
cache build time for the whole task, and the wall time of a training epoch over fold 0's
training split (batch 16, AdamW, L2-SP + BSS on, one thread per core) and of one inference
pass; the first epoch (warm-up) is reported apart. Ratios are against MACE-MP-0 small,
measured in the same process. Writes benchmarks/results/backbones_cost.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from matxfer.config import load_config
from matxfer.graphs import iterate_batches, task_graphs
from matxfer.model import build_model
from matxfer.run import prepare_fold
from matxfer.train import fit

HERE = Path(__file__).parent
SOURCES = {"MACE-MP-0 small": "small", "CHGNet 0.3.0": "chgnet"}


def measure(source: str, task: str, epochs: int, cache: str) -> dict:
    cfg = load_config(overrides={
        "data.task": task, "data.cache_dir": cache, "model.source": source,
        "train.epochs": epochs, "train.batch_size": 16, "regularizers.l2sp": 1e-4,
        "regularizers.bss": 1e-3, "train.patience": None})
    model = build_model(cfg.model)
    start = time.perf_counter()
    task_graphs(cfg.data, model.graph_spec(), progress=False)
    build = time.perf_counter() - start
    data = prepare_fold(cfg, model, progress=False)
    trained = fit(model, data, cfg, torch.device("cpu"), log=None)
    seconds = [h["seconds"] for h in trained.history]
    model.eval()
    rows = data.graphs.positions_of(data.split.test)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in iterate_batches(data.graphs, rows, 64):
            model(batch)
    return {"source": source, "parameters": model.family.n_parameters(model.backbone),
            "graph_build_s": round(build, 2), "n_train": len(data.split.train),
            "first_epoch_s": round(seconds[0], 2),
            "epoch_s": round(sum(seconds[1:]) / max(1, len(seconds) - 1), 2),
            "n_test": len(rows), "inference_s": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="matbench_jdft2d")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    rows = {}
    with tempfile.TemporaryDirectory() as cache:  # graph caches built from scratch
        for name, source in SOURCES.items():
            rows[name] = measure(source, args.task, args.epochs, cache)
            print(name, rows[name], flush=True)
    base = rows["MACE-MP-0 small"]
    for row in rows.values():
        row["epoch_vs_mace"] = round(row["epoch_s"] / base["epoch_s"], 3)
    out = {"task": args.task, "epochs": args.epochs, "threads": torch.get_num_threads(),
           "command": f".venv/bin/python benchmarks/backbones.py --task {args.task} "
                      f"--epochs {args.epochs}", "backbones": rows}
    (HERE / "results" / "backbones_cost.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
