"""`matxfer data check`: a dataset card before any compute is spent.

Counts, elements (and those the foundation model lacks, by structure id), atoms per structure,
the target's distribution or class balance, skipped rows, exact duplicate structures (and
duplicates with conflicting labels), fold sizes under the chosen split, and estimates of the
graph cache's size and one training epoch's time on this machine. Problems that make training
meaningless raise UserError (exit 2) from the loaders and the split; the rest are warnings.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from ase.data import chemical_symbols

from matxfer.config import DataConfig, ModelConfig, derive
from matxfer.datasets.loading import load_rows, split_groups, usable_graphs
from matxfer.datasets.splits import composition_keys, custom_fold_split, outer_folds
from matxfer.graphs import GraphSet, build_graph_set, collate
from matxfer.model import PropertyModel, build_model

SHOWN = 10  # ids named per warning


@dataclass
class Card:
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, key: str, text: str) -> None:
        self.lines.append(f"  {key:10s}{text}")

    def text(self) -> str:
        out = self.lines + ([f"warnings ({len(self.warnings)})"] if self.warnings else [])
        return "\n".join(out + [f"  - {w}" for w in self.warnings])


def _ids(ids: list[str]) -> str:
    more = f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else ""
    return ", ".join(ids[:SHOWN]) + more


def describe_targets(card: Card, y: np.ndarray, kind: str, unit: str) -> None:
    if kind == "classification":
        ones = int((y == 1).sum())
        card.add("classes", f"1: {ones} ({ones / len(y):.0%}), 0: {len(y) - ones}")
        return
    q = np.percentile(y, [0, 25, 50, 75, 100])
    card.add("target", f"min {q[0]:.4g}, quartiles {q[1]:.4g} / {q[2]:.4g} / {q[3]:.4g}, "
             f"max {q[4]:.4g}, mean {y.mean():.4g} ± {y.std():.4g} {unit}".rstrip())


def duplicates(structures: dict, graphs: GraphSet) -> list[list[str]]:
    """Groups of ids whose structures match exactly (pymatgen StructureMatcher, compared
    only within the same reduced composition); molecules are not compared."""
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.io.ase import AseAtomsAdaptor

    by_formula = defaultdict(list)
    for i, key in zip(graphs.ids, composition_keys(graphs.n_atoms, graphs.species,
                                                   graphs.z_table)):
        by_formula[key].append(i)
    # exact duplicates: no rescaling, tight tolerances (the default matcher would also pair
    # a strained copy, which is a different data point)
    matcher, groups = StructureMatcher(ltol=0.01, stol=0.01, angle_tol=0.5, scale=False), []
    for members in (m for m in by_formula.values() if len(m) > 1):
        items = [structures[i] for i in members]
        if all(hasattr(s, "get_atomic_numbers") for s in items):
            if not all(s.pbc.all() for s in items):
                continue  # molecules: not compared here
            items = [AseAtomsAdaptor.get_structure(s) for s in items]
        index = {id(s): i for s, i in zip(items, members)}
        for group in matcher.group_structures(items):
            if len(group) > 1:
                groups.append([index[id(s)] for s in group])
    return groups


def epoch_seconds(model: PropertyModel, graphs: GraphSet, n_train: int,
                  batch_size: int = 16) -> float:
    """One training epoch's time here, from two timed forward+backward steps (after one
    warm-up) on batches of this dataset, scaled to `n_train` structures."""
    rows = list(range(min(batch_size, len(graphs))))
    batch = collate(graphs, rows)
    model.train()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model(batch)[0].sum().backward()
        times.append(time.perf_counter() - start)
    return float(np.mean(times[1:])) * n_train / len(rows)


def check_dataset(data: DataConfig, model_cfg: ModelConfig) -> Card:
    """The card of `data` (every problem that stops training raises UserError)."""
    card, spec = Card([f"dataset {data.task}"]), data.spec
    loaded = load_rows(data)
    frame = loaded.frame
    model = build_model(model_cfg)
    graph_spec = model.graph_spec()
    skip = data.source is not None and data.source.skip_bad_rows  # as tune's graph cache
    graphs = build_graph_set(list(frame.index), list(frame["structure"]),
                             frame["target"].to_numpy(), graph_spec, progress=False,
                             skip_bad=skip)
    graphs.skipped = loaded.skipped + graphs.skipped
    graphs = usable_graphs(data, graphs)  # the study's own row filters, as in task_graphs
    skipped = graphs.skipped
    card.add("rows", f"{len(graphs)} usable" + (f", {len(skipped)} skipped" if skipped else ""))
    elements = sorted({int(graphs.z_table[s]) for s in torch.unique(graphs.species)})
    card.add("elements", f"{len(elements)}: " + " ".join(chemical_symbols[z] for z in elements))
    n = graphs.n_atoms.numpy()
    card.add("atoms", f"per structure min {n.min()}, median {int(np.median(n))}, max {n.max()}")
    describe_targets(card, graphs.targets, spec.kind, spec.unit)
    for reason_ids in _by_reason(skipped):
        card.warnings.append(reason_ids)
    _duplicate_warnings(card, dict(zip(frame.index, frame["structure"])), graphs)
    n_train = _fold_lines(card, data, graphs)
    size = sum(getattr(graphs, k).numel() * getattr(graphs, k).element_size()
               for k in ("species", "positions", "edge_index", "shifts"))
    card.add("cache", f"graph cache about {size / 2**20:.1f} MiB "
             f"({int(graphs.n_edges.sum())} edges, cutoff {graph_spec.cutoff:g} Å)")
    seconds = epoch_seconds(model, graphs, n_train)
    card.add("epoch", f"about {seconds:.0f} s per training epoch on this machine's CPU "
             f"({n_train} structures, batch 16, {torch.get_num_threads()} threads)")
    return card


def _by_reason(skipped: list[tuple[str, str]]) -> list[str]:
    reasons = defaultdict(list)
    for rid, why in skipped:
        reasons[why].append(rid)
    return [f"skipped ({why}): {_ids(ids)}" for why, ids in reasons.items()]


def _duplicate_warnings(card: Card, structures: dict, graphs: GraphSet) -> None:
    target = dict(zip(graphs.ids, graphs.targets))
    groups = duplicates(structures, graphs)
    if groups:
        card.warnings.append(f"{len(groups)} groups of duplicate structures: "
                             + "; ".join(_ids(g) for g in groups[:SHOWN]))
    conflicting = [g for g in groups if np.ptp([target[i] for i in g]) > 0]
    if conflicting:
        card.warnings.append(f"{len(conflicting)} duplicate groups with conflicting labels: "
                             + "; ".join(f"{_ids(g)} ({', '.join(f'{target[i]:.4g}' for i in g)})"
                                         for g in conflicting[:SHOWN]))


def _fold_lines(card: Card, data: DataConfig, graphs: GraphSet) -> int:
    """Fold sizes under the configured split; returns fold 0's training size."""
    if data.source is None:
        card.add("folds", "Matbench's official 5 folds")
        return int(len(graphs) * 0.8 * (1 - data.val_fraction))
    split = data.outer_split
    groups = split_groups(data, graphs)
    folds = outer_folds(np.asarray(graphs.targets), groups, split,
                        data.spec.kind == "classification")
    sizes = np.bincount(folds, minlength=split.k)
    first = custom_fold_split(list(graphs.ids), np.asarray(graphs.targets), groups,
                              derive(data, {"fold": 0}))
    card.add("split", f"{split.method}, k={split.k}: test folds of "
             + ", ".join(str(s) for s in sizes)
             + f"; fold 0 trains on {len(first.train)}, validates on {len(first.val)}")
    return len(first.train)
