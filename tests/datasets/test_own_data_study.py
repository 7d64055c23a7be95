"""Your own data end to end, as a user runs it: `tune` (grouped folds, one bad row skipped,
the split and the skipped rows in the results and on the MLflow run), `analyze drift`, `train`
with a run config (a classification: stratified folds; regression trains in the studies); and
bad data stopping `tune` with one line before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ase.io import write
from own_data import crystals, molecule


def matxfer(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matxfer.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})})


def write_data(folder: Path, spoil: bool = True) -> Path:
    images = crystals() + [molecule()]
    if spoil:
        images[5].info["y"] = float("nan")  # one unusable row: skipped, and listed
    path = folder / "salts.extxyz"
    write(path, images, format="extxyz")
    return path


def study_yaml(folder: Path, data: Path, **extra_source) -> Path:
    study = {"folds": [0], "num_samples": 1, "asha": {"enabled": False},
             "storage_path": str(folder / "ray"), "output_dir": str(folder / "studies"),
             "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}"},
             "run": {"data": {"task": "salts", "val_fraction": 0.2,
                              "source": {"path": str(data), "target": "y", "id_key": "id",
                                         "unit": "Å", **extra_source},
                              "split": {"method": "group-composition", "k": 3}},
                     "train": {"epochs": 1, "batch_size": 8},
                     "model": {"head_hidden": [16]}}}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.mark.slow
@pytest.mark.cluster
def test_tune_on_grouped_folds_skips_a_bad_row_and_records_split_and_skips(tmp_path):
    """(`data check`, `report` and `predict` on your data: test_card.py, test_example.py)"""
    data = write_data(tmp_path)
    config = study_yaml(tmp_path, data, skip_bad_rows=True)
    tuned = matxfer("tune", str(config), cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    (fold0,) = (tmp_path / "studies/salts/main").glob("*/fold0")
    record = json.loads((fold0 / "result.json").read_text())
    assert record["task"] == "salts" and record["unit"] == "Å" and record["skipped_rows"] == 1
    split = json.loads((fold0 / "split.json").read_text())
    formulas = [{i.split("-")[0] for i in split[p]} for p in ("train", "val", "test")]
    assert not (formulas[0] & formulas[2]) and not (formulas[1] & formulas[2])
    assert split["method"] == "group-composition" and "KCl-2" not in sum(
        (split[p] for p in ("train", "val", "test")), [])
    assert "KCl-2" in (fold0 / "skipped_rows.csv").read_text()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(record["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["unit"] == "Å"
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"skipped_rows.csv", "split.json", "result.json"} <= logged
    assert "matxfer-salts" in {m.name for m in client.search_registered_models()}
    summary = json.loads((fold0.parent / "summary.json").read_text())
    assert summary["matbench_record"] is None and "own data" in summary["matbench_record_note"]

    drift = matxfer("analyze", "drift", "--checkpoint", str(fold0), "--tracking-uri", "off",
                    "--out", str(tmp_path / "drift"), cwd=tmp_path)
    assert drift.returncode == 0, drift.stderr
    assert "salts fold 0 (pretrained)" in drift.stdout
    assert json.loads((tmp_path / "drift/drift.json").read_text())["task"] == "salts"


@pytest.mark.slow
@pytest.mark.parametrize("kind, target, metric", [("classification", "metal", "test_rocauc")])
def test_train_with_a_run_config_on_your_own_data(kind, target, metric, tmp_path):
    data = write_data(tmp_path, spoil=False)
    run = {"data": {"task": "salts", "fold": 2, "val_fraction": 0.2,
                    "source": {"path": str(data), "target": target, "id_key": "id",
                               "kind": kind},
                    "split": {"method": "kfold", "k": 4}},
           "train": {"epochs": 1, "batch_size": 8}, "model": {"head_hidden": [16]}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    trained = matxfer("train", "--config", "run.yaml", "--out", "out", "--quiet", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    record = json.loads((tmp_path / "out/result.json").read_text())
    split = json.loads((tmp_path / "out/split.json").read_text())
    assert record["fold"] == 2 and record["n_test"] == len(split["test"]) in (6, 7)
    assert metric in record
    if kind == "classification":  # stratified: both classes in every part
        labels = {a.info["id"]: a.info["metal"] for a in crystals() + [molecule()]}
        for part in ("train", "val", "test"):
            assert {labels[i] for i in split[part]} == {0, 1}, part


def relabel(atoms, suffix: str):
    atoms = atoms.copy()
    atoms.info["id"] += suffix
    return atoms


BAD_DATA = {  # how the data is spoiled: the one-line reason `tune` gives
    "a NaN target": (lambda im: im[5].info.update(y=float("nan")), "row KCl-2: target nan"),
    "one formula only": (lambda im: im[:3] + [relabel(a, "b") for a in im[:3]],
                         "only 1 distinct groups, fewer than split.k=3"),
    "too few rows": (lambda im: im[:4], "4 rows cannot make 3 folds"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_stops_tune_with_one_line_and_writes_nothing(case, tmp_path, monkeypatch,
                                                               capsys):
    from matxfer.cli import main

    spoil, needle = BAD_DATA[case]
    images = crystals()
    images = spoil(images) or images
    path = tmp_path / "salts.extxyz"
    write(path, images, format="extxyz")
    config = study_yaml(tmp_path, path)
    cache = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MATXFER_CACHE", str(cache))
    assert main(["tune", str(config)]) == 2
    err = capsys.readouterr().err  # after the graph builder's progress bar, one line
    assert err.endswith("\n") and needle in err.splitlines()[-1] and "Traceback" not in err, err
    assert not (tmp_path / "studies").exists() and not (tmp_path / "ray").exists()
    assert not cache.exists() or not any(cache.iterdir())
