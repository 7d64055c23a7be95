"""A study's summary holds every finished fold of the study, whichever invocation ran it."""

import json
from pathlib import Path

import numpy as np

from matxfer.config import load_study_config
from matxfer.records import summarize

ROOT = Path(__file__).resolve().parents[1]
FP = "0123abcd4567"


def fold_record(fold: int, mae: float, fingerprint: str = FP) -> dict:
    return {"task": "matbench_jdft2d", "fold": fold, "variant": "main", "unit": "meV/atom",
            "fingerprint": fingerprint, "l2sp": 0.0, "bss": 0.0, "lr": 1e-3,
            "val_mae": mae + 1, "test_mae": mae, "max_structures": 96}


def finished(out: Path, record: dict) -> None:
    folder = out / f"fold{record['fold']}"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(record))


def test_a_run_of_some_folds_summarises_every_finished_fold_of_the_study(tmp_path, capsys):
    """Folds 0 and 1 finished earlier; `--folds 3` adds fold 3: the summary holds 0, 1 and 3
    (not 3 alone), says so and which folds are missing; a result of another study in the
    folder is not counted."""
    study = load_study_config(ROOT / "tune_configs/quickstart.yaml",
                              {"run.data.max_structures": 96, "folds": [3]})
    out = tmp_path / "study"
    finished(out, fold_record(0, 10.0))
    finished(out, fold_record(1, 20.0))
    finished(out, fold_record(2, 99.0, fingerprint="another00000"))
    table = summarize(study, out, [fold_record(3, 30.0)])
    assert table["fold"].tolist() == [0, 1, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folds"] == [0, 1, 3] and summary["missing_folds"] == [2, 4]
    assert summary["mean"] == 20.0 and summary["std"] == np.std([10.0, 20.0, 30.0])
    assert summary["fingerprint"] == FP
    assert (out / "summary.csv").read_text().count("\n") == 4  # header + 3 folds
    capsys.readouterr()
    # a fold's result removed by hand: the smaller summary replaces the fuller one aloud
    (out / "fold0/result.json").unlink()
    summarize(study, out, [fold_record(3, 30.0)])
    assert json.loads((out / "summary.json").read_text())["folds"] == [1, 3]
    line = capsys.readouterr().out
    assert "fold 0" in line and "no result.json" in line
