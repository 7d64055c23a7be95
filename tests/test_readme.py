"""Every command README.md shows runs in a test, as written, in a fresh folder.

`README_COMMANDS` lists each command of the README's bash blocks with the test that runs it;
a README command missing here (or listed here but gone from the README) fails the suite.
The commands run here are executed by bash in a new folder holding only links to the
project's shipped files (`.venv`, `tune_configs/`, `Makefile`, ...), exactly as written, with
size overrides only (folds, trials, epochs, structures) and, on a machine without CUDA, `--cpu`
for the GPU configs. `<placeholders>` are filled with what the earlier commands produced.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = "tests/test_readme.py"
CLUSTER = ("tests/test_cluster.py::"
           "test_two_node_cluster_runs_the_quickstart_job_and_refuses_strangers")
TRACKING = "tests/test_tracking.py"
EXAMPLE = ("tests/datasets/test_example.py::"
           "test_readme_own_data_commands_go_from_cifs_and_a_csv_to_predictions")
README_COMMANDS = {
    "make quickstart": HERE,
    "make test": "CI: .ci/run runs it on a clean clone",
    ".venv/bin/matxfer tune tune_configs/matbench_jdft2d.yaml --check": HERE,
    ".venv/bin/matxfer tune tune_configs/matbench_jdft2d.yaml": HERE,
    ".venv/bin/matxfer tune tune_configs/matbench_jdft2d.yaml --cpu --folds 0": HERE,
    ".venv/bin/matxfer tune tune_configs/matbench_jdft2d.yaml --variant random-init": HERE,
    ".venv/bin/matxfer train --task matbench_jdft2d --model chgnet --out runs/train/chgnet":
        HERE,
    ".venv/bin/matxfer tune tune_configs/matbench_jdft2d.yaml --variant chgnet": HERE,
    ".venv/bin/matxfer train --config tune_configs/quickstart_train.yaml "
    "--out runs/train/quickstart": HERE,
    "export RAY_ADDRESS=http://127.0.0.1:8265": "environment for the next command",
    "export RAY_AUTH_MODE=token": "environment for the next command",
    "export MLFLOW_TRACKING_URI=http://mlflow.internal:5000": "environment for the next command",
    "cluster/submit.sh tune_configs/matbench_jdft2d.yaml --storage-path /shared/ray "
    "--output-dir /shared/studies": CLUSTER + " (the quickstart config: this one needs GPU nodes)",
    "cluster/submit.sh status raysubmit_XXXX": CLUSTER,
    "STATE_DIR=/tmp/matxfer-cluster cluster/local_cluster.sh start": CLUSTER,
    "RAY_ADDRESS=http://127.0.0.1:26001 RAY_AUTH_TOKEN_PATH=/tmp/matxfer-cluster/token "
    "JOB_PYTHON=$PWD/.venv/bin/python cluster/submit.sh tune_configs/quickstart.yaml "
    "--storage-path /tmp/matxfer-cluster/ray --output-dir /tmp/matxfer-cluster/studies": CLUSTER,
    "STATE_DIR=/tmp/matxfer-cluster cluster/local_cluster.sh stop": CLUSTER,
    ".venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1": HERE,
    "mlflow_server/start.sh": TRACKING,
    "MATXFER_PG_PASSWORD=... mlflow_server/start.sh postgres": TRACKING,
    "MLFLOW_ADMIN_PASSWORD=... mlflow_server/start.sh basic-auth": TRACKING,
    "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000": "environment for the next command",
    ".venv/bin/matxfer tune tune_configs/quickstart.yaml": TRACKING,
    ".venv/bin/matxfer predict --model matxfer-matbench_jdft2d@fold0 my.cif POSCAR "
    "other.extxyz": HERE,
    ".venv/bin/matxfer predict --model matxfer-matbench_jdft2d *.cif --out preds.csv": HERE,
    ".venv/bin/matxfer predict --model runs/studies/matbench_jdft2d/main/<fingerprint>/fold0 "
    "s.json": HERE,
    ".venv/bin/matxfer analyze mi --tasks matbench_jdft2d matbench_phonons "
    "matbench_dielectric": HERE,
    ".venv/bin/matxfer analyze drift --run <MLflow run id>": HERE,
    ".venv/bin/matxfer analyze drift --checkpoint "
    "runs/studies/matbench_jdft2d/main/<fingerprint>/fold0": HERE,
    ".venv/bin/matxfer report --experiment matbench_jdft2d --tasks matbench_jdft2d "
    "matbench_phonons": HERE,
    ".venv/bin/matxfer checkpoint convert runs/old-study/fold0 runs/old-study/fold0-v2":
        "tests/test_checkpoint.py::test_an_old_checkpoint_converts_to_the_current_format",
    ".venv/bin/matxfer data check tune_configs/examples/custom_csv.yaml": EXAMPLE,
    ".venv/bin/matxfer tune tune_configs/examples/custom_csv.yaml": EXAMPLE,
    ".venv/bin/matxfer report --results runs/studies --tasks phonons200 "
    "--out runs/report-phonons200": EXAMPLE,
    ".venv/bin/matxfer predict --model matxfer-phonons200 "
    "examples/phonons200/cifs/mb-phonons-0003.cif": EXAMPLE,
    ".venv/bin/matxfer analyze mi --data tune_configs/examples/custom_extxyz.yaml "
    "--max-structures 100": EXAMPLE,
    ".venv/bin/matxfer tune tune_configs/examples/custom_csv.yaml --variant phys-residual":
        EXAMPLE,
    "python -m venv .venv": "CI: make install (.ci/run) creates the venv",
    ".venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126":
        "not runnable here: no CUDA wheel index is reachable from this machine",
    "make install": "CI: .ci/run runs it through make test",
    ".venv/bin/pip install -e '.[cueq-cu12]'":
        "not runnable here: cuequivariance's CUDA ops need a GPU",
}


def readme_commands() -> list[str]:
    """Each command line of README.md's bash blocks (continuations joined, comments cut)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+", " ", re.sub(r"(^|\s)#.*$", "", line)).strip()
            if command:
                commands.append(command)
    return commands


