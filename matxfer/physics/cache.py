"""Descriptors of every structure of a dataset, computed once and cached like the graphs.

One file per group of descriptors (what one computation gives: Γ phonons, the DOS, the
exfoliation energy, ...), keyed by the data (through the graph cache's name, which hashes it),
the foundation weights (SHA-256) and the settings that change that group's values: a change of
any of them computes that group afresh, and studies asking for other subsets of the same
groups share the files.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from matxfer.checkpoint import foundation_record
from matxfer.config import DataConfig, ModelConfig, derive
from matxfer.datasets.loading import stream_rows
from matxfer.errors import UserError
from matxfer.model import load_backbone
from matxfer.physics.config import DESCRIPTORS, PhysicsConfig
from matxfer.physics.descriptors import describe
from matxfer.physics.potential import Frame, Potential, frame_of
from matxfer.physics.relax import relaxed
from matxfer.storage import load_checked, save_checked

FORMAT = 2  # 2: one file per group of descriptors (1: one file per descriptor list)
# the settings that change each group's values (mode, calibration, batch size do not)
_COMMON_KEYS = ("relax", "precision")
_GROUP_KEYS = {
    "energy": (),
    "phonons": ("displacement", "symmetry", "max_atoms", "supercell"),
    "phdos": ("displacement", "max_atoms", "dos_supercell", "dos_mesh", "dos_sigma"),
    "eos": ("eos_strain",),
    "elastic": ("strain",),
    "exfoliation": ("dispersion",),
}


def group_names(group: str) -> list[str]:
    """Every descriptor a group computes, in catalogue order: a group's cache holds them all,
    so any subset a study or trial asks for reads the same file."""
    return [name for name, d in DESCRIPTORS.items() if d.group == group]


def cache_key(weights: str, physics: PhysicsConfig, group: str) -> str:
    """16 hex digits naming the (weights, group, settings that change its values)."""
    settings = {k: getattr(physics, k) for k in (*_COMMON_KEYS, *_GROUP_KEYS[group])}
    spec = {"weights": weights, "group": group, "settings": settings, "format": FORMAT}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def descriptor_file(graph_file: Path, model: ModelConfig, physics: PhysicsConfig, group: str
                    ) -> Path:
    """Beside the dataset's graph cache, whose name already hashes the data: a study's trials
    find it from the graph cache their driver verified, without reading the data again."""
    weights = foundation_record(ModelConfig(source=model.source))["sha256"]
    graph_file = Path(graph_file)
    key = cache_key(weights, physics, group)
    return graph_file.with_name(f"{graph_file.stem}-physics-{group}-{key}.pt")


def potential_of(model: ModelConfig, physics: PhysicsConfig) -> Potential:
    """The pretrained foundation model (whatever model.init says: descriptors always come
    from the pretrained potential) as a batched calculator."""
    dtype = getattr(torch, physics.precision)
    return Potential(load_backbone(model.source, "pretrained", dtype=dtype),
                     physics.batch_atoms, dtype)


def compute(frames: list[Frame], potential: Potential, physics: PhysicsConfig,
            progress: bool = True, log: Callable[[str], None] | None = None) -> np.ndarray:
    """Descriptors [N, d] of the frames (relaxed first when physics.relax says so), with a
    progress bar; the count of NaN per descriptor goes to `log`."""
    started = time.perf_counter()
    reasons: Counter[str] = Counter()
    with tqdm(total=len(frames), unit="struct", desc="physics descriptors",
              disable=not progress) as bar:
        if physics.relax != "none":
            frames = [relaxed(f, potential, physics) for f in frames]
        values = describe(frames, potential, physics, bar.update, reasons)
    if log:
        failed = {name: int(np.isnan(values[:, j]).sum())
                  for j, name in enumerate(physics.descriptors)}
        note = ", ".join(f"{n} NaN in {k}" for k, n in failed.items() if n) or "no NaN"
        if reasons:
            note += " (" + ", ".join(f"{why}: {n}" for why, n in reasons.most_common()) + ")"
        log(f"physics descriptors: {len(frames)} structures in "
            f"{time.perf_counter() - started:.1f} s; {note}")
    return values


def descriptor_table(data: DataConfig, model: ModelConfig, physics: PhysicsConfig,
                     graph_file: Path, progress: bool = True) -> dict[str, np.ndarray]:
    """{id: descriptors [d], in physics.descriptors' order} of every usable row. Each group of
    descriptors comes from its cache file (beside `graph_file`, the dataset's graph cache) or
    is computed, with the other missing groups in one pass, and cached."""
    tables, missing = {}, []
    for group in physics.groups():
        path = descriptor_file(graph_file, model, physics, group)
        table = _load_group(path) if path.is_file() else None
        if table is None:
            missing.append(group)
        else:
            tables[group] = table
    if missing:
        tables.update(_compute_groups(data, model, physics, graph_file, missing, progress))
    ids = tables[physics.groups()[0]][0]
    columns = {}  # name -> {id: value}: groups computed apart are joined by id, not position
    for group_ids, names, values in tables.values():
        columns.update({name: dict(zip(group_ids, values[:, j])) for j, name in enumerate(names)})
    return {i: np.array([columns[name].get(i, np.nan) for name in physics.descriptors])
            for i in ids}


def _load_group(path: Path) -> tuple[list[str], list[str], np.ndarray] | None:
    try:
        payload = load_checked(path)
        return payload["ids"], payload["names"], payload["values"].numpy()
    except Exception as err:  # a damaged cache is computed again
        print(f"physics descriptors: recomputing {path.name} ({err})", file=sys.stderr)
        return None


def _compute_groups(data: DataConfig, model: ModelConfig, physics: PhysicsConfig,
                    graph_file: Path, groups: list[str], progress: bool
                    ) -> dict[str, tuple[list[str], list[str], np.ndarray]]:
    """Every descriptor of `groups` for every usable row, in one pass, each group saved."""
    names = [name for group in groups for name in group_names(group)]
    everything = derive(physics, {"descriptors": names, "mode": "off"})
    ids, frames = [], []
    for row_id, structure, _ in stream_rows(data, []):
        ids.append(str(row_id))
        frames.append(frame_of(structure))
    values = compute(frames, potential_of(model, everything), everything, progress,
                     log=lambda line: print(line, file=sys.stderr))
    out, at = {}, 0
    for group in groups:
        width = len(group_names(group))
        part = values[:, at:at + width]
        at += width
        save_group(descriptor_file(graph_file, model, physics, group), ids, group, part)
        out[group] = (ids, group_names(group), part)
    return out


def save_group(path: Path, ids: list[str], group: str, values: np.ndarray) -> None:
    """One group's cache file: ids [N], values [N, every descriptor of the group]."""
    try:
        save_checked({"ids": ids, "values": torch.from_numpy(np.ascontiguousarray(values)),
                      "names": group_names(group), "group": group, "format": FORMAT}, path)
    except OSError as err:
        raise UserError(f"cannot write the descriptor cache in {str(path.parent)!r}: "
                        f"{err.strerror}") from None


def aligned(table: dict[str, np.ndarray], ids: list[str], width: int) -> np.ndarray:
    """[len(ids), width] descriptors in the order of `ids`; NaN for ids not in the table."""
    missing = np.full(width, np.nan)
    return np.stack([table.get(str(i), missing) for i in ids]) if ids else np.zeros((0, width))
