"""A study's identity is its content: where the data lies is not part of the fingerprint."""

import json
import shutil
from pathlib import Path

from matxfer.config import load_study_config
from matxfer.datasets.sources import source_sha256
from matxfer.identity import (
    claim_folder,
    fingerprint,
    fold_status,
    folder_conflict,
    identify,
    study_settings,
)

ROOT = Path(__file__).resolve().parents[1]
CSV_CONFIG = ROOT / "tune_configs/examples/custom_csv.yaml"


def own_data(folder: Path) -> Path:
    """A table of labels naming two structure files beside it (the content of the data)."""
    (folder / "cifs").mkdir(parents=True)
    (folder / "cifs/a.cif").write_text("data_a\n_cell_length_a 3.0\n")
    (folder / "cifs/b.cif").write_text("data_b\n_cell_length_a 4.0\n")
    table = folder / "labels.csv"
    table.write_text("id,cif,last_phdos_peak\na,cifs/a.cif,100.0\nb,cifs/b.cif,200.0\n")
    return table


def identity_of(table: Path, tmp_path: Path):
    study = load_study_config(CSV_CONFIG, {"run.data.source.path": str(table),
                                           "output_dir": str(tmp_path / "studies")})
    return identify(study, source_sha256(study.run.data.source), "w" * 64)


def test_moving_the_data_keeps_the_fingerprint_changing_its_content_does_not(tmp_path):
    here = own_data(tmp_path / "here")
    moved = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(here.parent, moved)
    first = identity_of(here, tmp_path)
    assert identity_of(moved / "labels.csv", tmp_path).fingerprint == first.fingerprint
    assert not any(str(tmp_path) in str(v) for v in first.settings.values())
    # the moved study's folder is the first one's: no conflict, its results are reused
    claim_folder(first)
    assert folder_conflict(identity_of(moved / "labels.csv", tmp_path)) is None
    # one label changed: another study
    labels = moved / "labels.csv"
    labels.write_text(labels.read_text().replace("200.0", "201.0"))
    assert identity_of(labels, tmp_path).fingerprint != first.fingerprint
    # one referenced structure file changed (the table itself unchanged): another study
    shutil.copytree(here.parent, tmp_path / "third")
    (tmp_path / "third/cifs/b.cif").write_text("data_b\n_cell_length_a 4.1\n")
    assert identity_of(tmp_path / "third/labels.csv", tmp_path).fingerprint != \
        first.fingerprint


def test_the_settings_that_read_the_data_stay_in_the_fingerprint(tmp_path):
    """Only the location is left out: which column is the target, its unit, kind and the
    split still make another study."""
    table = own_data(tmp_path / "data")
    base = load_study_config(CSV_CONFIG, {"run.data.source.path": str(table)})
    sha = source_sha256(base.run.data.source)
    fp = fingerprint(study_settings(base, sha, "w" * 64))
    for change in ({"run.data.source.unit": "THz"}, {"run.data.source.log_target": False},
                   {"run.data.split.k": 2}, {"run.data.source.skip_bad_rows": True}):
        study = load_study_config(CSV_CONFIG, {"run.data.source.path": str(table), **change})
        assert fingerprint(study_settings(study, sha, "w" * 64)) != fp, change


def test_a_study_fingerprinted_with_its_data_path_is_still_found_and_reused(tmp_path):
    """Studies of your own data fingerprinted when the path was part of the fingerprint keep
    their folder and fingerprint while the data stays where it was: their finished folds
    are skipped, not computed again in a new folder (pinned study_dir or not)."""
    table = own_data(tmp_path / "data")
    for pinned in (None, str(tmp_path / "pinned")):
        study = load_study_config(CSV_CONFIG, {"run.data.source.path": str(table),
                                               "output_dir": str(tmp_path / "studies"),
                                               "study_dir": pinned})
        now = identify(study, source_sha256(study.run.data.source), "w" * 64)
        earlier = {**now.settings, "run.data.source.path": str(table)}
        old_fp = fingerprint(earlier)
        folder = Path(pinned) if pinned else now.folder.parent / old_fp
        (folder / "fold0").mkdir(parents=True)
        (folder / "study.json").write_text(json.dumps(
            {"fingerprint": old_fp, "task": now.task, "variant": now.variant,
             "settings": earlier}))
        (folder / "fold0/result.json").write_text(json.dumps({"fingerprint": old_fp}))
        again = identify(study, source_sha256(study.run.data.source), "w" * 64)
        assert (again.fingerprint, again.folder) == (old_fp, folder)
        assert folder_conflict(again) is None
        assert fold_status(again, 0, str(tmp_path / "ray")) == "finished"
        # moved elsewhere, the data is a new study (as before), under the new fingerprint
        moved = tmp_path / "moved"
        shutil.copytree(table.parent, moved, dirs_exist_ok=True)
        study = load_study_config(CSV_CONFIG, {"run.data.source.path": str(moved / "labels.csv"),
                                               "output_dir": str(tmp_path / "studies")})
        assert identify(study, source_sha256(study.run.data.source), "w" * 64).fingerprint \
            == now.fingerprint
