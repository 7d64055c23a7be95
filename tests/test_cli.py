"""The command line end to end, and bad input: one line, exit code 2, nothing written."""

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from matxfer.cli import main
from matxfer.datasets.matbench import default_data_dir


def run_cli(*args):
    """Run `matxfer` in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, "-m", "matxfer.cli", *args],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_train_writes_result_history_predictions_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--task", "matbench_jdft2d", "--fold", "0", "--init", "pretrained",
                   "--l2sp", "1e-4", "--bss", "1e-3", "--epochs", "2", "--max-structures", "48",
                   "--batch-size", "8", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["task"] == "matbench_jdft2d" and result["fold"] == 0
    assert result["l2sp"] == 1e-4 and result["bss"] == 1e-3 and result["init"] == "pretrained"
    assert math.isfinite(result["test_mae"]) and result["test_mae"] > 0
    assert result["n_train"] + result["n_val"] + result["n_test"] == 48
    assert result["epochs_run"] == 2 and 1 <= result["best_epoch"] <= 2
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert {"train_loss", "task_loss", "l2sp_term", "bss_term", "val_mae", "seconds",
            "structures_per_s"} <= set(history.columns)
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == result["n_test"]
    mae = (preds["target"] - preds["prediction"]).abs().mean()
    assert mae == pytest.approx(result["test_mae"])
    assert (out / "checkpoint.pt").stat().st_size > 1e6 and (out / "config.yaml").exists()
    # a finished result is never overwritten by accident
    again = run_cli("train", "--max-structures", "48", "--epochs", "1", "--out", str(out))
    assert again.returncode == 2 and "already holds a result.json" in again.stderr


def test_data_folds_prints_sizes_and_ids(capsys):
    assert main(["data", "folds", "--task", "matbench_jdft2d"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "matbench_jdft2d fold_0: train 508  test 128"
    assert len(lines) == 5
    assert main(["data", "folds", "--task", "matbench_phonons", "--fold", "3", "--json"]) == 0
    ids = json.loads(capsys.readouterr().out)["fold_3"]
    assert len(ids["train"]) + len(ids["test"]) == 1265


def make_data_dir_with_polonium(tmp_path: Path) -> Path:
    """A copy of jdft2d whose 5th structure holds polonium, which MACE-MP-0 does not know."""
    src = json.load(gzip.open(default_data_dir() / "matbench_jdft2d.json.gz"))
    src["data"][4][0]["sites"][0]["species"] = [{"element": "Po", "occu": 1}]
    folder = tmp_path / "data"
    folder.mkdir()
    with gzip.open(folder / "matbench_jdft2d.json.gz", "wt") as fh:
        json.dump(src, fh)
    return folder


BAD_TRAIN_ARGS = [
    (["--task", "matbench_foo"], "unknown task 'matbench_foo'; allowed: matbench_jdft2d"),
    (["--fold", "7"], "data.fold 7 is out of range; allowed: 0-4"),
    (["--fold", "x"], "argument --fold: invalid int value: 'x'"),
    (["--l2sp=-1e-3"], "regularizers.l2sp: Input should be greater than or equal to 0"),
    (["--bss=-1"], "regularizers.bss: Input should be greater than or equal to 0"),
    (["--pooling", "median"], "model.pooling: Input should be 'mean', 'sum', 'max' or"),
    (["--model", "missing.model"], "model.source 'missing.model' is neither a model file nor "
                                   "a known name; allowed names: small, medium"),
    (["--max-structures", "3"], "max_structures=3 leaves the"),
    (["--max-structures", "0"], "data.max_structures: Input should be greater than or equal"),
    (["--data-dir", "/nonexistent"], "data_dir '/nonexistent' holds no matbench_jdft2d.json.gz"),
    (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["--compile", "fast"], "train.compile: Input should be 'off', 'inductor', 'aot_eager'"),
    (["--kernels", "triton"], "model.kernels: Input should be"),
    (["--compile", "inductor", "--kernels", "cueq"], "needs model.kernels 'e3nn'"),
]


@pytest.mark.parametrize("extra, message", BAD_TRAIN_ARGS)
def test_bad_train_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code = main(["train", "--epochs", "1", *extra, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("matxfer: error: ") and message in err, err
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging folder


@pytest.mark.parametrize("yaml_text, message", [
    ("train:\n  epochs: [1,\n", "is not valid YAML at line"),
    ("train:\n  epocs: 3\n", "train.epocs: unknown config key"),
    ("- a\n- b\n", "must hold a mapping, got list"),
])
def test_bad_config_files(tmp_path, capsys, yaml_text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    code = main(["train", "--config", str(cfg), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_element_outside_the_model_names_structure_and_element(tmp_path):
    data_dir = make_data_dir_with_polonium(tmp_path)
    out = tmp_path / "out"
    proc = run_cli("train", "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache"),
                   "--max-structures", "32", "--epochs", "1", "--out", str(out), "--quiet")
    assert proc.returncode == 2
    assert "structure mb-jdft2d-005: element Po is not among the model's 89 elements" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr  # the error line, nothing else
    assert not out.exists() and not list((tmp_path / "cache").glob("*.pt"))


def test_unknown_subcommand_is_exit_2(capsys):
    assert main(["fly"]) == 2
    assert "invalid choice: 'fly'" in capsys.readouterr().err
