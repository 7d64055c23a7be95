"""Which rows a study uses follows its own settings, never the history of the graph cache:
the cache holds structures -> graphs; kind, log_target and fold labels are applied after it
is loaded, with the same outcome on a fresh cache and on one another study built."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from ase.io import write
from own_data import crystals, source, write_cifs

from matxfer.config import DataConfig
from matxfer.datasets.loading import fold_split
from matxfer.errors import UserError
from matxfer.graphs import GraphSpec, task_graphs

SPEC = GraphSpec((3, 8, 9, 11, 12, 17, 19, 20, 35), 5.0, torch.float64)


def negative_targets(folder) -> str:
    images = crystals()
    images[1].info["y"] = images[6].info["y"] = -5.0
    path = folder / "salts.extxyz"
    write(path, images, format="extxyz")
    return str(path)


def data(path, cache, **extra) -> DataConfig:
    split = extra.pop("split", {"method": "kfold", "k": 3})
    return DataConfig(task="salts", source=source(path, **extra), split=split,
                      cache_dir=str(cache))


def test_a_log_target_study_keeps_the_rows_of_a_fresh_cache_after_a_plain_one(tmp_path):
    path = negative_targets(tmp_path)
    shared, fresh = tmp_path / "shared", tmp_path / "fresh"
    plain = task_graphs(data(path, shared, skip_bad_rows=True), SPEC, progress=False)
    assert len(plain) == 24 and plain.targets.min() == -5.0
    after = task_graphs(data(path, shared, skip_bad_rows=True, log_target=True), SPEC,
                        progress=False)
    alone = task_graphs(data(path, fresh, skip_bad_rows=True, log_target=True), SPEC,
                        progress=False)
    assert after.ids == alone.ids and len(after) == 22 and after.targets.min() > 0
    assert [rid for rid, _ in after.skipped] == ["NaCl-1", "LiF-0"] == \
        [rid for rid, _ in alone.skipped]
    # and the other way round: the log study's cache serves a plain study all 24 rows
    again = task_graphs(data(path, fresh, skip_bad_rows=True), SPEC, progress=False)
    assert again.ids == plain.ids and not again.skipped
    for fold in range(3):
        cfg = data(path, shared, skip_bad_rows=True, log_target=True)
        fresh_cfg = data(path, fresh, skip_bad_rows=True, log_target=True)
        assert fold_split(cfg.model_copy(update={"fold": fold}), after) == \
            fold_split(fresh_cfg.model_copy(update={"fold": fold}), alone)


def test_a_classification_study_on_a_regression_cache_refuses_labels_not_0_1(tmp_path):
    path = negative_targets(tmp_path)
    task_graphs(data(path, tmp_path / "c"), SPEC, progress=False)  # regression: -5 is fine
    with pytest.raises(UserError, match="row NaCl-0: class label 55.27.* is not 0/1") as err:
        task_graphs(data(path, tmp_path / "c", kind="classification"), SPEC, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="row NaCl-1: target -5.0 is <= 0"):
        task_graphs(data(path, tmp_path / "c", log_target=True), SPEC, progress=False)


def without_label(folder, fmt: str) -> str:
    images = crystals()
    images[4].info["mine"] = None  # KCl-1
    if fmt == "extxyz":
        images[4].info.pop("mine")
        path = folder / "salts.extxyz"
        write(path, images, format="extxyz")
        return str(path)
    rows = write_cifs(folder, images)
    pd.DataFrame(rows).to_csv(folder / "salts.csv", index=False)  # an empty cell
    return str(folder / "salts.csv")


@pytest.mark.parametrize("fmt", ["extxyz", "csv"])
def test_a_row_without_its_fold_label_is_skipped_with_its_reason(fmt, tmp_path):
    cfg = data(without_label(tmp_path, fmt), tmp_path / "c", skip_bad_rows=True,
               split={"method": "column", "column": "mine", "k": 3})
    graphs = task_graphs(cfg, SPEC, progress=False)
    assert "KCl-1" not in graphs.ids and len(graphs) == 23
    assert graphs.skipped == [("KCl-1", "no fold label 'mine'")]
    tests = [fold_split(cfg.model_copy(update={"fold": f}), graphs).test for f in range(3)]
    assert sorted(sum(tests, [])) == sorted(graphs.ids)


@pytest.mark.parametrize("fmt", ["extxyz", "csv"])
def test_a_row_without_its_fold_label_is_refused_naming_it(fmt, tmp_path):
    # 3 labels and the missing one would make k=4 "labels" if a gap counted as a label
    cfg = data(without_label(tmp_path, fmt), tmp_path / "c",
               split={"method": "column", "column": "mine", "k": 4})
    with pytest.raises(UserError, match="row KCl-1: no fold label 'mine'") as err:
        graphs = task_graphs(cfg, SPEC, progress=False)
        fold_split(cfg, graphs)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "c").glob("*.pt"))  # nothing half-written


def test_cached_features_follow_the_studys_rows_not_only_their_count(tmp_path, monkeypatch):
    from matxfer.analysis.mi_analysis import task_features

    images = crystals()
    images[1].info["y"] = images[6].info["y"] = -5.0  # a log_target study drops these two
    images[10].info.pop("mine")  # a column study drops these two: 22 rows either way
    images[20].info.pop("mine")
    path = tmp_path / "salts.extxyz"
    write(path, images, format="extxyz")
    log = DataConfig(task="salts", source=source(path, log_target=True, skip_bad_rows=True))
    labelled = DataConfig(task="salts", source=source(path, skip_bad_rows=True),
                          split={"method": "column", "column": "mine", "k": 3})

    def features(data, cache):
        monkeypatch.setenv("MATXFER_CACHE", str(tmp_path / cache))
        return task_features(data, "pretrained", progress=False, batch_size=32)

    features(log, "shared")
    after, y_after = features(labelled, "shared")
    alone, y_alone = features(labelled, "fresh")
    assert len(y_after) == 22 and list(y_after) == list(y_alone)
    assert all(np.allclose(after[k], alone[k]) for k in alone)
