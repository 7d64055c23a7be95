"""Folds of a user dataset: seeded k-fold (stratified for classification), grouped by reduced
composition or chemical system, or the user's own fold labels; scikit-learn does the splitting.

The inner validation split follows the outer rule: grouped when the outer split is grouped, so
no formula (or chemical system) is on both sides of the validation split either.

MatFold 1.3.3 (PyPI) was evaluated: it offers more split keys (space group, crystal system,
element holdouts) but needs every pymatgen Structure in one DataFrame and writes its splits as
files; here groups come from the cached graphs (structures are streamed, never all held) and
classification needs StratifiedGroupKFold, so scikit-learn is used directly.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np
import torch

from matxfer.config import DataConfig, SplitConfig
from matxfer.errors import UserError


@dataclass
class FoldSplit:
    """Ids of one outer fold: train and validation (carved from the training part) and test."""

    task: str
    fold: int
    train: list[str]
    val: list[str]
    test: list[str]


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z]


def composition_keys(n_atoms: torch.Tensor, species: torch.Tensor,
                     z_table: Sequence[int]) -> list[str]:
    """Reduced formula of each structure, elements by symbol, e.g. 'Mo1S2' for Mo2S4
    (n_atoms [N] int; species [sum atoms] indices into z_table)."""
    keys = []
    for span in torch.split(species, n_atoms.tolist()):
        zs, counts = np.unique(np.asarray(z_table)[span.numpy()], return_counts=True)
        div = reduce(math.gcd, counts.tolist())
        parts = sorted((_symbol(int(z)), c // div) for z, c in zip(zs, counts))
        keys.append("".join(f"{el}{n}" for el, n in parts))
    return keys


def chemsys_keys(n_atoms: torch.Tensor, species: torch.Tensor,
                 z_table: Sequence[int]) -> list[str]:
    """Chemical system of each structure, e.g. 'Mo-S' (elements sorted by symbol)."""
    return ["-".join(sorted({_symbol(int(z)) for z in np.asarray(z_table)[span.numpy()]}))
            for span in torch.split(species, n_atoms.tolist())]


def outer_folds(targets: np.ndarray, groups: Sequence | None, split: SplitConfig,
                classification: bool) -> np.ndarray:
    """[N] fold index (0..k-1) of each row. `groups`: composition/chemsys keys for the group
    methods, the user's fold labels for 'column', None for kfold."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    n, k = len(targets), split.k
    if split.method == "column":
        folds = _label_folds(groups, k)
        if classification:
            check_fold_classes(targets, folds, k)
        return folds
    if n < 2 * k:
        raise UserError(f"{n} rows cannot make {k} folds (need at least {2 * k}); lower split.k")
    if classification and len(np.unique(targets)) < 2:
        raise UserError("classification needs both classes; every row has the same label")
    labels = targets.astype(int) if classification else None
    if split.method == "kfold":
        cv = (StratifiedKFold(k, shuffle=True, random_state=split.seed) if classification
              else KFold(k, shuffle=True, random_state=split.seed))
    else:
        if len(set(groups)) < k:
            raise UserError(f"split.method {split.method!r}: only {len(set(groups))} distinct "
                            f"groups, fewer than split.k={k}")
        cv = (StratifiedGroupKFold(k, shuffle=True, random_state=split.seed) if classification
              else GroupKFold(k, shuffle=True, random_state=split.seed))
    folds = np.empty(n, dtype=np.int64)
    for fold, (_, test) in enumerate(cv.split(np.zeros(n), labels, groups)):
        folds[test] = fold
    if classification:
        check_fold_classes(targets, folds, k)
    return folds


def check_fold_classes(targets: np.ndarray, folds: np.ndarray, k: int) -> None:
    """Every test fold must hold both classes (else its ROC-AUC is undefined): UserError
    with the class counts of every fold."""
    ones = np.bincount(folds[targets == 1], minlength=k)
    zeros = np.bincount(folds[targets != 1], minlength=k)
    short = [(f, c) for f in range(k) for c, n in ((1, ones[f]), (0, zeros[f])) if n == 0]
    if short:
        fold, label = short[0]
        counts = ", ".join(f"{a}/{b}" for a, b in zip(ones, zeros))
        raise UserError(f"classification: class counts per test fold (class 1/class 0): "
                        f"{counts}; fold {fold} has 0 of class {label}, so its ROC-AUC is "
                        f"undefined: lower split.k (class 1 has {int(ones.sum())} rows, class "
                        f"0 {int(zeros.sum())}) or add rows of the rarer class")


