"""What a `data:` section names, whichever kind it is: a Matbench task (official folds, the
matminer file) or a user's own file (`data.source`, folds by `data.split`)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import pandas as pd

from matxfer.config import DataConfig, SourceConfig
from matxfer.datasets import matbench
from matxfer.datasets.sources import (
    Loaded,
    bad_row,
    fold_labels,
    load_source,
    source_sha256,
    usable_rows,
)
from matxfer.datasets.splits import (
    FoldSplit,
    chemsys_keys,
    composition_keys,
    custom_fold_split,
)
from matxfer.errors import UserError


def source_id(data: DataConfig) -> str:
    """Content hash of the data (Matbench: 'matminer' when it will be downloaded)."""
    if data.source is None:
        return matbench.data_source_id(data.task, data.data_dir)
    return source_sha256(data.source)


def load_rows(data: DataConfig) -> Loaded:
    """Every usable row: a frame indexed by id with `structure` and `target` (task units)."""
    if data.source is None:
        return Loaded(matbench.load_task(data.task, data.data_dir), [])
    return load_source(data.source)


def stream_rows(data: DataConfig, skipped: list) -> Iterator[tuple[str, object, float]]:
    """(id, structure, target) of every readable row (a structure and a numeric target),
    one at a time (bad rows skipped into `skipped` when allowed): what the graph cache is
    built from; the study's own row filters come after it (`usable_graphs`)."""
    if data.source is None:
        frame = matbench.load_task(data.task, data.data_dir)
        yield from zip(frame.index, frame["structure"], frame["target"])
        return
    for row in usable_rows(data.source, skipped):
        yield row.id, row.structure, row.target


@lru_cache(maxsize=4)
def _fold_labels(source_json: str, column: str) -> dict[str, object]:
    return fold_labels(SourceConfig.model_validate_json(source_json), column)


def row_problems(data: DataConfig, ids, targets) -> dict[str, str]:
    """{id: why} of the rows this study's own settings refuse: a class label not 0/1
    (classification), a target <= 0 (log_target), no fold label (split.method column).
    The one place these filters live: the graph cache holds every readable row whatever the
    study, and `usable_graphs` applies them after it is loaded."""
    src = data.source
    if src is None:
        return {}
    column = data.outer_split.column if data.outer_split.method == "column" else None
    labels = _fold_labels(src.model_dump_json(), column) if column else {}
    problems = {}
    for rid, y in zip(ids, np.asarray(targets, dtype=float).tolist()):
        if src.kind == "classification" and y not in (0.0, 1.0):
            problems[rid] = f"class label {y!r} is not 0/1 or true/false"
        elif src.log_target and y <= 0:
            problems[rid] = f"target {y!r} is <= 0, which log_target cannot take"
        elif column and labels.get(rid) is None:
            problems[rid] = f"no fold label {column!r}"
    return problems


def usable_graphs(data: DataConfig, graphs):
    """The rows of `graphs` (a GraphSet as cached) this study can use. A bad row, one the
    cache left out (`graphs.skipped`) or one of `row_problems`, stops the study with one line
    naming it; with skip_bad_rows the rest is kept and `skipped` lists what was left out."""
    src = data.source
    if src is None:
        return graphs
    problems = row_problems(data, graphs.ids, graphs.targets)
    bad = list(graphs.skipped) + list(problems.items())
    if bad and not src.skip_bad_rows:
        raise bad_row(src, *bad[0])
    if not problems:
        return graphs
    keep = [r for r, i in enumerate(graphs.ids) if i not in problems]
    if not keep:
        raise UserError(f"{src.path}: no usable rows; row {bad[0][0]}: {bad[0][1]}")
    usable = graphs.take(keep)
    usable.skipped = bad
    return usable


def split_groups(data: DataConfig, graphs) -> list | None:
    """What the outer split keeps together, per graph row: reduced formula, chemical system,
    the user's fold label, or None (kfold)."""
    method = data.outer_split.method
    if method == "group-composition":
        return composition_keys(graphs.n_atoms, graphs.species, graphs.z_table)
    if method == "group-chemsys":
        return chemsys_keys(graphs.n_atoms, graphs.species, graphs.z_table)
    if method == "column":
        labels = _fold_labels(data.source.model_dump_json(), data.outer_split.column)
        return [labels[i] for i in graphs.ids]
    return None


def data_files(data: DataConfig, split: FoldSplit, graphs) -> dict[str, object]:
    """Files that travel with a fold's results for a user dataset: split.json (the fold's ids
    and how they were drawn, with the data's hash, so a rerun and a reader get the same folds)
    and skipped_rows.csv (rows left out, with why). Matbench: none (official folds)."""
    if data.source is None:
        return {}
    s = data.outer_split
    files: dict[str, object] = {"split.json": {
        "dataset": data.task, "sha256": source_id(data), "method": s.method, "k": s.k,
        "seed": s.seed, "column": s.column, "fold": split.fold, "val_fraction":
        data.val_fraction, "val_seed": data.val_seed, "max_structures": data.max_structures,
        "train": split.train, "val": split.val, "test": split.test}}
    if graphs.skipped:
        files["skipped_rows.csv"] = pd.DataFrame(graphs.skipped, columns=["id", "reason"])
    return files


def fold_split(data: DataConfig, graphs) -> FoldSplit:
    """Fold `data.fold` of the dataset with its validation split (`graphs`: its GraphSet)."""
    targets = pd.Series(graphs.targets, index=graphs.ids, name="target")
    if data.source is None:
        return matbench.fold_split(targets.to_frame(), data.task, data.fold, data.val_fraction,
                                   data.val_seed, data.max_structures)
    groups = split_groups(data, graphs)
    keep = matbench.subset_ids(list(graphs.ids), data.max_structures)
    rows = [r for r, i in enumerate(graphs.ids) if keep is None or i in keep]
    return custom_fold_split([graphs.ids[r] for r in rows], np.asarray(graphs.targets)[rows],
                             None if groups is None else [groups[r] for r in rows], data)
