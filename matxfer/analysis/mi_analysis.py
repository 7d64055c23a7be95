"""`matxfer analyze mi`: layer-wise TransRate of pretrained and random-twin features per task."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pandas as pd

from matxfer.analysis.features import (
    feature_cache_path,
    features_key,
    load_features,
    pooled_features,
    save_features,
)
from matxfer.analysis.figures import mi_heatmap
from matxfer.analysis.mutual_info import EPS2, layer_transrate
from matxfer.config import DataConfig, ModelConfig
from matxfer.datasets.loading import source_id
from matxfer.datasets.matbench import subset_ids
from matxfer.errors import UserError
from matxfer.graphs import cache_key, task_graphs
from matxfer.model import build_model, weights_file

INITS = ("pretrained", "random")


def task_features(data: DataConfig, init: str, source: str = "small", pooling: str = "mean",
                  max_structures: int | None = None, batch_size: int = 64,
                  progress: bool = True
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({layer: [n, d]}, targets [n]) for every structure of the dataset (or a seeded
    subset); with your own data, before any training: how much the features already say."""
    from matxfer.tracking import file_sha256

    model = build_model(ModelConfig(source=source, init=init, pooling=pooling))
    spec = model.graph_spec()
    graphs = task_graphs(data, spec, progress=progress)
    keep = subset_ids(list(graphs.ids), max_structures)
    rows = [i for i, mbid in enumerate(graphs.ids) if keep is None or mbid in keep]
    task = data.task
    used = hashlib.sha256("\n".join(graphs.ids[r] for r in rows).encode()).hexdigest()[:16]
    graph_key = cache_key(task, spec, f"{source_id(data)}|rows={used}")  # the study's rows
    key = features_key(graph_key, file_sha256(str(weights_file(source))), init,
                       0, pooling)
    path = feature_cache_path(f"{task}-{init}-{len(rows)}", key)
    features = load_features(path)
    if features is None:
        features = pooled_features(model, graphs, rows, batch_size, progress)
        save_features(features, path)
    return features, np.asarray(graphs.targets)[rows]


def analyze_mi(datas: list[DataConfig], source: str = "small", pooling: str = "mean",
               bins: int = 10, eps2: float = EPS2, max_structures: int | None = None,
               batch_size: int = 64, inits: tuple[str, ...] = INITS, progress: bool = True) -> dict:
    """TransRate rows for every (task, init, layer), the settings, and the heatmap PNG."""
    if bins < 2:
        raise UserError(f"--bins must be at least 2, got {bins}")
    rows, seconds = [], {}
    for data in datas:
        spec = data.spec
        for init in inits:
            start = time.perf_counter()
            features, y = task_features(data, init, source, pooling, max_structures,
                                        batch_size, progress=progress)
            for row in layer_transrate(features, y, spec.kind, bins, eps2):
                rows.append({"task": spec.name, "init": init, **row})
            took = seconds[f"{spec.name}/{init}"] = round(time.perf_counter() - start, 2)
            if progress:
                print(f"{spec.name} {init}: {len(y)} structures, {took} s")
    table = pd.DataFrame(rows)
    settings = {"tasks": [d.task for d in datas], "model": source, "pooling": pooling, "bins": bins,
                "eps2": eps2, "max_structures": max_structures,
                "preprocessing": "rows L2-normalised, centred, L2-normalised again",
                "class_weights": "n_c/n", "seconds": seconds}
    return {"settings": settings, "table": table, "heatmap": mi_heatmap(table)}