def _label_folds(labels: Sequence, k: int) -> np.ndarray:
    """The user's fold labels as 0..k-1 (sorted label order); there must be exactly k."""
    values = sorted({str(v) for v in labels})
    if len(values) != k:
        raise UserError(f"split.method 'column' found {len(values)} fold labels "
                        f"({', '.join(values[:10])}); split.k is {k}")
    index = {v: i for i, v in enumerate(values)}
    return np.array([index[str(v)] for v in labels], dtype=np.int64)


def validation_pick(train: list[str], targets: np.ndarray, groups: Sequence | None,
                    fraction: float, seed: int, classification: bool) -> list[str]:
    """About `fraction` of `train` for validation: whole groups when grouped, stratified by
    class for classification, else a seeded random pick. Never empty, never all of train."""
    rng = np.random.default_rng(seed)
    n_val = min(max(1, round(fraction * len(train))), len(train) - 1)
    if groups is not None:
        return _group_pick(train, groups, n_val, rng)
    if classification:
        val: list[str] = []
        for label in np.unique(targets):
            members = [i for i, y in zip(train, targets) if y == label]
            share = max(1, round(n_val * len(members) / len(train)))
            val += [members[j] for j in rng.permutation(len(members))[:share]]
        return val
    return [train[i] for i in rng.permutation(len(train))[:n_val]]


def _check_part_classes(fold: int, parts: dict[str, np.ndarray]) -> None:
    """Training and validation must each hold both classes (validation's ROC-AUC picks the
    trial): UserError with the counts otherwise."""
    for name, y in parts.items():
        ones = int((y == 1).sum())
        if ones in (0, len(y)):
            raise UserError(f"classification: fold {fold}'s {name} part keeps {ones} of class 1 "
                            f"and {len(y) - ones} of class 0 after the validation split; each "
                            "part needs both classes: lower split.k, raise data.val_fraction or "
                            "add rows of the rarer class")


def _group_pick(train: list[str], groups: Sequence, n_val: int,
                rng: np.random.Generator) -> list[str]:
    """Whole groups in a seeded order until validation holds `n_val` rows, skipping a group
    that would take it past twice `n_val` (or all of train): never a group cut in two."""
    sizes = Counter(groups)
    names, limit = sorted(sizes), min(2 * n_val, len(train) - 1)
    picked, total = set(), 0
    for g in (names[i] for i in rng.permutation(len(names))):
        if total >= n_val:
            break
        if total + sizes[g] <= limit:
            picked.add(g)
            total += sizes[g]
    if not picked:
        raise UserError(f"the validation split takes whole groups of at most {limit} rows "
                        f"(twice data.val_fraction of the training part's {len(train)}), but "
                        f"its {len(names)} group(s) have {min(sizes.values())} rows or more: "
                        "raise data.val_fraction, lower split.k, or split by a finer group")
    return [i for i, g in zip(train, groups) if g in picked]


def custom_fold_split(ids: list[str], targets: np.ndarray, groups: Sequence | None,
                      data: DataConfig) -> FoldSplit:
    """Outer fold `data.fold` of a user dataset with its inner validation split."""
    split, spec = data.outer_split, data.spec
    classification = spec.kind == "classification"
    folds = outer_folds(targets, groups, split, classification)
    test = [i for i, f in zip(ids, folds) if f == data.fold]
    rows = [r for r, f in enumerate(folds) if f != data.fold]
    train = [ids[r] for r in rows]
    inner_groups = ([groups[r] for r in rows]
                    if split.method.startswith("group") else None)
    val = set(validation_pick(train, targets[rows], inner_groups, data.val_fraction,
                              data.val_seed, classification))
    kept = [r for r in rows if ids[r] not in val]
    if classification:
        picked = [r for r in rows if ids[r] in val]
        _check_part_classes(data.fold, {"training": targets[kept], "validation":
                                        targets[picked]})
    return FoldSplit(spec.name, data.fold, [ids[r] for r in kept], sorted(val), test)
