import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import KFold

from matxfer.datasets.matbench import fold_split, load_task, official_fold
from matxfer.errors import UserError
from matxfer.tasks import TASKS

OFFLINE = ["matbench_jdft2d", "matbench_phonons", "matbench_dielectric"]


def test_registry_agrees_with_matbench_metadata():
    from matbench.metadata import mbv01_metadata

    structure_tasks = {k for k, v in mbv01_metadata.items() if v.input_type == "structure"}
    assert set(TASKS) == structure_tasks
    for name, spec in TASKS.items():
        meta = mbv01_metadata[name]
        assert spec.target == meta.target
        assert spec.size == meta.n_samples
        assert spec.kind == meta.task_type


@pytest.mark.parametrize("task", OFFLINE)
def test_official_folds_equal_matbenchs_kfold_recipe_on_our_rows(task):
    """The folds we read (matbench's validation file) equal matbench's own recipe, computed
    here independently of that file: KFold, 5 splits, shuffle, seed 18012019, over the ids of
    the rows we load (so row order and ids are checked too)."""
    df = load_task(task)
    assert len(df) == TASKS[task].size
    ids = np.asarray(df.index)
    kfold = KFold(n_splits=5, shuffle=True, random_state=18012019).split(ids)
    for fold, (train_pos, test_pos) in enumerate(kfold):
        train, test = official_fold(task, fold)
        assert train == list(ids[train_pos]) and test == list(ids[test_pos])


def test_jdft2d_rows_hold_the_published_values():
    df = load_task("matbench_jdft2d")
    # rows 001 and 636 of the official data frame (see shared/data/matbench/SOURCES.md)
    assert df.loc["mb-jdft2d-001", "target"] == pytest.approx(63.593833, abs=1e-5)
    assert df.loc["mb-jdft2d-636", "target"] == pytest.approx(63.564333, abs=1e-5)
    assert df.loc["mb-jdft2d-001", "structure"].composition.reduced_formula is not None


def test_validation_split_is_carved_from_the_training_fold():
    df = load_task("matbench_jdft2d")
    split = fold_split(df, "matbench_jdft2d", 2, val_fraction=0.1, val_seed=3)
    train, test = official_fold("matbench_jdft2d", 2)
    assert set(split.train) | set(split.val) == set(train)
    assert not set(split.train) & set(split.val)
    assert split.test == test
    assert len(split.val) == round(0.1 * len(train))
    again = fold_split(df, "matbench_jdft2d", 2, val_fraction=0.1, val_seed=3)
    assert again.val == split.val
    other = fold_split(df, "matbench_jdft2d", 2, val_fraction=0.1, val_seed=4)
    assert other.val != split.val


def test_max_structures_keeps_a_deterministic_subset_of_each_part():
    df = load_task("matbench_jdft2d")
    a = fold_split(df, "matbench_jdft2d", 0, max_structures=64)
    b = fold_split(df, "matbench_jdft2d", 0, max_structures=64)
    assert a == b
    assert len(a.train) + len(a.val) + len(a.test) == 64
    train, test = official_fold("matbench_jdft2d", 0)
    assert set(a.test) <= set(test) and set(a.train) <= set(train)


def test_an_empty_subset_is_a_user_error():
    df = load_task("matbench_jdft2d")
    with pytest.raises(UserError, match="max_structures=2 leaves the .* split"):
        fold_split(df, "matbench_jdft2d", 0, max_structures=2)


def test_classification_validation_split_is_stratified(monkeypatch):
    ids = [f"mb-mp-is-metal-{i:06d}" for i in range(1, 101)]
    labels = pd.DataFrame({"target": [1.0] * 20 + [0.0] * 80}, index=ids)
    monkeypatch.setattr("matxfer.datasets.matbench.official_fold", lambda task, fold: (ids, ["x"]))
    split = fold_split(labels, "matbench_mp_is_metal", 0, val_fraction=0.2)
    val_labels = labels.loc[split.val, "target"]
    assert len(split.val) == 20
    assert (val_labels == 1.0).sum() == 4  # 20% of the 20 metals


@pytest.mark.parametrize("fold", [-1, 5])
def test_fold_out_of_range(fold):
    with pytest.raises(UserError, match="allowed: 0-4"):
        official_fold("matbench_jdft2d", fold)
