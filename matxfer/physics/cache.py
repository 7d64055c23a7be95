"""Descriptors of every structure of a dataset, computed once and cached like the graphs.

The cache is keyed by the data (through the graph cache's name, which hashes it), the
foundation weights (SHA-256) and the descriptor settings, so a change of any of them computes
afresh and nothing else is reused.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from matxfer.checkpoint import foundation_record
from matxfer.config import DataConfig, ModelConfig
from matxfer.datasets.loading import stream_rows
from matxfer.errors import UserError
from matxfer.model import load_backbone
from matxfer.physics.config import PhysicsConfig
from matxfer.physics.descriptors import describe
from matxfer.physics.potential import Frame, Potential, frame_of
from matxfer.physics.relax import relaxed
from matxfer.storage import load_checked, save_checked

FORMAT = 1
# settings that change the values (mode and batch size do not)
_VALUE_KEYS = ("descriptors", "relax", "displacement", "strain", "eos_strain", "symmetry",
               "max_atoms", "precision")
_ADDED_KEYS = {"supercell": 1}  # settings added later: at their default they leave the key


def cache_key(weights: str, physics: PhysicsConfig) -> str:
    """16 hex digits naming the (weights, settings) of a descriptor table."""
    settings = {k: getattr(physics, k) for k in _VALUE_KEYS}
    settings.update({k: getattr(physics, k) for k, default in _ADDED_KEYS.items()
                     if getattr(physics, k) != default})
    spec = {"weights": weights, "settings": settings, "format": FORMAT}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def descriptor_file(graph_file: Path, model: ModelConfig, physics: PhysicsConfig) -> Path:
    """Beside the dataset's graph cache, whose name already hashes the data: a study's trials
    find it from the graph cache their driver verified, without reading the data again."""
    weights = foundation_record(ModelConfig(source=model.source))["sha256"]
    graph_file = Path(graph_file)
    return graph_file.with_name(f"{graph_file.stem}-physics-{cache_key(weights, physics)}.pt")


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
    with tqdm(total=len(frames), unit="struct", desc="physics descriptors",
              disable=not progress) as bar:
        if physics.relax != "none":
            frames = [relaxed(f, potential, physics) for f in frames]
        values = describe(frames, potential, physics, bar.update)
    if log:
        failed = {name: int(np.isnan(values[:, j]).sum())
                  for j, name in enumerate(physics.descriptors)}
        note = ", ".join(f"{n} NaN in {k}" for k, n in failed.items() if n) or "no NaN"
        log(f"physics descriptors: {len(frames)} structures in "
            f"{time.perf_counter() - started:.1f} s; {note}")
    return values


def descriptor_table(data: DataConfig, model: ModelConfig, physics: PhysicsConfig,
                     graph_file: Path, progress: bool = True) -> dict[str, np.ndarray]:
    """{id: descriptors [d]} of every usable row, from the cache (beside `graph_file`, the
    dataset's graph cache) or computed and cached."""
    path = descriptor_file(graph_file, model, physics)
    if path.is_file():
        try:
            payload = load_checked(path)
            return dict(zip(payload["ids"], payload["values"].numpy()))
        except Exception as err:  # a damaged cache is computed again
            print(f"physics descriptors: recomputing ({err})", file=sys.stderr)
    rows = stream_rows(data, [])
    ids, frames = [], []
    for row_id, structure, _ in rows:
        ids.append(str(row_id))
        frames.append(frame_of(structure))
    values = compute(frames, potential_of(model, physics), physics, progress,
                     log=lambda line: print(line, file=sys.stderr))
    try:
        save_checked({"ids": ids, "values": torch.from_numpy(values),
                      "names": list(physics.descriptors), "format": FORMAT}, path)
    except OSError as err:
        raise UserError(f"cannot write the descriptor cache in {str(path.parent)!r}: "
                        f"{err.strerror}") from None
    return dict(zip(ids, values))


def aligned(table: dict[str, np.ndarray], ids: list[str], width: int) -> np.ndarray:
    """[len(ids), width] descriptors in the order of `ids`; NaN for ids not in the table."""
    missing = np.full(width, np.nan)
    return np.stack([table.get(str(i), missing) for i in ids]) if ids else np.zeros((0, width))
