"""`matxfer analyze mi|drift` and `matxfer report` on real data, the real model, a real store."""

import json

import numpy as np
import pandas as pd
import pytest

from matxfer.cli import main


@pytest.mark.slow
def test_analyze_mi_writes_json_csv_heatmap_and_logs_to_mlflow(tmp_path, capsys, monkeypatch):
    from mlflow import MlflowClient

    from matxfer.analysis import mi_analysis

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["analyze", "mi", "--tasks", "matbench_jdft2d", "--max-structures", "40",
            "--bins", "4", "--out", str(tmp_path / "mi"), "--tracking-uri", uri]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "normalised TransRate" in out
    payload = json.loads((tmp_path / "mi" / "mi.json").read_text())
    rows = pd.DataFrame(payload["rows"])
    assert len(rows) == 6 and set(rows["init"]) == {"pretrained", "random"}
    assert set(rows["layer"]) == {"embedding", "interaction_0", "interaction_1"}
    assert ((rows["normalized"] >= 0) & (rows["normalized"] <= 1)).all()
    assert (rows["n"] == 40).all() and (rows["classes"] == 4).all()
    assert (tmp_path / "mi" / "mi_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("matxfer-analysis").experiment_id])
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} == {
        "mi.json", "mi.csv", "mi_heatmap.png"}
    # the second run reads the cached features (no forward pass) and gives the same numbers
    def no_forward(*args, **kwargs):
        raise AssertionError("features were computed again instead of read from the cache")

    monkeypatch.setattr(mi_analysis, "pooled_features", no_forward)
    assert main(args[:-2] + ["--tracking-uri", "off", "--out", str(tmp_path / "again")]) == 0
    again = pd.read_csv(tmp_path / "again" / "mi.csv")
    assert again["transrate"].tolist() == pytest.approx(rows["transrate"].tolist())


@pytest.mark.slow
def test_analyze_drift_on_a_checkpoint(tiny_cfg, tmp_path, capsys):
    from matxfer.run import run_finetune

    run_finetune(tiny_cfg, tmp_path / "ft", progress=False)
    args = ["analyze", "drift", "--checkpoint", str(tmp_path / "ft"), "--max-structures", "24",
            "--out", str(tmp_path / "drift"), "--tracking-uri", "off"]
    assert main(args) == 0
    result = json.loads((tmp_path / "drift" / "drift.json").read_text())
    assert list(result["drift"]) == ["embedding", "interaction_0", "interaction_1", "head"]
    assert all(v > 0 for v in result["drift"].values())  # every group was trained
    assert set(result["element_drift"]) == {"embedding", "interaction_0", "interaction_1"}
    assert set(result["cka"]) == {"embedding", "interaction_0", "interaction_1"}
    assert all(0 < v <= 1 + 1e-9 for v in result["cka"].values())
    assert result["cka_structures"] == 24 and (tmp_path / "drift" / "drift.png").exists()
    assert "relative drift" in capsys.readouterr().out


