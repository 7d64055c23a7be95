"""`matxfer predict --model NAME` ensembles one study's models only: the `fold<k>` aliases of a
registered model can point at different studies (a k=3 study after a k=5 one; a quickstart
`--folds 0` after a full study), told apart by the fingerprint tag registration sets."""

from __future__ import annotations

import pytest

from matxfer.errors import UserError
from matxfer.predict import resolve_models
from matxfer.tracking import Tracker

NAME = "matxfer-matbench_jdft2d"


@pytest.fixture
def tracker(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the store's artifacts go to ./mlruns
    return Tracker(uri, "matbench_jdft2d")


def register_study(tracker: Tracker, fingerprint: str, folds: range, tmp_path) -> None:
    """A study's fold models registered as `matxfer tune` registers them; each checkpoint
    file says which study and fold it is."""
    for k in folds:
        run_id = tracker.start_run(f"fold{k}", {}, ("matxfer.fold", f"{fingerprint}-{k}"))
        folder = tmp_path / "files" / fingerprint / f"fold{k}"
        folder.mkdir(parents=True)
        (folder / "checkpoint.pt").write_text(f"{fingerprint}/fold{k}")
        tracker.log_files(run_id, {"checkpoint.pt": folder / "checkpoint.pt"}, "best_model")
        tracker.register(run_id, NAME, k, fingerprint, "best_model")


def members(paths) -> list[str]:
    return sorted((p / "checkpoint.pt").read_text() for p in paths)


def test_the_fold_aliases_of_one_study_are_ensembled(tracker, tmp_path):
    register_study(tracker, "aaaa", range(5), tmp_path)
    assert members(resolve_models(NAME)) == [f"aaaa/fold{k}" for k in range(5)]


@pytest.mark.parametrize("second, folds", [("bbbb", range(3)), ("cccc", range(1))],
                         ids=["k3-after-k5", "quickstart-after-full"])
def test_fold_aliases_of_different_studies_are_refused_naming_the_studies(second, folds,
                                                                          tracker, tmp_path):
    register_study(tracker, "aaaa", range(5), tmp_path)
    register_study(tracker, second, folds, tmp_path)
    with pytest.raises(UserError) as refused:
        resolve_models(NAME)
    message = str(refused.value)
    assert "\n" not in message and "aaaa" in message and second in message, message
    assert f"{NAME}@{second}" in message or f"{NAME}@<fingerprint>" in message, message
    # one study's models by its fingerprint: every fold it registered, no other study's
    assert members(resolve_models(f"{NAME}@{second}")) == [f"{second}/fold{k}" for k in folds]
    assert members(resolve_models(f"{NAME}@aaaa")) == [f"aaaa/fold{k}" for k in range(5)]
    assert members(resolve_models(f"{NAME}@fold0")) == [f"{second}/fold0"]
