"""Speed work, measured: MACE-MP-0 run on the task's elements only (`PropertyModel.
restrict_elements`, the path training takes) against the full 89-element backbone.

    .venv/bin/python benchmarks/restriction.py --task matbench_phonons --structures 160

Checks, in float64, that predictions and parameter gradients of the two paths agree (max |diff|),
then times training steps (forward, L1 loss, backward, AdamW; float32, the same batches, the same
starting weights, passes alternating) and the one-off cost of building the restricted path.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from matxfer.config import DataConfig, ModelConfig
from matxfer.graphs import GraphSet, iterate_batches, present_elements, task_graphs
from matxfer.model import PropertyModel, build_model


def _graphs(task: str, model: PropertyModel) -> GraphSet:
    return task_graphs(DataConfig(task=task), model.graph_spec(), progress=False)


def _pair(task: str, dtype: str) -> tuple[PropertyModel, PropertyModel, GraphSet, float]:
    """(full, restricted) models with identical weights, the task's graphs, restrict seconds."""
    full, restricted = build_model(ModelConfig(dtype=dtype)), build_model(ModelConfig(dtype=dtype))
    graphs = _graphs(task, full)
    start = time.perf_counter()
    restricted.restrict_elements(present_elements(graphs.species, graphs.z_table))
    return full, restricted, graphs, time.perf_counter() - start


def _identity(task: str, rows: list[int]) -> dict:
    full, restricted, graphs, _ = _pair(task, "float64")
    pred, grad = 0.0, 0.0
    for batch in iterate_batches(graphs, rows, 16):
        p_full, p_restricted = full(batch)[0], restricted(batch)[0]
        pred = max(pred, (p_full - p_restricted).abs().max().item())
        (p_full.square().sum()).backward()
        (p_restricted.square().sum()).backward()
    for a, b in zip(full.parameters(), restricted.parameters()):
        if a.grad is not None:
            grad = max(grad, (a.grad - b.grad).abs().max().item())
    return {"max_abs_diff_predictions_float64": pred, "max_abs_diff_gradients_float64": grad}


def _epoch(model: PropertyModel, graphs: GraphSet, rows: list[int], opt) -> float:
    start = time.perf_counter()
    for batch in iterate_batches(graphs, rows, 16, shuffle=True, seed=0):
        pred, _ = model(batch)
        loss = (pred - batch["y"].to(pred.dtype)).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return len(rows) / (time.perf_counter() - start)


def measure(task: str, structures: int = 160, repeats: int = 2) -> dict:
    rows = list(range(structures))
    record = {"task": task, "structures": structures, **_identity(task, rows[:48])}
    full, restricted, graphs, seconds = _pair(task, "float32")
    runs = {name: (model, torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], 1e-4))
        for name, model in (("full", full), ("restricted", restricted))}
    rates: dict[str, list[float]] = {"full": [], "restricted": []}
    for _ in range(repeats + 1):  # the first pass of each warms up and is dropped
        for name, (model, opt) in runs.items():
            rates[name].append(_epoch(model, graphs, rows, opt))
    rates = {k: v[1:] for k, v in rates.items()}
    return {**record, "elements_present": len(restricted.fast_path.elements),
            "elements_model": len(full.backbone.atomic_numbers),
            "restrict_seconds": round(seconds, 2),
            "full_structures_per_s": rates["full"],
            "restricted_structures_per_s": rates["restricted"],
            "ratio_best": max(rates["restricted"]) / max(rates["full"])}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="matbench_phonons")
    parser.add_argument("--structures", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(measure(args.task, args.structures, args.repeats), indent=2))
