"""Pooled per-layer features of a (pretrained, random or fine-tuned) model: forward only, batched,
cached on disk next to the graph cache."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from matxfer.graphs import GraphSet, default_cache_dir, iterate_batches
from matxfer.model import PropertyModel, block_names, pool

FEATURE_FORMAT = 1


def layer_names(model: PropertyModel) -> list[str]:
    """The backbone's blocks (model.block_names): the features after each one."""
    return block_names(model.backbone)


@torch.no_grad()
def pooled_features(model: PropertyModel, graphs: GraphSet, rows: Sequence[int] | None = None,
                    batch_size: int = 64, progress: bool = False) -> dict[str, np.ndarray]:
    """{layer: [n, d_l] float64} pooled invariant features of `rows` (default: all), in order."""
    model.eval()
    rows = list(range(len(graphs))) if rows is None else list(rows)
    names, chunks = layer_names(model), []
    batches = iterate_batches(graphs, rows, batch_size)
    total = (len(rows) + batch_size - 1) // batch_size
    for batch in tqdm(batches, total=total, disable=not progress, desc="features", leave=False):
        n_graphs = batch["ptr"].numel() - 1
        embedding = model.embedding_features(batch)
        layers = [pool(embedding, batch["batch"], n_graphs, model.pooling)]
        layers += model.pooled_layer_features(batch)
        chunks.append([x.double().numpy() for x in layers])
    return {name: np.concatenate([c[i] for c in chunks]) for i, name in enumerate(names)}


def features_key(graph_key: str, model_sha: str, init: str, init_seed: int, pooling: str) -> str:
    spec = {"graphs": graph_key, "model": model_sha, "init": init, "seed": init_seed,
            "pooling": pooling, "format": FEATURE_FORMAT}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def feature_cache_path(name: str, key: str) -> Path:
    """Features live in a `features/` folder of the graph cache ($MATXFER_CACHE)."""
    return default_cache_dir() / "features" / f"{name}-{key}.npz"


def save_features(features: dict[str, np.ndarray], path: Path) -> None:
    """Atomic: a killed writer leaves no partial file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **features)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_features(path: Path) -> dict[str, np.ndarray] | None:
    """The cached features, or None when missing or unreadable (then they are recomputed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except Exception:
        path.unlink(missing_ok=True)
        return None