@pytest.mark.slow
def test_analyze_drift_marks_frozen_blocks_unchanged(tmp_path, capsys):
    """`matxfer train --freeze-blocks 1`: the embedding does not move, drift says why."""
    args = ["train", "--task", "matbench_jdft2d", "--max-structures", "40", "--epochs", "1",
            "--batch-size", "8", "--freeze-blocks", "1", "--out", str(tmp_path / "ft"), "--quiet"]
    assert main(args) == 0
    assert main(["analyze", "drift", "--checkpoint", str(tmp_path / "ft"), "--max-structures",
                 "16", "--out", str(tmp_path / "drift"), "--tracking-uri", "off"]) == 0
    result = json.loads((tmp_path / "drift" / "drift.json").read_text())
    assert result["frozen_groups"] == ["embedding"] and result["drift"]["embedding"] == 0.0
    assert result["drift"]["interaction_0"] > 0 and result["cka"]["embedding"] == 1.0
    assert "frozen: unchanged by construction" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["analyze", "mi", "--tasks", "matbench_nope"], "unknown task 'matbench_nope'"),
    (["analyze", "mi", "--tasks", "matbench_jdft2d", "--bins", "1"], "--bins must be at least 2"),
    (["analyze", "mi", "--tasks", "matbench_jdft2d", "--eps2", "0"], "--eps2 must be positive"),
    (["analyze", "mi", "--tasks", "matbench_jdft2d", "--max-structures", "0"],
     "--max-structures must be a positive integer"),
    (["analyze", "drift", "--checkpoint", "no/such/dir"], "does not exist"),
    (["analyze", "drift"], "one of the arguments --run --checkpoint is required"),
    (["report", "--experiment", "no-such-experiment"], "no MLflow store at sqlite:///"),
    (["report", "--experiment", "x", "--tasks", "matbench_nope"], "unknown task"),
])
def test_bad_analysis_input_is_one_line_exit_2_nothing_written(argv, needle, tmp_path,
                                                               monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
    assert not (tmp_path / "store.db").exists()  # a typo does not create a tracking store


def test_report_names_a_missing_experiment(tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    MlflowClient(uri).create_experiment("exists")
    assert main(["report", "--experiment", "missing", "--tracking-uri", uri,
                 "--out", str(tmp_path / "out")]) == 2
    assert "--experiment 'missing' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_table1_shows_dashes_for_tasks_without_runs():
    from matxfer.analysis.report import table1

    runs = pd.DataFrame({"task": ["matbench_jdft2d"] * 4,
                         "variant": ["main", "main", "random-init", "random-init"],
                         "fold": [0, 1, 0, 1], "test": [20.0, 30.0, 40.0, 60.0]})
    table = table1(runs, ["matbench_jdft2d", "matbench_phonons"]).set_index("task")
    jdft = table.loc["matbench_jdft2d"]
    assert jdft["MP0 (L2-SP+BSS)"] == "25 ± 5 (2)" and jdft["MACE-RI"] == "50 ± 10 (2)"
    assert jdft["MP0 (no reg)"] == "-"
    assert jdft["MP0 vs RI"] == "+50.0%"  # (50 - 25) / 50
    assert jdft["MP0 vs JMP-S"] == f"{(30.16 - 25) / 30.16:+.1%}"
    assert jdft["Matbench #1"] == "33.19 (MODNet)"
    phonons = table.loc["matbench_phonons"]
    assert phonons["MP0 (L2-SP+BSS)"] == "-" and phonons["MP0 vs RI"] == "-"


def test_table1_gains_a_column_per_strategy_present():
    from matxfer.analysis.report import table1

    runs = pd.DataFrame({"task": ["matbench_jdft2d"] * 3, "variant": ["main", "lp-ft", "llrd"],
                         "fold": [0, 0, 0], "test": [20.0, 22.0, 24.0]})
    row = table1(runs, ["matbench_jdft2d"]).iloc[0]
    assert row["MP0 LP-FT"] == "22 ± 0 (1)" and row["MP0 LR decay"] == "24 ± 0 (1)"
    assert "MP0 freeze" not in row  # no such runs: the paper's columns only
    assert list(row.index).index("MP0 LP-FT") < list(row.index).index("JMP-S")


def test_report_from_result_files_without_mlflow(tmp_path, capsys):
    """`report --results DIR` reads what `matxfer tune` wrote: Table 1 from result.json files
    (three folds of main, one of random-init), no tracking store involved. A quickstart-sized
    study of main (another fingerprint folder, a subset) is named but not mixed in."""
    tests = {("main", 0): 20.0, ("main", 1): 30.0, ("main", 2): 40.0, ("random-init", 0): 60.0}
    quick = {("main", 0): 99.0}
    for study, subset, results in (("0123abcd4567", None, tests), ("quick0000000", 96, quick)):
        for (variant, fold), mae in results.items():
            folder = tmp_path / "studies" / "matbench_jdft2d" / variant / study / f"fold{fold}"
            folder.mkdir(parents=True)
            (folder / "result.json").write_text(json.dumps({
                "task": "matbench_jdft2d", "variant": variant, "fold": fold, "test_mae": mae,
                "trial_id": "t", "max_structures": subset}))
    out = tmp_path / "report"
    assert main(["report", "--results", str(tmp_path / "studies"), "--out", str(out)]) == 0
    table = pd.read_csv(out / "table1.csv").set_index("task").loc["matbench_jdft2d"]
    assert table["MP0 (L2-SP+BSS)"] == f"30 ± {np.std([20, 30, 40]):.2g} (3)"
    assert table["MACE-RI"] == "60 ± 0 (1)" and table["MP0 (no reg)"] == "-"
    assert table["MP0 vs RI"] == "+50.0%"  # (60 - 30) / 60
    assert "showing" in capsys.readouterr().out  # the quickstart study is named, not used
    assert sorted(p.name for p in out.iterdir()) == [
        "backbones.md", "figure1_fold_metrics.png", "runs.csv", "table1.csv", "table1.md"]
    assert main(["report", "--results", str(tmp_path / "empty")]) == 2
    assert "--results" in capsys.readouterr().err


def test_table1_of_your_own_data_has_no_matbench_or_jmp_columns():
    from matxfer.analysis.report import table1

    runs = pd.DataFrame({"task": ["salts"] * 2, "variant": ["main", "random-init"],
                         "metric": ["mae"] * 2, "unit": ["eV"] * 2, "fold": [0, 0],
                         "test": [1.0, 2.0]})
    row = table1(runs, ["salts"]).iloc[0]
    assert row["metric"] == "mae [eV]" and row["MP0 vs RI"] == "+50.0%"
    assert "Matbench #1" not in row and "JMP-S" not in row and "MP0 vs JMP-S" not in row
