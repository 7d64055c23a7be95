"""A real two-node Ray cluster on loopback with token auth: `ray job submit` of the quickstart
study through cluster/submit.sh, trials on both nodes, runs in an MLflow server, an
unauthenticated submission refused, and every process stopped by its process group id."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_tracking import free_port, start_server, stop_server

ROOT = Path(__file__).parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port_block(size: int = 300) -> int:
    """A base port with `size` free ports above it."""
    for base in range(31000, 60000, 997):
        try:
            for port in range(base, base + size, 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free block of ports")


def refused(env: dict, dashboard: str) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", "submit", "--address", dashboard, "--", "echo", "hi"],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.cluster
def cluster_node_ids(env: dict) -> set[str]:
    """Ids of the cluster's alive nodes, through the authenticated state API."""
    out = subprocess.run([RAY, "list", "nodes", "--format", "json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return {n["node_id"] for n in json.loads(out.stdout) if n["state"] == "ALIVE"}


def test_two_node_cluster_runs_the_quickstart_job_and_refuses_strangers(tmp_path):
    import tempfile

    from mlflow import MlflowClient

    from matxfer.datasets.matbench import default_data_dir
    from matxfer.model import weights_file

    base = free_port_block()
    state = Path(tempfile.mkdtemp(prefix="mx-", dir="/tmp"))  # Ray's socket paths stay short
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(STATE_DIR=str(state), PORT_BASE=str(base), RAY=RAY, HOME=str(tmp_path / "home"))
    mlflow_port = free_port()
    mlflow_proc = start_server(tmp_path / "mlflow", mlflow_port)
    uri = f"http://127.0.0.1:{mlflow_port}"
    try:
        started = subprocess.run(["bash", str(ROOT / "cluster" / "local_cluster.sh"), "start"],
                                 env=env, timeout=300, capture_output=True, text=True)
        assert started.returncode == 0, (started.stdout + started.stderr)[-3000:]
        dashboard = f"http://127.0.0.1:{base + 1}"
        client_env = {**env, "RAY_ADDRESS": dashboard, "RAY_AUTH_MODE": "token",
                      "RAY_AUTH_TOKEN_PATH": str(state / "token"), "MLFLOW_TRACKING_URI": uri,
                      "MATMINER_DATA": str(default_data_dir()),
                      "MATXFER_MODEL": str(weights_file("small")),
                      "MATXFER_CACHE": os.environ["MATXFER_CACHE"], "JOB_PYTHON": sys.executable}
        job = subprocess.run(
            ["bash", str(ROOT / "cluster" / "submit.sh"), "tune_configs/quickstart.yaml",
             "--storage-path", str(tmp_path / "ray"), "--output-dir", str(tmp_path / "studies"),
             "--num-samples", "2", "--epochs", "1", "--max-structures", "32"],
            env=client_env, capture_output=True, text=True, timeout=1200, cwd=ROOT)
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "SUCCEEDED" in job.stdout
        job_id = re.search(r"^job: (\S+)$", job.stdout, re.M).group(1)
        status = subprocess.run(["bash", str(ROOT / "cluster" / "submit.sh"), "status", job_id],
                                env=client_env, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0 and "succeeded" in (status.stdout + status.stderr).lower()
        token = (state / "token").read_text().strip()
        assert token not in job.stdout + job.stderr  # the token is never logged

        # every trial trained on a node of this cluster (one node may serve both: a short
        # trial's process is reused for the next trial); two trials at once on 1-CPU nodes
        # is tests/test_scheduling.py's concurrent-placement test
        nodes = set()
        for path in (tmp_path / "ray").glob("*/_trial_*/result.json"):
            nodes |= {json.loads(line)["node_id"] for line in path.read_text().splitlines()}
        alive = cluster_node_ids(client_env)
        assert nodes and nodes <= alive and len(alive) == 2, (nodes, alive)

        client = MlflowClient(uri)
        runs = client.search_runs(
            [client.get_experiment_by_name("matbench_jdft2d").experiment_id])
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(runs) - len(children) == 1 and len(children) == 2

        # no token, and a wrong token: both refused, nothing runs
        no_token = {k: v for k, v in client_env.items() if not k.startswith("RAY_AUTH")}
        wrong = {**client_env, "RAY_AUTH_TOKEN": "0" * 64}
        wrong.pop("RAY_AUTH_TOKEN_PATH")
        # Ray's dashboard answers 401 "Missing authentication token" / 403 "Invalid
        # authentication token" (ray/_private/authentication/http_token_authentication.py)
        for bad, status, reason in ((no_token, "401", "missing authentication token"),
                                    (wrong, "403", "invalid authentication token")):
            out = refused(bad, dashboard)
            assert out.returncode != 0, out.stdout[-1000:]
            assert "submitted successfully" not in out.stdout + out.stderr
            text = (out.stdout + out.stderr).lower()
            assert status in text or reason in text, text[-1000:]
    finally:
        subprocess.run(["bash", str(ROOT / "cluster" / "local_cluster.sh"), "stop"], env=env,
                       timeout=120)
        stop_server(mlflow_proc)
    left = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True).stdout
    assert left.strip() == "", f"processes left behind: {left}"
    import shutil

    shutil.rmtree(state, ignore_errors=True)