def test_every_readme_command_is_listed_with_the_test_that_runs_it():
    shown = readme_commands()
    assert len(shown) == len(set(shown)), "a README command appears twice"
    assert set(shown) - set(README_COMMANDS) == set(), "README commands without a test"
    assert set(README_COMMANDS) - set(shown) == set(), "listed commands gone from the README"
    for where in README_COMMANDS.values():
        if where.startswith("tests/"):
            path, _, name = where.split()[0].partition("::")
            assert (ROOT / path).is_file(), where
            assert not name or f"def {name}(" in (ROOT / path).read_text(), where


SIZE = "--num-samples 1 --epochs 1 --max-structures 32"
MACHINE = "" if torch.cuda.is_available() else " --cpu"  # the GPU configs on a CPU machine


def run(workspace: Path, command: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `command` with bash in the workspace, as a user would type it."""
    proc = subprocess.run(["bash", "-c", command], cwd=workspace, capture_output=True,
                          text=True, timeout=timeout, env=workspace_env())
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def workspace_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING", "PYTEST"))}
    return env


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A new folder with links to what the project ships, nothing else."""
    folder = tmp_path_factory.mktemp("user")
    for name in (".venv", "tune_configs", "Makefile", "pyproject.toml", "cluster",
                 "mlflow_server"):
        (folder / name).symlink_to(ROOT / name)
    return folder


def study_folders(workspace: Path, variant: str = "main") -> list[Path]:
    return sorted(p.parent for p in
                  (workspace / "runs/studies/matbench_jdft2d" / variant).glob("*/study.json"))


@pytest.fixture(scope="module")
def studied(workspace):
    """The README's study commands in order: the quickstart, then the jdft2d config on fold 0.
    The second must not reuse the quickstart's fold 0 (another fingerprint, another folder);
    the full command afterwards computes the same study and skips it."""
    quick = run(workspace, "make quickstart QUICKSTART_ARGS='--num-samples 1 --epochs 1 "
                           "--max-structures 32'")
    assert "mean ± std over 1 fold(s)" in quick.stdout
    (quick_folder,) = study_folders(workspace)
    quick_result = (quick_folder / "fold0/result.json").read_text()

    check = subprocess.run(["bash", "-c", ".venv/bin/matxfer tune tune_configs/"
                            "matbench_jdft2d.yaml --check"], cwd=workspace, capture_output=True,
                           text=True, timeout=300, env=workspace_env())
    assert "fingerprint" in check.stdout and "0: new" in check.stdout
    if torch.cuda.is_available():
        assert check.returncode == 0, check.stderr
    else:  # the one problem: no CUDA on this machine
        assert check.returncode == 2 and "no CUDA device" in check.stderr
        assert len(check.stderr.strip().splitlines()) == 1

    fold0 = run(workspace, ".venv/bin/matxfer tune tune_configs/matbench_jdft2d.yaml --cpu "
                           f"--folds 0 {SIZE}")
    assert "skipping" not in fold0.stdout
    folders = study_folders(workspace)
    assert len(folders) == 2 and (quick_folder / "fold0/result.json").read_text() == quick_result
    (full,) = [f for f in folders if f != quick_folder]
    record = json.loads((full / "fold0/result.json").read_text())
    assert record["fingerprint"] == full.name and record["max_structures"] == 32
    assert json.loads(quick_result)["fingerprint"] == quick_folder.name
    # the registry's fold0 alias now names this study's model, and says so; the quickstart's
    # model keeps its own alias
    moved = (f"registry: matxfer-matbench_jdft2d@fold0 now points at version 2 (study "
             f"{full.name}); version 1 stays at matxfer-matbench_jdft2d@fold0-{quick_folder.name}")
    assert moved in fold0.stdout

    again = run(workspace, ".venv/bin/matxfer tune tune_configs/matbench_jdft2d.yaml"
                           f"{MACHINE} --folds 0 {SIZE}")
    assert "finished earlier with the same settings, skipping" in again.stdout
    return {"quick": quick_folder, "full": full, "record": record}


@pytest.mark.slow
@pytest.mark.cluster
def test_readme_studies_never_reuse_another_studys_results(studied, workspace):
    """A changed budget (num_samples) on rerun is another study: a new fingerprint, so its
    fold is new, not the other study's experiment restored (which looped on 'interrupted');
    the random-init variant runs in its own folder."""
    changed = run(workspace, ".venv/bin/matxfer tune tune_configs/matbench_jdft2d.yaml --cpu "
                             f"--folds 0 {SIZE.replace('--num-samples 1', '--num-samples 2')}"
                             " --check")
    assert "0: new" in changed.stdout and studied["full"].name not in changed.stdout
    ri = run(workspace, ".venv/bin/matxfer tune tune_configs/matbench_jdft2d.yaml --variant "
                        f"random-init{MACHINE} --folds 0 {SIZE}")
    assert "[random-init]" in ri.stdout
    (folder,) = study_folders(workspace, "random-init")
    assert json.loads((folder / "fold0/result.json").read_text())["init"] == "random"
    chg = run(workspace, ".venv/bin/matxfer tune tune_configs/matbench_jdft2d.yaml --variant "
                         f"chgnet{MACHINE} --folds 0 {SIZE}")
    assert "[chgnet]" in chg.stdout and "chgnet (chgnet_0.3.0" in chg.stdout
    (folder,) = study_folders(workspace, "chgnet")
    record = json.loads((folder / "fold0/result.json").read_text())
    assert record["backbone"] == "chgnet" and record["backbone_params"] == 399_693


@pytest.mark.slow
@pytest.mark.cluster
def test_readme_predict_analyze_and_report_commands(studied, workspace):
    from pymatgen.core import Lattice, Structure

    nacl = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    for name, fmt in (("my.cif", "cif"), ("POSCAR", "poscar"), ("s.json", "json")):
        nacl.to(filename=str(workspace / name), fmt=fmt)
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    write(workspace / "other.extxyz", AseAtomsAdaptor.get_atoms(nacl), format="extxyz")
    fp = studied["full"].name
    one = run(workspace, ".venv/bin/matxfer predict --model matxfer-matbench_jdft2d@fold0 "
                         "my.cif POSCAR other.extxyz")
    rows = one.stdout.strip().splitlines()
    assert rows[0].startswith("file,formula,prediction") and len(rows) == 4
    run(workspace, ".venv/bin/matxfer predict --model matxfer-matbench_jdft2d *.cif "
                   "--out preds.csv")
    assert (workspace / "preds.csv").read_text().count("NaCl") == 1
    ckpt = run(workspace, ".venv/bin/matxfer predict --model "
                          f"runs/studies/matbench_jdft2d/main/{fp}/fold0 s.json")
    assert "NaCl" in ckpt.stdout
    run(workspace, f".venv/bin/matxfer analyze drift --run {studied['record']['mlflow_run_id']}"
                   " --max-structures 16")
    run(workspace, ".venv/bin/matxfer analyze drift --checkpoint "
                   f"runs/studies/matbench_jdft2d/main/{fp}/fold0 --max-structures 16")
    assert len(list((workspace / "runs/analysis").glob("drift-*/drift.json"))) >= 1
    mi = run(workspace, ".venv/bin/matxfer analyze mi --tasks matbench_jdft2d matbench_phonons "
                        "matbench_dielectric --max-structures 24 --bins 4")
    assert "normalised TransRate" in mi.stdout
    run(workspace, ".venv/bin/matxfer report --experiment matbench_jdft2d --tasks "
                   "matbench_jdft2d matbench_phonons")
    assert (workspace / "runs/report/table1.csv").is_file()


@pytest.mark.slow
def test_readme_train_command(workspace):
    out = run(workspace, ".venv/bin/matxfer train --config tune_configs/quickstart_train.yaml "
                         "--out runs/train/quickstart --epochs 1 --max-structures 24")
    assert json.loads(out.stdout[out.stdout.index("{"):])["test_mae"] > 0
    assert (workspace / "runs/train/quickstart/checkpoint.pt").is_file()
    chg = run(workspace, ".venv/bin/matxfer train --task matbench_jdft2d --model chgnet "
                         "--out runs/train/chgnet --epochs 1 --max-structures 24")
    assert json.loads(chg.stdout[chg.stdout.index("{"):])["family"] == "chgnet"


@pytest.mark.slow
def test_readme_mlflow_ui_command_serves_the_ui(studied, workspace):
    proc = subprocess.Popen(["bash", "-c", ".venv/bin/mlflow ui --backend-store-uri "
                             "sqlite:///mlflow.db --host 127.0.0.1"], cwd=workspace,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=workspace_env())
    try:
        deadline, status = time.time() + 120, None
        while time.time() < deadline and status is None:
            try:
                status = urllib.request.urlopen("http://127.0.0.1:5000/health", timeout=2).status
            except OSError:
                time.sleep(1)
        assert status == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
