"""Every format reads to the same rows; bad rows are refused with their reason (or skipped
when allowed); non-periodic structures stay non-periodic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.io import write
from own_data import crystals, molecule, source

from matxfer.config import DataConfig, SourceConfig
from matxfer.datasets.loading import load_rows, row_problems, source_id
from matxfer.datasets.sources import load_source, source_format
from matxfer.errors import UserError
from matxfer.graphs import GraphSpec, build_graph_set, structure_arrays

FORMATS = ["extxyz", "ase-db", "csv", "parquet", "dataframe-json"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_ids_targets_and_atoms(fmt, dataset_files):
    ids = {"id_key": "name"} if fmt == "ase-db" else {}
    src = SourceConfig.model_validate(source(dataset_files[fmt], **ids))
    assert source_format(src) == fmt
    frame = load_source(src).frame
    truth = crystals()
    assert list(frame.index) == [a.info["id"] for a in truth]
    assert np.allclose(frame["target"], [a.info["y"] for a in truth])
    for got, want in zip(frame["structure"], truth):
        numbers, positions, cell, pbc = structure_arrays(got)
        assert sorted(numbers) == sorted(want.numbers) and pbc == (True,) * 3
        assert np.allclose(abs(np.linalg.det(cell)), want.get_volume(), rtol=1e-5)


def test_ids_default_to_row_numbers_stable_across_reads(dataset_files):
    src = SourceConfig(path=str(dataset_files["extxyz"]), target="y")
    first, again = load_source(src).frame.index, load_source(src).frame.index
    assert list(first) == list(again) and first[0] == "row-000001" and first[-1] == "row-000024"


def test_the_data_hash_follows_content_and_target_not_the_path(dataset_files, tmp_path):
    data = DataConfig(task="salts", source=source(dataset_files["extxyz"]))
    copy = tmp_path / "copy.extxyz"
    copy.write_bytes(dataset_files["extxyz"].read_bytes())
    moved = DataConfig(task="salts", source=source(copy))
    other_target = DataConfig(task="salts", source=source(copy, target="metal"))
    assert source_id(data) == source_id(moved) != source_id(other_target)


def test_a_molecule_keeps_no_periodic_images(tmp_path):
    path = tmp_path / "mixed.extxyz"
    write(path, [crystals()[0], molecule()], format="extxyz")
    frame = load_rows(DataConfig(task="mixed", source=source(path))).frame
    graphs = build_graph_set(list(frame.index), list(frame["structure"]),
                             frame["target"].to_numpy(),
                             GraphSpec((1, 8, 11, 17), 5.0, torch.float64), progress=False)
    water = graphs.index["water"]
    edges = slice(int(graphs.edge_start[water]), int(graphs.edge_start[water + 1]))
    assert int(graphs.n_edges[water]) == 6  # 3 atoms, every ordered pair, no images
    assert torch.count_nonzero(graphs.shifts[edges]) == 0
    salt = graphs.index["NaCl-0"]
    assert int(graphs.n_edges[salt]) > 2  # periodic images of a 2-atom cell


def bad_extxyz(tmp_path, edit) -> str:
    images = crystals()[:6]
    edit(images)
    path = tmp_path / "bad.extxyz"
    write(path, images, format="extxyz")
    return str(path)


BAD_ROWS = {  # how the file is spoiled: the one-line reason
    "missing target": (lambda im: im[2].info.pop("y"), "row NaCl-2: no target 'y'"),
    "nan target": (lambda im: im[2].info.update(y=float("nan")), "row NaCl-2: target nan"),
    "inf target": (lambda im: im[3].info.update(y=float("inf")), "row KCl-0: target inf"),
    "string target": (lambda im: im[1].info.update(y="big"), "target 'big' is not a number"),
    "duplicate ids": (lambda im: im[4].info.update(id="NaCl-0"), "id 'NaCl-0' appears twice"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_row_is_refused_naming_it(case, tmp_path):
    edit, needle = BAD_ROWS[case]
    with pytest.raises(UserError, match=needle.replace("(", r"\(")) as err:
        load_source(SourceConfig.model_validate(source(bad_extxyz(tmp_path, edit))))
    assert "\n" not in str(err.value)


def test_skip_bad_rows_trains_on_the_rest_and_lists_them(tmp_path):
    def spoil(images):
        images[2].info.pop("y")
        images[3].info["y"] = float("nan")

    src = SourceConfig.model_validate(source(bad_extxyz(tmp_path, spoil), skip_bad_rows=True))
    loaded = load_source(src)
    assert len(loaded.frame) == 4
    assert [rid for rid, _ in loaded.skipped] == ["NaCl-2", "KCl-0"]


def test_log_target_and_classification_refuse_rows_by_the_studys_settings():
    # the source reads the rows; the study's own settings refuse them (loading.row_problems)
    def problems(**settings):
        data = DataConfig(task="salts", source=source("x.extxyz", **settings))
        return row_problems(data, ["a", "b", "c"], np.array([-1.0, 0.0, 1.0]))

    assert problems() == {}
    assert problems(log_target=True) == {
        "a": "target -1.0 is <= 0, which log_target cannot take",
        "b": "target 0.0 is <= 0, which log_target cannot take"}
    assert problems(kind="classification") == {"a": "class label -1.0 is not 0/1 or true/false"}


def test_a_missing_csv_structure_file_names_the_row(dataset_files, tmp_path):
    table = dataset_files["csv"].read_text().replace("cifs/KCl-1.cif", "cifs/nowhere.cif")
    path = dataset_files["csv"].parent / "broken.csv"
    path.write_text(table)
    with pytest.raises(UserError, match="row KCl-1: structure file .*nowhere.cif' is missing"):
        load_source(SourceConfig.model_validate(source(path)))


def test_an_empty_file_and_a_missing_column_are_one_line_errors(dataset_files, tmp_path):
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    with pytest.raises(UserError, match="no usable rows"):
        load_source(SourceConfig(path=str(empty), target="y"))
    with pytest.raises(UserError, match="has no column 'gap'; columns: "):
        load_source(SourceConfig.model_validate(source(dataset_files["csv"], target="gap")))


def test_an_element_outside_the_model_is_named_or_skipped():
    images = crystals()[:3]
    with pytest.raises(UserError, match="structure NaCl-0: element Na is not among"):
        build_graph_set(["NaCl-0"], images[:1], np.ones(1), GraphSpec((17,), 5.0, torch.float64),
                        progress=False)
    graphs = build_graph_set(["NaCl-0", "x"], [images[0], molecule()], np.ones(2),
                             GraphSpec((1, 8), 5.0, torch.float64), progress=False,
                             skip_bad=True)
    assert graphs.ids == ["x"] and graphs.skipped[0][0] == "NaCl-0"


def test_the_data_hash_separates_files_content_moved_between_two_files_changes_it(tmp_path):
    from matxfer.config import SourceConfig
    from matxfer.datasets.sources import source_sha256

    hashes = []
    for first, second in ((b"X\nY", b"Z"), (b"X\n", b"YZ")):
        folder = tmp_path / f"case{len(hashes)}"
        folder.mkdir()
        (folder / "a.cif").write_bytes(first)
        (folder / "b.cif").write_bytes(second)
        (folder / "labels.csv").write_text("id,file,y\na,a.cif,1\nb,b.cif,2\n")
        hashes.append(source_sha256(SourceConfig(path=str(folder / "labels.csv"), target="y",
                                                 id_key="id", structure_column="file")))
    assert hashes[0] != hashes[1]
