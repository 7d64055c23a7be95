"""Injected faults, each named: concurrent cache builders, damaged files, a full disk,
a NaN loss, a killed training worker."""

import subprocess
import sys

import pytest
from conftest import study_folder, study_identity, write_study_yaml

BUILD = """
import sys, torch
from matxfer.config import DataConfig
from matxfer.graphs import task_graphs
from matxfer.model import graph_spec, load_backbone
bb = load_backbone("small", "pretrained", 0, torch.float32)
g = task_graphs(DataConfig(task="matbench_jdft2d", cache_dir=sys.argv[1]), graph_spec(bb),
                progress=False)
print(len(g))
"""


def test_fault_two_processes_build_the_same_graph_cache_at_once(tmp_path):
    """Fault: two writers race on one cache file. Atomic renames: both finish, one intact file
    whose checksum matches."""
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(cache)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert [o[0].strip().splitlines()[-1] for o in outs] == ["636", "636"]
    files = sorted(cache.iterdir())  # the cache and its checksum, no temporary file left
    assert [f.suffix for f in files] == [".pt", ".sha256"]
    from matxfer.graphs import load_graph_set

    assert len(load_graph_set(files[0])) == 636  # verifies the checksum too


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch `matxfer train` output folder (checkpoint.pt + its .sha256)."""
    from matxfer.config import load_config
    from matxfer.run import run_finetune

    out = tmp_path_factory.mktemp("finished") / "run"
    run_finetune(load_config(overrides={
        "data.task": "matbench_jdft2d", "data.max_structures": 40, "data.val_fraction": 0.2,
        "train.epochs": 1, "train.batch_size": 8, "model.head_hidden": [32]}), out, progress=False)
    return out


def damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # one bit in the middle of the weights: torch.load alone would not notice
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "one flipped bit"])
def test_fault_damaged_checkpoint_is_refused_with_one_line(finished_run, tmp_path, capsys, how):
    """Fault: a checkpoint cut in half (disk full, killed copy) or with one flipped bit (bad
    disk, bad transfer). Its sha256 sidecar no longer matches: predict refuses it, exit 2."""
    import shutil

    from matxfer.cli import main

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run / "checkpoint.pt", how)
    (tmp_path / "x.cif").write_text("irrelevant")
    code = main(["predict", "--model", str(run), str(tmp_path / "x.cif"),
                 "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "does not match its checksum" in err and err.count("\n") == 1, err
    assert not (tmp_path / "p.csv").exists()


def test_fault_corrupted_graph_cache_is_detected_and_rebuilt(tmp_path, jdft2d_graphs):
    """Fault: one flipped bit in a cached graph file. The checksum catches it; the cache is
    rebuilt from the structures and matches the original."""
    import torch

    from matxfer.config import DataConfig
    from matxfer.graphs import GraphSpec, task_graphs

    args = (DataConfig(task="matbench_jdft2d", cache_dir=str(tmp_path)),
            GraphSpec(tuple(jdft2d_graphs.z_table), 6.0, torch.float32))
    task_graphs(*args, progress=False)
    (cache,) = tmp_path.glob("*.pt")
    damage(cache, "one flipped bit")
    with pytest.warns(UserWarning, match="rebuilding the graph cache.*checksum"):
        rebuilt = task_graphs(*args, progress=False)
    assert torch.equal(rebuilt.positions, jdft2d_graphs.positions)
    assert torch.equal(rebuilt.edge_index, jdft2d_graphs.edge_index)
    task_graphs(*args, progress=False)  # the rebuilt file verifies: no warning, no rebuild


def test_fault_full_disk_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """Fault: the output disk has 1 MiB left. `matxfer tune` and `matxfer train` stop before
    any training with one line naming the folder; nothing is written."""
    import shutil
    from collections import namedtuple

    from matxfer.cli import main

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))
    cfg = write_study_yaml(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["tune", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "has 1 MiB free; this run needs about" in err and err.count("\n") == 1, err
    assert main(["train", "--task", "matbench_jdft2d", "--out", str(tmp_path / "t")]) == 2
    assert "--out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def nan_once_hook(marker: str):
    """A Ray worker_process_setup_hook (test-only fault injection): in every Ray worker of the
    test's job, the first trial to create `marker` (and any retry of the same
    hyperparameters, as a real NaN would) sees a NaN training loss in its first epoch."""
    def install() -> None:
        import math
        import os

        import matxfer.train as train

        original = train.train_epoch

        def train_epoch(model, objective, optimizer, scheduler, data, cfg, *rest):
            row = original(model, objective, optimizer, scheduler, data, cfg, *rest)
            key = repr((cfg.regularizers.l2sp, cfg.regularizers.bss, cfg.train.lr))
            try:
                with os.fdopen(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY), "w") as fh:
                    fh.write(key)
                fires = True
            except FileExistsError:
                fires = open(marker).read() == key
            return {**row, "train_loss": math.nan} if fires else row

        train.train_epoch = train_epoch
    return install


@pytest.mark.slow
@pytest.mark.cluster
def test_fault_nan_loss_fails_one_trial_cleanly_and_the_study_goes_on(tmp_path):
    """Fault: the first trial's loss turns NaN (injected by a Ray worker setup hook). That
    trial fails with the reason in trials.csv and on its MLflow run; the other trial and the
    test pass run."""
    import json

    import pandas as pd
    import ray
    from mlflow import MlflowClient
    from ray import cloudpickle

    from matxfer.config import load_study_config
    from matxfer.tune import pinned_local_address, run_study

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with pinned_local_address():
        ray.init(address="local", num_cpus=2, log_to_driver=False, logging_level="ERROR",
                 _node_ip_address="127.0.0.1", include_dashboard=True,
                 dashboard_host="127.0.0.1", runtime_env={
                     "worker_process_setup_hook": nan_once_hook(str(tmp_path / "nan-fault-fired"))})
    cfg = write_study_yaml(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", samples=2)
    try:
        run_study(load_study_config(cfg))  # on the Ray instance started above
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert (tmp_path / "nan-fault-fired").exists()
    fold = study_folder(tmp_path / "studies") / "fold0"
    trials = pd.read_csv(fold / "trials.csv", keep_default_na=False)
    failed = trials[trials["error"] != ""]
    assert len(trials) == 2 and len(failed) == 1, trials.to_string()
    assert "training loss became nan at epoch 1" in failed["error"].iloc[0]
    assert json.loads((fold / "result.json").read_text())["test_mae"] > 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("matbench_jdft2d").experiment_id])
    statuses = sorted(r.info.status for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert statuses == ["FAILED", "FINISHED"]
    bad = [r for r in runs if r.info.status == "FAILED"][0]
    assert "training loss became nan" in bad.data.tags["error"]


def _our_train_workers(tag: str) -> list[int]:
    """PIDs of the processes that train for this test's study (they inherit its
    MATXFER_TEST_TAG): a one-worker trial trains in its Tune trial actor (ImplicitFunc)."""
    import os

    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = open(f"/proc/{pid}/cmdline", "rb").read()
            env = open(f"/proc/{pid}/environ", "rb").read()
        except OSError:
            continue
        if title.startswith(b"ray::ImplicitFunc") and f"MATXFER_TEST_TAG={tag}".encode() in env:
            pids.append(int(pid))
    return pids


@pytest.mark.slow
@pytest.mark.cluster
def test_fault_killed_training_worker_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    """Fault: SIGKILL of the process training the trial after its first epoch. Tune
    restarts the trial, which continues from the checkpoint's training state: every epoch is
    reported once, the trial and the study finish, MLflow holds one curve."""
    import os
    import signal
    import threading
    import time
    import uuid

    import pandas as pd
    import ray
    from mlflow import MlflowClient

    from matxfer.config import load_study_config
    from matxfer.tune import run_study

    tag = uuid.uuid4().hex
    monkeypatch.setenv("MATXFER_TEST_TAG", tag)
    cfg = write_study_yaml(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", samples=1, epochs=6)
    killed: list[int] = []
    experiment = tmp_path / "ray" / study_identity(cfg).run_name(0)

    def kill_after_first_checkpoint() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            # Tune has the epoch-1 report, so Ray Train has registered its checkpoint
            progress = list(experiment.glob("*/progress.csv"))
            if progress and len(progress[0].read_text().splitlines()) >= 2:
                for pid in _our_train_workers(tag):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    try:
        run_study(load_study_config(cfg))
    finally:
        ray.shutdown()
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    (progress,) = experiment.glob("*/progress.csv")
    reports = pd.read_csv(progress)
    assert sorted(reports["epoch"]) == [1, 2, 3, 4, 5, 6]  # nothing lost, nothing repeated
    assert reports["resumed_from_epoch"].max() >= 1  # the new workers did not start over
    assert (study_folder(tmp_path / "studies") / "fold0" / "result.json").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (child,) = [r for r in client.search_runs(
        [client.get_experiment_by_name("matbench_jdft2d").experiment_id])
        if "mlflow.parentRunId" in r.data.tags]
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_mae")]
    assert child.info.status == "FINISHED" and sorted(steps) == [1, 2, 3, 4, 5, 6]
