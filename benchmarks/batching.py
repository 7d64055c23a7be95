"""Speed work, measured: training batches built to an edge budget against a fixed structure
count, with the same mean batch size (MACE's cost per structure grows with its edges).

    .venv/bin/python benchmarks/batching.py --task matbench_phonons --structures 160

Both loops run matxfer's batching (`iterate_batches`) over the same rows and starting weights
(forward, L1 loss, backward, AdamW; float32, passes alternating). Reported: throughput, and the
spread of step cost as the largest and the mean edges per batch (what bounds peak memory).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

from matxfer.config import DataConfig, ModelConfig
from matxfer.graphs import batch_rows, iterate_batches, task_graphs
from matxfer.model import build_model


def _epoch(model, graphs, rows, opt, budget: dict, batch_size: int) -> float:
    start, n = time.perf_counter(), 0
    for batch in iterate_batches(graphs, rows, batch_size, shuffle=True, seed=0, **budget):
        pred, _ = model(batch)
        loss = (pred - batch["y"].to(pred.dtype)).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += batch["ptr"].numel() - 1
    return n / (time.perf_counter() - start)


def measure(task: str = "matbench_phonons", structures: int = 160, batch_size: int = 16,
            repeats: int = 2) -> dict:
    model = build_model(ModelConfig(dtype="float32"))
    graphs = task_graphs(DataConfig(task=task), model.graph_spec(), progress=False)
    rows = list(range(structures))
    mean_edges = float(graphs.n_edges[rows].float().mean())
    modes = {"fixed": ({}, batch_size),
             "edge_budget": ({"max_edges": int(batch_size * mean_edges)}, 4 * batch_size)}
    order = np.asarray(rows)[np.random.default_rng(0).permutation(len(rows))]
    record: dict = {"task": task, "structures": structures, "batch_size": batch_size,
                    "max_edges": modes["edge_budget"][0]["max_edges"]}
    runs = {}
    for name, (budget, size) in modes.items():
        edges = [int(graphs.n_edges[b].sum()) for b in batch_rows(graphs, order, size, **budget)]
        record[f"{name}_batches"] = len(edges)
        record[f"{name}_edges_per_batch_max"] = max(edges)
        record[f"{name}_edges_per_batch_mean"] = float(np.mean(edges))
        twin = copy.deepcopy(model)
        runs[name] = (twin, torch.optim.AdamW(twin.parameters(), 1e-4), budget, size)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats + 1):  # the first pass of each warms up and is dropped
        for name, (twin, opt, budget, size) in runs.items():
            rates[name].append(_epoch(twin, graphs, rows, opt, budget, size))
    for name in runs:
        record[f"{name}_structures_per_s"] = rates[name][1:]
    record["ratio_best"] = max(record["edge_budget_structures_per_s"]) / max(
        record["fixed_structures_per_s"])
    return record


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="matbench_phonons")
    parser.add_argument("--structures", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(measure(args.task, args.structures, repeats=args.repeats), indent=2))
