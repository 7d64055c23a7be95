"""`matxfer report --experiment`: one study per cell, named, never the folds of several mixed."""

import json

import numpy as np
import pandas as pd
import pytest

from matxfer.cli import main

QUICK, SHORT, LONG = "quick0000000", "12ep00000000", "40ep00000000"


@pytest.fixture
def store(tmp_path):
    """An MLflow store holding three studies of matbench_jdft2d [main] as `matxfer tune` logs
    them (fold parent runs tagged with the fingerprint): the quickstart (fold 0, a subset),
    a 12-epoch campaign (5 folds) and a newer 40-epoch one (5 folds), plus one study of
    random-init."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("matbench_jdft2d")
    studies = [(QUICK, "main", 96, {0: 150.0}, 1000),
               (SHORT, "main", None, {k: 60.0 + k for k in range(5)}, 2000),
               (LONG, "main", None, {k: 30.0 + k for k in range(5)}, 3000),
               ("ri0000000000", "random-init", None, {0: 90.0}, 2500)]
    for fingerprint, variant, subset, folds, start in studies:
        for fold, mae in folds.items():
            run = client.create_run(exp, start_time=start + fold, tags={
                "task": "matbench_jdft2d", "variant": variant, "fold": str(fold),
                "matxfer.fingerprint": fingerprint, "best_trial": "t"})
            client.log_param(run.info.run_id, "max_structures", str(subset))
            client.log_metric(run.info.run_id, "test_mae", mae)
            client.set_terminated(run.info.run_id)
    return uri


def report(store, tmp_path, *extra):
    out = tmp_path / "report"
    code = main(["report", "--experiment", "matbench_jdft2d", "--tracking-uri", store,
                 "--out", str(out), *extra])
    return code, out


def test_report_shows_one_study_per_cell_names_it_and_the_others(store, tmp_path, capsys):
    """The most complete, then newest study fills the cell (40 epochs, not the mean of all
    eleven folds); one line names it and the studies left out; the table names each cell's
    study."""
    code, out = report(store, tmp_path)
    assert code == 0
    stdout = capsys.readouterr().out
    row = pd.read_csv(out / "table1.csv").set_index("task").loc["matbench_jdft2d"]
    assert row["MP0 (L2-SP+BSS)"] == f"32 ± {np.std([30, 31, 32, 33, 34]):.2g} (5)"
    assert row["MACE-RI"] == "90 ± 0 (1)"
    assert LONG in row["studies"] and "ri0000000000" in row["studies"]
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("report: matbench_jdft2d [main]")]
    assert line.index(LONG) < line.index(SHORT) and QUICK in line and "--fingerprint" in line
    assert LONG in (out / "table1.md").read_text()
    runs = pd.read_csv(out / "runs.csv")
    assert set(runs["fingerprint"]) == {LONG, "ri0000000000"} and len(runs) == 6


def test_report_fingerprint_picks_the_study_of_a_cell(store, tmp_path, capsys):
    code, out = report(store, tmp_path, "--fingerprint", SHORT[:8])
    assert code == 0
    row = pd.read_csv(out / "table1.csv").set_index("task").loc["matbench_jdft2d"]
    assert row["MP0 (L2-SP+BSS)"].startswith("62 ± ") and SHORT in row["studies"]
    assert row["MACE-RI"] == "90 ± 0 (1)"  # a cell the choice does not name keeps its default


def test_report_fingerprint_naming_no_study_is_one_line_exit_2_nothing_written(
        store, tmp_path, capsys):
    code, out = report(store, tmp_path, "--fingerprint", "beef")
    assert code == 2
    said = capsys.readouterr()
    err = said.err.strip()
    assert len(err.splitlines()) == 1 and "'beef'" in err and LONG in err and QUICK in err
    assert "showing" not in said.out
    assert not out.exists()
    code, out = report(store, tmp_path, "--fingerprint", SHORT, LONG)
    assert code == 2  # two studies for one cell: pick one
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and SHORT in err and LONG in err
    assert not out.exists()


def test_report_from_result_files_picks_the_study_named_by_fingerprint(tmp_path, capsys):
    """`--results` too: the fingerprint recorded in result.json picks the folder shown."""
    for fingerprint, subset, folds in ((LONG, None, {0: 30.0, 1: 40.0}), (QUICK, 96, {0: 9.0})):
        for fold, mae in folds.items():
            folder = tmp_path / "studies/matbench_jdft2d/main" / fingerprint / f"fold{fold}"
            folder.mkdir(parents=True)
            (folder / "result.json").write_text(json.dumps({
                "task": "matbench_jdft2d", "variant": "main", "fold": fold, "test_mae": mae,
                "max_structures": subset, "fingerprint": fingerprint}))
    out = tmp_path / "report"
    args = ["report", "--results", str(tmp_path / "studies"), "--out", str(out)]
    assert main([*args, "--fingerprint", "quick"]) == 0
    row = pd.read_csv(out / "table1.csv").iloc[0]
    assert row["MP0 (L2-SP+BSS)"] == "9 ± 0 (1, subset*)" and row["studies"] == f"main {QUICK}"
    assert f"showing study {QUICK} (1 fold, subset; picked by --fingerprint)" in \
        capsys.readouterr().out
