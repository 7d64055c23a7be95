"""Speed work, measured: MACE-MP-0 restricted to the elements present in a task (what MACE's
own fine-tuning does, `mace.tools.finetuning_utils.load_foundations_elements`) against the
full 89-element model.

    .venv/bin/python benchmarks/restriction.py --task matbench_phonons --structures 160

Checks that the restricted model gives the same node features in float64 (max |diff|), then
times training steps (forward, L1 loss, backward, AdamW; float32, the same batches, passes
alternating) of a PropertyModel on each backbone.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from matxfer.graphs import GraphSet, iterate_batches, task_graphs
from matxfer.model import PropertyModel, load_backbone


def restricted_backbone(full: torch.nn.Module, elements: list[int]) -> torch.nn.Module:
    """A copy of `full` whose element tables hold only `elements` (atomic numbers)."""
    from mace.tools.finetuning_utils import load_foundations_elements
    from mace.tools.scripts_utils import extract_config_mace_model
    from mace.tools.utils import AtomicNumberTable

    dtype = next(full.parameters()).dtype
    cfg = extract_config_mace_model(full)
    index = [int(z) for z in full.atomic_numbers]
    keep = [index.index(z) for z in elements]
    cfg["atomic_numbers"], cfg["num_elements"] = elements, len(elements)
    cfg["atomic_energies"] = cfg["atomic_energies"][..., keep]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        small = type(full)(**cfg).to(dtype)
        small = load_foundations_elements(small, full, AtomicNumberTable(elements),
                                          load_readout=True, max_L=0)
    finally:
        torch.set_default_dtype(previous)
    for p in small.readouts.parameters():
        p.requires_grad_(False)
    return small


def _graphs(task: str, model: torch.nn.Module) -> GraphSet:
    return task_graphs(task, [int(z) for z in model.atomic_numbers], float(model.r_max),
                       next(model.parameters()).dtype, progress=False)


def _node_feats(model: torch.nn.Module, graphs: GraphSet, rows: list[int]) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for batch in iterate_batches(graphs, rows, 16):
            n = batch["ptr"].numel() - 1
            batch["cell"] = torch.zeros(3 * n, 3, dtype=batch["positions"].dtype)
            batch["unit_shifts"] = torch.zeros_like(batch["shifts"])
            out.append(model(batch, training=False, compute_force=False)["node_feats"])
    return torch.cat(out)


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
    full64 = load_backbone("small", "pretrained", dtype=torch.float64)
    present = sorted({int(full64.atomic_numbers[i]) for i in _graphs(task, full64).species
                      .unique().tolist()})
    small64 = restricted_backbone(full64, present)
    rows = list(range(structures))
    diff = (_node_feats(full64, _graphs(task, full64), rows[:64])
            - _node_feats(small64, _graphs(task, small64), rows[:64])).abs().max().item()
    runs = {}
    for name, backbone in (("full", full64), ("restricted", small64)):
        torch.manual_seed(0)
        model = PropertyModel(backbone.to(torch.float32), "mean", [256, 128])
        runs[name] = (model, _graphs(task, backbone),
                      torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4))
    rates: dict[str, list[float]] = {"full": [], "restricted": []}
    for _ in range(repeats + 1):  # the first pass of each warms up and is dropped
        for name, (model, graphs, opt) in runs.items():
            rates[name].append(_epoch(model, graphs, rows, opt))
    rates = {k: v[1:] for k, v in rates.items()}
    return {"task": task, "elements_present": len(present),
            "elements_model": len(full64.atomic_numbers), "structures": structures,
            "max_abs_diff_node_feats_float64": diff,
            "parameters_full": sum(p.numel() for p in runs["full"][0].backbone.parameters()),
            "parameters_restricted": sum(p.numel()
                                         for p in runs["restricted"][0].backbone.parameters()),
            "full_structures_per_s": rates["full"],
            "restricted_structures_per_s": rates["restricted"],
            "ratio_best": max(rates["restricted"]) / max(rates["full"])}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="matbench_phonons")
    parser.add_argument("--structures", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(measure(args.task, args.structures, args.repeats), indent=2))
