"""`matxfer data check`: the dataset card names what a user must know before training, and
refuses data that cannot be trained on with one line (exit 2)."""

from __future__ import annotations

import pytest
from ase import Atoms
from ase.io import write
from own_data import crystals, source

from matxfer.cli import main
from matxfer.config import DataConfig, ModelConfig
from matxfer.datasets.card import check_dataset
from matxfer.errors import UserError


def with_alien(folder):
    images = crystals()
    twin = images[0].copy()  # the same crystal under another id and another label
    twin.info = {**images[0].info, "id": "NaCl-twin", "y": images[0].info["y"] + 5.0}
    alien = Atoms("Og2", positions=[[0, 0, 0], [0, 0, 3.0]], cell=[6, 6, 6], pbc=True)
    alien.info = {"id": "alien", "y": 1.0}
    path = folder / "salts.extxyz"
    write(path, [*images, twin, alien], format="extxyz")
    return path


@pytest.fixture(scope="module")
def card_text(tmp_path_factory) -> str:
    path = with_alien(tmp_path_factory.mktemp("card"))
    data = DataConfig(task="salts", source=source(path, unit="Å", skip_bad_rows=True),
                      split={"method": "group-chemsys", "k": 4})
    return check_dataset(data, ModelConfig(head_hidden=[16])).text()


def test_an_element_the_model_lacks_stops_the_check_as_it_stops_tune(tmp_path):
    data = DataConfig(task="salts", source=source(with_alien(tmp_path)),
                      split={"method": "group-chemsys", "k": 4})
    with pytest.raises(UserError, match="structure alien: element Og is not among") as err:
        check_dataset(data, ModelConfig(head_hidden=[16]))
    assert "\n" not in str(err.value)


def test_the_card_counts_rows_elements_atoms_and_targets(card_text):
    assert "rows      25 usable, 1 skipped" in card_text
    assert "elements  9: Li O F Na Mg Cl K Ca Br" in card_text
    assert "atoms     per structure min 2, median 2, max 2" in card_text
    assert "target    min 39.49" in card_text and "Å" in card_text


def test_the_card_names_unknown_elements_and_conflicting_duplicates(card_text):
    assert "skipped (element Og is not among the model's 89 elements): alien" in card_text
    assert "1 groups of duplicate structures: NaCl-0, NaCl-twin" in card_text  # not strains
    assert "duplicate groups with conflicting labels: NaCl-0, NaCl-twin (55.27, 60.27)" \
        in card_text


def test_the_card_gives_fold_sizes_cache_size_and_epoch_time(card_text):
    assert "split     group-chemsys, k=4: test folds of" in card_text
    assert "graph cache about" in card_text and "per training epoch" in card_text


def test_data_that_cannot_train_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    images = crystals()[:3]
    for atoms in images:
        atoms.info["y"] = "n/a"
    write(tmp_path / "bad.extxyz", images, format="extxyz")
    cases = [(["--target", "y"], "row row-000001: target 'n/a' is not a number"),
             ([], "a data file needs --target"),
             (["--target", "y", "--split", "random"], "split.method")]
    for flags, needle in cases:
        assert main(["data", "check", "bad.extxyz", *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.extxyz"]
