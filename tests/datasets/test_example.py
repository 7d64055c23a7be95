"""The README's "Your own data" commands, as written (size overrides only), in a fresh folder
holding links to what the project ships: check, tune, report, predict, and analyze mi."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIZE = " --folds 0 --num-samples 1 --epochs 1"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("own-data-user")
    for name in (".venv", "tune_configs", "examples"):
        (folder / name).symlink_to(ROOT / name)
    return folder


def run(workspace: Path, command: str) -> str:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING", "PYTEST"))}
    proc = subprocess.run(["bash", "-c", command], cwd=workspace, capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


@pytest.mark.slow
@pytest.mark.cluster
def test_readme_own_data_commands_go_from_cifs_and_a_csv_to_predictions(workspace):
    card = run(workspace, ".venv/bin/matxfer data check tune_configs/examples/custom_csv.yaml")
    assert "rows      200 usable" in card and "group-composition, k=3" in card
    assert "per training epoch" in card
    run(workspace, ".venv/bin/matxfer tune tune_configs/examples/custom_csv.yaml" + SIZE)
    (result,) = (workspace / "runs/studies/phonons200/main").glob("*/fold0/result.json")
    record = json.loads(result.read_text())
    first_test_fold = int(re.search(r"test folds of (\d+),", card).group(1))
    assert record["unit"] == "cm^-1" and record["n_test"] == first_test_fold  # as the card said
    table = run(workspace, ".venv/bin/matxfer report --results runs/studies --tasks phonons200 "
                "--out runs/report-phonons200")
    assert "| phonons200 | mae [cm^-1] |" in table and "JMP-S" not in table
    # the potential's physics on your data: computed once, then a residual fine-tune
    run(workspace, ".venv/bin/matxfer tune tune_configs/examples/custom_csv.yaml "
        "--variant phys-residual" + SIZE)
    table = run(workspace, ".venv/bin/matxfer report --results runs/studies --tasks phonons200 "
                "--out runs/report-phonons200")
    assert "MP0 physics residual" in table
    preds = run(workspace, ".venv/bin/matxfer predict --model matxfer-phonons200 "
                "examples/phonons200/cifs/mb-phonons-0003.cif")
    header, row = preds.strip().splitlines()[-2:]
    assert header == "file,formula,prediction,error,unit" and row.endswith(",cm^-1")
    assert 0 < float(row.split(",")[2]) < 5000
    mi = run(workspace, ".venv/bin/matxfer analyze mi --data "
             "tune_configs/examples/custom_extxyz.yaml --max-structures 100")
    assert "phonons200" in mi and (workspace / "runs/analysis/mi/mi.csv").is_file()
