"""Injected faults, each named: concurrent cache builders, truncated files."""

import subprocess
import sys

import pytest
from conftest import write_study_yaml

BUILD = """
import sys, torch
from matxfer.graphs import task_graphs
from matxfer.model import load_backbone
bb = load_backbone("small", "pretrained", 0, torch.float32)
g = task_graphs("matbench_jdft2d", [int(z) for z in bb.atomic_numbers], float(bb.r_max),
                torch.float32, sys.argv[1], progress=False)
print(len(g))
"""


def test_fault_two_processes_build_the_same_graph_cache_at_once(tmp_path):
    """Fault: two writers race on one cache file. Atomic rename: both finish, one intact file."""
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(cache)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert [o[0].strip().splitlines()[-1] for o in outs] == ["636", "636"]
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temporary file left behind
    from matxfer.graphs import load_graph_set

    assert len(load_graph_set(files[0])) == 636


def test_fault_truncated_checkpoint_is_refused_with_one_line(tmp_path, tiny_cfg, capsys):
    """Fault: a checkpoint cut in half (disk full, killed copy). predict refuses it, exit 2."""
    from matxfer.cli import main
    from matxfer.run import run_finetune

    tiny_cfg.train.epochs = 1
    run_finetune(tiny_cfg, tmp_path / "run", progress=False)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    (tmp_path / "x.cif").write_text("irrelevant")
    code = main(["predict", "--model", str(ckpt), str(tmp_path / "x.cif"),
                 "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "is not a matxfer checkpoint" in err and err.count("\n") == 1
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.slow
@pytest.mark.cluster
def test_fault_nan_loss_fails_one_trial_cleanly_and_the_study_goes_on(tmp_path, monkeypatch):
    """Fault: the first trial's loss turns NaN (MATXFER_FAULT_NAN_ONCE). That trial fails with
    the reason in trials.csv and on its MLflow run; the other trials and the test pass run."""
    import json

    import pandas as pd
    import ray
    from mlflow import MlflowClient

    from matxfer.config import load_study_config
    from matxfer.tune import run_study

    monkeypatch.setenv("MATXFER_FAULT_NAN_ONCE", str(tmp_path / "nan-fault-fired"))
    cfg = write_study_yaml(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", samples=3)
    try:
        run_study(load_study_config(cfg))
    finally:
        ray.shutdown()
    assert (tmp_path / "nan-fault-fired").exists()
    fold = tmp_path / "studies" / "matbench_jdft2d" / "main" / "fold0"
    trials = pd.read_csv(fold / "trials.csv", keep_default_na=False)
    failed = trials[trials["error"] != ""]
    assert len(trials) == 3 and len(failed) == 1, trials.to_string()
    assert "training loss became nan at epoch 1" in failed["error"].iloc[0]
    assert json.loads((fold / "result.json").read_text())["test_mae"] > 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("matbench_jdft2d").experiment_id])
    statuses = sorted(r.info.status for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert statuses == ["FAILED", "FINISHED", "FINISHED"]
    bad = [r for r in runs if r.info.status == "FAILED"][0]
    assert "training loss became nan" in bad.data.tags["error"]
