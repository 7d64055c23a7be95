"""Outer folds and inner validation splits of a user dataset: disjoint, covering, seeded;
grouped splits keep a formula (or chemical system) on one side, outer and inner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from own_data import crystals, source

from matxfer.config import DataConfig, SplitConfig
from matxfer.datasets.loading import fold_split
from matxfer.datasets.splits import (
    chemsys_keys,
    composition_keys,
    custom_fold_split,
    outer_folds,
    validation_pick,
)
from matxfer.errors import UserError
from matxfer.graphs import GraphSpec, build_graph_set

Z = [3, 8, 9, 11, 12, 17, 19, 20, 35]


@pytest.fixture(scope="module")
def graphs():
    images = crystals()
    return build_graph_set([a.info["id"] for a in images], images,
                           np.array([a.info["y"] for a in images]),
                           GraphSpec(tuple(Z), 5.0, torch.float64), progress=False)


def test_composition_and_chemsys_keys_by_hand():
    # Mo2S4 and MoS2 share the reduced formula; S-Mo systems sort by symbol
    n_atoms = torch.tensor([6, 3, 2])
    species = torch.tensor([0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1])  # into z_table (Mo, S)
    assert composition_keys(n_atoms, species, [42, 16]) == ["Mo1S2", "Mo1S2", "S1"]
    assert chemsys_keys(n_atoms, species, [42, 16]) == ["Mo-S", "Mo-S", "S"]


def data(path, **split) -> DataConfig:
    return DataConfig(task="salts", source=source(path), split=split or None, val_fraction=0.2)


@pytest.mark.parametrize("method", ["kfold", "group-composition", "group-chemsys", "column"])
def test_folds_are_disjoint_cover_every_row_and_repeat(method, graphs, dataset_files):
    extra = {"column": "mine"} if method == "column" else {}
    cfg = data(dataset_files["extxyz"], method=method, k=3, **extra)
    splits = [fold_split(cfg.model_copy(update={"fold": f}), graphs) for f in range(3)]
    tests = [set(s.test) for s in splits]
    assert set().union(*tests) == set(graphs.ids) and sum(map(len, tests)) == len(graphs)
    for s in splits:
        assert not (set(s.train) & set(s.val)) and not (set(s.train + s.val) & set(s.test))
        assert len(s.train) + len(s.val) + len(s.test) == len(graphs) and s.val
    again = fold_split(cfg.model_copy(update={"fold": 1}), graphs)
    assert again == splits[1]


@pytest.mark.parametrize("method", ["group-composition", "group-chemsys"])
def test_a_group_is_never_on_both_sides_outer_or_inner(method, graphs, dataset_files):
    def formula(i):  # every crystal here is a binary: its reduced formula names its group
        return i.split("-")[0]

    for fold in range(4):
        cfg = data(dataset_files["extxyz"], method=method, k=4).model_copy(
            update={"fold": fold})
        s = fold_split(cfg, graphs)
        sides = [{formula(i) for i in part} for part in (s.train, s.val, s.test)]
        assert not (sides[0] & sides[1]) and not (sides[0] & sides[2])
        assert not (sides[1] & sides[2])


def test_column_folds_are_the_users_labels(graphs, dataset_files):
    cfg = data(dataset_files["extxyz"], method="column", k=3, column="mine")
    labels = {a.info["id"]: a.info["mine"] for a in crystals()}
    for fold in range(3):
        s = fold_split(cfg.model_copy(update={"fold": fold}), graphs)
        assert {labels[i] for i in s.test} == {f"f{fold}"}


def test_classification_folds_are_stratified():
    y = np.array([1.0] * 12 + [0.0] * 6)
    folds = outer_folds(y, None, SplitConfig(k=3), classification=True)
    for f in range(3):
        assert sorted(y[folds == f]) == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]


def test_seed_changes_kfold_but_not_column_folds(graphs, dataset_files):
    a = fold_split(data(dataset_files["extxyz"], k=3, seed=0), graphs)
    b = fold_split(data(dataset_files["extxyz"], k=3, seed=1), graphs)
    assert a.test != b.test


BAD_SPLITS = [  # (targets, groups, split settings, classification): the one-line reason
    (np.arange(5.0), None, {"k": 3}, False, "5 rows cannot make 3 folds"),
    (np.ones(8), None, {"k": 2}, True, "needs both classes"),
    (np.arange(8.0), ["a", "b"] * 4, {"method": "group-chemsys", "k": 3}, False,
     "only 2 distinct groups"),
    (np.arange(8.0), ["x", "y"] * 4, {"method": "column", "column": "c", "k": 3}, False,
     "found 2 fold labels"),
]


@pytest.mark.parametrize("y, groups, settings, classification, needle", BAD_SPLITS)
def test_a_split_that_cannot_be_made_is_one_line(y, groups, settings, classification, needle):
    with pytest.raises(UserError, match=needle):
        outer_folds(y, groups, SplitConfig(**settings), classification)


@pytest.mark.parametrize("tree, needle", [
    ({"split": {"method": "random"}}, "split.method"),
    ({"split": {"k": 11}}, "split.k"),
    ({"split": {"k": 1}}, "split.k"),
    ({"split": {"method": "column"}}, "needs split.column"),
    ({"fold": 3, "split": {"k": 3}}, "data.fold 3 is out of range; allowed: 0-2"),
])
def test_bad_split_settings_are_refused_by_the_config(tree, needle):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=needle):
        DataConfig.model_validate({"task": "salts", "source": {"path": "x", "target": "y"},
                                   **tree})


def test_a_matbench_name_or_a_split_without_source_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not with 'matbench_'"):
        DataConfig(task="matbench_jdft2d", source={"path": "x", "target": "y"})
    with pytest.raises(ValidationError, match="data.split applies to your own data"):
        DataConfig(task="matbench_jdft2d", split={"k": 3})


def test_grouped_validation_takes_the_small_group_not_the_large_one():
    # a training part of two formulas, 91 and 9 rows: 10% validation is the 9, whatever the seed
    train = [f"r{i}" for i in range(100)]
    groups = ["big"] * 91 + ["small"] * 9
    for seed in range(10):
        val = validation_pick(train, np.arange(100.0), groups, 0.1, seed, False)
        assert sorted(val) == sorted(train[91:]), seed


def test_grouped_validation_is_bounded_and_never_splits_a_group():
    rng = np.random.default_rng(0)
    for seed in range(40):
        sizes = rng.integers(1, 12, size=rng.integers(3, 12))
        groups = [f"g{j}" for j, s in enumerate(sizes) for _ in range(s)]
        train = [f"r{i}" for i in range(len(groups))]
        n_val = max(1, round(0.2 * len(train)))
        try:
            val = set(validation_pick(train, np.zeros(len(train)), groups, 0.2, seed, False))
        except UserError:
            continue  # every group too large for a bounded validation split: refused
        assert 0 < len(val) <= min(2 * n_val, len(train) - 1), (sizes, seed)
        for g in set(groups):
            members = {i for i, x in zip(train, groups) if x == g}
            assert members <= val or not (members & val), (sizes, seed, g)


@pytest.mark.parametrize("groups", [["a"] * 20, ["a"] * 10 + ["b"] * 10])
def test_groups_too_large_for_a_validation_split_are_refused_in_one_line(groups):
    train = [f"r{i}" for i in range(len(groups))]
    with pytest.raises(UserError, match="validation split") as err:
        validation_pick(train, np.zeros(len(train)), groups, 0.1, 0, False)
    assert "\n" not in str(err.value)


def test_a_rare_class_missing_from_a_test_fold_is_refused_with_the_counts():
    y = np.array([1.0] * 3 + [0.0] * 27)
    with pytest.raises(UserError, match=r"class counts .*\b0 of class 1") as err:
        outer_folds(y, None, SplitConfig(k=5), classification=True)
    assert "\n" not in str(err.value)
    assert outer_folds(y, None, SplitConfig(k=3), classification=True).max() == 2


def test_a_training_part_left_with_one_class_by_its_validation_split_is_refused():
    y = np.array([1.0] * 2 + [0.0] * 18)
    cfg = DataConfig(task="salts", source={"path": "x", "target": "y", "kind": "classification"},
                     split={"k": 2})
    with pytest.raises(UserError, match="training part keeps 0 of class 1") as err:
        custom_fold_split([f"r{i}" for i in range(20)], y, None, cfg)
    assert "\n" not in str(err.value)


def test_a_grouped_validation_part_with_one_class_only_is_refused():
    # every formula is of one class; 10% validation is one formula: a single class
    y = np.array([float(g % 2) for g in range(20) for _ in range(2)])
    groups = [f"g{g}" for g in range(20) for _ in range(2)]
    cfg = DataConfig(task="salts", source={"path": "x", "target": "y", "kind": "classification"},
                     split={"method": "group-composition", "k": 2})
    with pytest.raises(UserError, match="validation part keeps") as err:
        custom_fold_split([f"r{i}" for i in range(40)], y, groups, cfg)
    assert "\n" not in str(err.value)
