"""MLflow: a real tracking server subprocess on a free loopback port, SQLite behind it."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import study_folder, write_study_yaml

from matxfer.errors import UserError
from matxfer.tracking import Tracker, check_reachable

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
START_SCRIPT = Path(__file__).parents[1] / "mlflow_server" / "start.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int, mode: str = "sqlite", **env) -> subprocess.Popen:
    """The project's own start script on a free loopback port."""
    env = {**os.environ, "PORT": str(port), "WORKERS": "1", "DATA_DIR": str(folder),
           "MLFLOW": MLFLOW, **env}
    proc = subprocess.Popen(["bash", str(START_SCRIPT), mode], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: see stop_server
    proc.port = port
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server this test started and its app workers: its process group, by id."""
    import signal

    group = proc.pid  # start_new_session: the group id is the script's pid
    if not _group_alive(group):  # stopped already (a test that restarts its server)
        proc.wait(timeout=30)
        return
    os.killpg(group, signal.SIGTERM)
    try:
        proc.wait(timeout=30)  # the server itself
    except subprocess.TimeoutExpired:
        pass
    if _group_alive(group):  # app workers the server left behind, or a server that hung
        os.killpg(group, signal.SIGKILL)
    proc.wait(timeout=30)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def server(tmp_path):
    port = free_port()
    proc = start_server(tmp_path / "server", port)
    yield f"http://127.0.0.1:{port}", proc, tmp_path / "server", port
    stop_server(proc)


def test_unreachable_server_is_a_user_error_before_any_training(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=f"MLflow tracking server {uri} is unreachable"):
        check_reachable(uri, timeout=2)
    from matxfer.cli import main

    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"folds: [0]\noutput_dir: {tmp_path / 'studies'}\n"
                   f"storage_path: {tmp_path / 'ray'}\ntracking: {{uri: '{uri}'}}\n")
    assert main(["tune", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "is unreachable" in err and err.count("\n") == 1
    assert not (tmp_path / "studies").exists() and not (tmp_path / "ray").exists()


@pytest.mark.slow
def test_metrics_logged_while_the_server_is_down_are_not_lost(server):
    uri, proc, folder, port = server
    assert (folder / "mlflow.db").exists()  # the start script's SQLite store
    tracker = Tracker(uri, "restart-test", retries=2, backoff_s=0.2)
    run_id = tracker.start_run("r", {}, ("matxfer.study", "restart"))
    tracker.log_metrics(run_id, {"val_mae": 1.0}, step=1)
    stop_server(proc)
    tracker.log_metrics(run_id, {"val_mae": 2.0}, step=2)  # buffered, does not raise
    assert tracker.pending[run_id]
    restarted = start_server(folder, port)
    try:
        tracker.log_metrics(run_id, {"val_mae": 3.0}, step=3)
        history = tracker.client.get_metric_history(run_id, "val_mae")
        assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    finally:
        stop_server(restarted)


@pytest.mark.slow
@pytest.mark.cluster
def test_study_logs_over_http_registers_and_predict_uses_the_registry(server, tmp_path,
                                                                     monkeypatch):
    import ray
    from mlflow import MlflowClient
    from pymatgen.core import Lattice, Structure

    from matxfer.config import load_study_config
    from matxfer.tune import run_study

    uri = server[0]
    cfg = write_study_yaml(tmp_path, uri, concurrent=2, experiment="http-test")
    try:
        run_study(load_study_config(cfg))
    finally:
        ray.shutdown()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("http-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.data.tags["model_sha256"] and parent.data.tags["git_commit"]
    for child in children:
        assert child.data.params["init"] == "pretrained"
        history = client.get_metric_history(child.info.run_id, "val_mae")
        assert len(history) == 2  # epochs run (ASHA off)
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"learning_curve.png", "history.csv", "best_checkpoint"} <= names
    ckpt_dir = client.download_artifacts(children[0].info.run_id, "best_checkpoint",
                                         str(tmp_path / "dl"))
    payload = torch.load(Path(ckpt_dir) / "checkpoint.pt", weights_only=True)
    assert payload["task"] == "matbench_jdft2d" and "model_state" in payload
    fp = json.loads(next((tmp_path / "studies").glob("*/*/*/fold0/result.json")).read_text())[
        "fingerprint"]
    assert client.get_registered_model("matxfer-matbench_jdft2d").aliases == {
        "fold0": "1", f"fold0-{fp}": "1"}

    structure = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    structure.to(filename=str(tmp_path / "nacl.cif"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "pred.csv"
    proc = subprocess.run([sys.executable, "-m", "matxfer.cli", "predict", "--model",
                           "matxfer-matbench_jdft2d@fold0", str(tmp_path / "nacl.cif"),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import pandas as pd

    table = pd.read_csv(out)
    assert table.loc[0, "formula"] == "NaCl" and table.loc[0, "prediction"] > 0
    result = json.loads((study_folder(tmp_path / "studies") / "fold0" /
                         "result.json").read_text())
    assert result["mlflow_run_id"] == parent.info.run_id


@pytest.mark.slow
def test_postgres_mode_creates_its_database_and_stores_runs(tmp_path):
    """mlflow_server/start.sh postgres against Debian's PostgreSQL (.ci/run installs it)."""
    import shutil

    if shutil.which("psql") is None or os.geteuid() != 0:
        pytest.skip("needs Debian's postgresql and root (installed by .ci/run)")
    port = free_port()
    env = {**os.environ, "PORT": str(port), "WORKERS": "1", "DATA_DIR": str(tmp_path),
           "MLFLOW": MLFLOW, "MATXFER_PG_PASSWORD": "ci-only-password",
           "PGDB": "matxfer_test", "PGUSER_NAME": "matxfer_test"}
    proc = subprocess.Popen(["bash", str(START_SCRIPT), "postgres"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    proc.port = port
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, "start.sh postgres exited"
                time.sleep(1)
        tracker = Tracker(f"http://127.0.0.1:{port}", "pg-test")
        run_id = tracker.start_run("r", {}, ("matxfer.study", "pg"))
        tracker.log_metrics(run_id, {"val_mae": 1.5}, step=1)
        rows = subprocess.run(["su", "postgres", "-c",
                               "psql -qtAc 'select count(*) from runs' matxfer_test"],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert int(rows) >= 1  # the run lives in PostgreSQL, not in a SQLite file
        assert not (tmp_path / "mlflow.db").exists()
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_basic_auth_mode_needs_credentials(tmp_path, monkeypatch):
    """start.sh basic-auth: the right user logs runs; without credentials `matxfer tune` stops
    with one line, exit 2, before writing anything."""
    password = "ci-only-password-1"
    port = free_port()
    proc = start_server(tmp_path / "server", port, "basic-auth", MLFLOW_ADMIN_PASSWORD=password)
    uri = f"http://127.0.0.1:{port}"
    try:
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.delenv(name, raising=False)
        cfg = write_study_yaml(tmp_path, uri, experiment="tiny")
        out = subprocess.run([sys.executable, "-m", "matxfer.cli", "tune", str(cfg)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "refused the request (UNAUTHENTICATED)" in out.stderr
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
        assert not (tmp_path / "studies").exists() and not (tmp_path / "ray").exists()
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        tracker = Tracker(uri, "auth-test", retries=0)
        run_id = tracker.start_run("r", {}, ("matxfer.study", "auth"))
        tracker.log_metrics(run_id, {"val_mae": 1.0}, step=1)
        assert tracker.client.get_metric_history(run_id, "val_mae")[0].value == 1.0
        ini = tmp_path / "server" / "basic_auth.ini"  # holds the admin password: owner only
        assert oct(ini.stat().st_mode)[-3:] == "600"
    finally:
        stop_server(proc)


@pytest.mark.slow
@pytest.mark.cluster
def test_study_completes_across_a_tracking_server_restart(server, tmp_path):
    """Stop the server after the first epoch metric lands, keep it down while the study trains,
    restart it on the same port: the study ends 0 and every epoch of every trial is there."""
    from mlflow import MlflowClient

    uri, proc, folder, port = server
    epochs = 3
    cfg = write_study_yaml(tmp_path, uri, epochs=epochs, experiment="tiny")
    driver = subprocess.Popen([sys.executable, "-m", "matxfer.cli", "tune", str(cfg)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(uri)

    def logged_epochs() -> int:
        exp = client.get_experiment_by_name("tiny")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return sum(len(client.get_metric_history(r.info.run_id, "val_mae")) for r in runs
                   if "mlflow.parentRunId" in r.data.tags)

    deadline = time.time() + 400
    while driver.poll() is None and time.time() < deadline and logged_epochs() == 0:
        time.sleep(0.5)
    assert driver.poll() is None, "the study ended before the server could be stopped"
    stop_server(proc)
    time.sleep(15)  # the study trains on with the server down
    restarted = start_server(folder, port)
    try:
        _, err = driver.communicate(timeout=600)
        assert driver.returncode == 0, err[-2000:]
        exp = client.get_experiment_by_name("tiny")
        runs = client.search_runs([exp.experiment_id])
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(children) == 2 and len(runs) == 3
        for child in children:
            steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_mae")]
            assert sorted(steps) == list(range(1, epochs + 1))  # nothing lost, nothing doubled
            assert child.info.status == "FINISHED"
        parent, = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert parent.data.metrics["test_mae"] > 0
    finally:
        stop_server(restarted)


def test_trial_runs_a_killed_driver_left_open_are_completed_from_the_trials_records(tmp_path):
    """A driver killed after Tune saw a trial end, before its MLflow worker logged the last
    epoch and ended the run: the rerun's `complete_trial_runs` logs the missing epoch, the
    files, and ends it; runs that were finished, or belong to another fold, are untouched."""
    from types import SimpleNamespace

    import pandas as pd
    from mlflow import MlflowClient

    from matxfer.trial_logger import complete_trial_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "repair")
    parent = tracker.start_run("fold0", {}, ("matxfer.fold", "f0"))
    other_parent = tracker.start_run("fold1", {}, ("matxfer.fold", "f1"))
    left_open = tracker.start_run("trial-a", {"mlflow.parentRunId": parent},
                                  ("matxfer.trial_id", "study-fold0/a"))
    finished = tracker.start_run("trial-b", {"mlflow.parentRunId": parent},
                                 ("matxfer.trial_id", "study-fold0/b"))
    other_fold = tracker.start_run("trial-a", {"mlflow.parentRunId": other_parent},
                                   ("matxfer.trial_id", "study-fold1/a"))
    tracker.log_metrics(left_open, {"val_mae": 3.0, "train_loss": 1.0}, step=1)
    tracker.end_run(finished)
    history = pd.DataFrame({"epoch": [1, 2], "val_mae": [3.0, 2.0], "train_loss": [1.0, 0.5],
                            "task_loss": [1.0, 0.5], "l2sp_term": [0.0, 0.0],
                            "bss_term": [0.0, 0.0], "lr": [1e-3, 1e-3]})

    def result(trial_id: str):
        return SimpleNamespace(metrics={"trial_id": trial_id}, metrics_dataframe=history,
                               error=None, checkpoint=None)

    assert complete_trial_runs(tracker, parent, "val_mae", [result("a"), result("b")]) == 1
    client = MlflowClient(uri)
    run = client.get_run(left_open)
    assert run.info.status == "FINISHED"
    steps = sorted((m.step, m.value) for m in client.get_metric_history(left_open, "val_mae"))
    assert steps == [(1, 3.0), (2, 2.0)]  # epoch 1 not logged twice
    assert {a.path for a in client.list_artifacts(left_open)} == {"history.csv",
                                                                   "learning_curve.png"}
    assert client.get_run(finished).info.status == "FINISHED"
    assert not client.list_artifacts(finished)
    assert client.get_run(other_fold).info.status == "RUNNING"
    assert complete_trial_runs(tracker, parent, "val_mae", [result("a")]) == 0  # idempotent
