"""Settings matxfer gives Ray, Tune and MLflow through the environment hold only where
matxfer needs them; the process environment is left as it was."""

import os

from matxfer.config import derive
from matxfer.scoped_env import scoped_env


def test_scoped_env_sets_for_the_block_and_restores_after(monkeypatch):
    monkeypatch.delenv("MX_A", raising=False)
    monkeypatch.setenv("MX_B", "user")
    with scoped_env({"MX_A": "1", "MX_B": "2"}):
        assert os.environ["MX_A"] == "1" and os.environ["MX_B"] == "user"  # the user's wins
    assert "MX_A" not in os.environ and os.environ["MX_B"] == "user"
    with scoped_env({"MX_B": "2"}, override=True):
        assert os.environ["MX_B"] == "2"
    assert os.environ["MX_B"] == "user"


def test_mlflow_fails_fast_inside_tracker_calls_only(tmp_path, monkeypatch):
    from matxfer.tracking import Tracker

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "scoped")
    assert tracker.call(os.environ.get, "MLFLOW_HTTP_REQUEST_MAX_RETRIES") == "1"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_tune_snapshots_every_2_s_on_local_storage_only():
    from matxfer.config import load_study_config
    from matxfer.tune import snapshot_env

    study = load_study_config("tune_configs/quickstart.yaml")
    assert snapshot_env(study) == {"TUNE_GLOBAL_CHECKPOINT_S": "2"}
    study = derive(study, {"storage_path": "s3://bucket/matxfer"})
    assert snapshot_env(study) == {}
