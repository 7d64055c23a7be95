"""Matbench v0.1 structure tasks: registry, loading, official folds, inner validation split."""

from __future__ import annotations

import hashlib
import json
import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from matxfer.datasets.splits import FoldSplit
from matxfer.errors import UserError
from matxfer.tasks import get_task

N_FOLDS = 5
SHARED_DATA = Path("shared") / "data" / "matbench"


def default_data_dir() -> Path | None:
    """MATMINER_DATA if set, else ../shared/data/matbench beside this checkout or the cwd."""
    if os.environ.get("MATMINER_DATA"):
        return Path(os.environ["MATMINER_DATA"])
    repo_root = Path(__file__).resolve().parents[2]
    for base in (Path.cwd(), repo_root):
        for candidate in (base.parent / SHARED_DATA, base / SHARED_DATA):
            if candidate.is_dir():
                return candidate
    return None


def matbench_ids(task: str, n_rows: int) -> list[str]:
    """The ids matbench assigns to a task's rows (same formula as matbench.data_ops.load)."""
    n_zeros = math.floor(math.log(n_rows, 10)) + 1
    prefix = task.replace("matbench", "mb").replace("_", "-")
    return [f"{prefix}-{i + 1:0{n_zeros}d}" for i in range(n_rows)]


def local_data_file(task: str, data_dir: str | None = None) -> Path | None:
    folder = Path(data_dir) if data_dir else default_data_dir()
    path = folder / f"{task}.json.gz" if folder else None
    return path if path is not None and path.is_file() else None


def data_source_id(task: str, data_dir: str | None = None) -> str:
    """Content hash of the local data file ('matminer' when it will be downloaded)."""
    path = local_data_file(task, data_dir)
    if path is None:
        return "matminer"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@lru_cache(maxsize=4)
def load_task(task: str, data_dir: str | None = None) -> pd.DataFrame:
    """Load a task as a DataFrame indexed by matbench id with columns `structure`, `target`.

    A local `<data_dir>/<task>.json.gz` is read with matminer's reader; without one, matminer
    downloads the official file (hash-checked) into its data home.
    """
    spec = get_task(task)
    folder = Path(data_dir) if data_dir else default_data_dir()
    local = folder / f"{task}.json.gz" if folder else None
    if data_dir and not (local and local.is_file()):
        raise UserError(f"data file {str(local)!r} does not exist (data_dir={data_dir!r})")
    if local is not None and local.is_file():
        from matminer.utils.io import load_dataframe_from_json

        df = load_dataframe_from_json(str(local), pbar=False)
    else:
        from matminer.datasets import load_dataset

        df = load_dataset(task, data_home=str(folder) if folder else None, pbar=False)
    if len(df) != spec.size:
        raise UserError(f"{task}: data file has {len(df)} rows, matbench v0.1 has {spec.size}")
    df = df.reset_index(drop=True)
    out = pd.DataFrame(
        {"structure": df["structure"].values, "target": df[spec.target].values},
        index=pd.Index(matbench_ids(task, len(df)), name="mbid"),
    )
    if spec.kind == "classification":
        out["target"] = out["target"].astype(float)
    return out


@lru_cache(maxsize=1)
def _validation_splits() -> dict:
    """matbench's fold file, read from its package folder without importing matbench (whose
    __init__ imports matminer and pymatgen: ~1 s, and not needed once graphs are cached)."""
    from importlib.util import find_spec

    spec = find_spec("matbench")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("matbench is not installed: pip install --no-deps matbench==0.6")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return json.loads((folder / "matbench_v0.1_validation.json").read_text())


def official_fold(task: str, fold: int) -> tuple[list[str], list[str]]:
    """(train ids, test ids) of an official Matbench v0.1 fold, in matbench's order."""
    get_task(task)
    if fold not in range(N_FOLDS):
        raise UserError(f"fold {fold!r} is out of range; allowed: 0-{N_FOLDS - 1}")
    split = _validation_splits()["splits"][task][f"fold_{fold}"]
    return list(split["train"]), list(split["test"])


def subset_ids(ids: list[str], max_structures: int | None, seed: int = 0) -> set[str] | None:
    """A deterministic random subset of `max_structures` ids (None keeps all)."""
    if max_structures is None or max_structures >= len(ids):
        return None
    order = np.random.default_rng(seed).permutation(len(ids))[:max_structures]
    return {ids[i] for i in order}


def fold_split(
    df: pd.DataFrame,
    task: str,
    fold: int,
    val_fraction: float = 0.1,
    val_seed: int = 0,
    max_structures: int | None = None,
) -> FoldSplit:
    """Official fold of `task` with a seeded validation split carved from its training part.

    Classification tasks stratify the validation split by label. With `max_structures`, the
    fold is restricted to a deterministic subset of the task.
    """
    train, test = official_fold(task, fold)
    keep = subset_ids(list(df.index), max_structures)
    if keep is not None:
        train = [i for i in train if i in keep]
        test = [i for i in test if i in keep]
    rng = np.random.default_rng(val_seed)
    n_val = max(1, round(val_fraction * len(train))) if train else 0
    if get_task(task).kind == "classification" and train:
        val = _stratified_pick(train, df.loc[train, "target"].to_numpy(), n_val, rng)
    else:
        val = [train[i] for i in rng.permutation(len(train))[:n_val]]
    val_set = set(val)
    split = FoldSplit(task, fold, [i for i in train if i not in val_set], sorted(val), test)
    for part in ("train", "val", "test"):
        if not getattr(split, part):
            raise UserError(
                f"max_structures={max_structures} leaves the {part} split of {task} fold {fold} "
                f"empty; use more structures (at least ~{math.ceil(3 / val_fraction)})"
            )
    return split


def _stratified_pick(ids: list[str], labels: np.ndarray, n: int, rng) -> list[str]:
    picked: list[str] = []
    for label in np.unique(labels):
        members = [i for i, y in zip(ids, labels) if y == label]
        share = max(1, round(n * len(members) / len(ids)))
        picked += [members[j] for j in rng.permutation(len(members))[:share]]
    return picked
