"""Nothing a received file names is ever unpickled: a checkpoint's `model.source` and
`foundation.path` never choose what `predict`, `analyze drift` or `checkpoint convert` load.
The foundation weights come only from a known name (MATXFER_MODEL, ../shared, mace's cache)
or a `--foundation PATH` the user passes, and their SHA-256 is checked before they are loaded."""

from __future__ import annotations

import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch

from matxfer.checkpoint import CHECKPOINT_FILE, build_payload
from matxfer.cli import main
from matxfer.config import load_config
from matxfer.model import TargetScaler, build_model, weights_file
from matxfer.storage import save_checked, sha256_file
from matxfer.tasks import get_task

IDENTITY = TargetScaler.from_state({"log": False, "classification": False, "mean": 0.0,
                                    "std": 1.0})


class Touch:
    """Creates `marker` when unpickled, as a malicious file would run its code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def run_config(physics: bool = False, init: str = "pretrained"):
    overrides = {"data.task": "matbench_jdft2d", "data.max_structures": 24,
                 "data.val_fraction": 0.2, "model.head_hidden": [8], "model.init": init}
    if physics:
        overrides["model.physics"] = {"mode": "residual", "descriptors": ["energy_per_atom"]}
    return load_config(overrides=overrides)


def real_payload(physics: bool = False, init: str = "pretrained") -> dict:
    """A genuine format-2 checkpoint payload (untrained head: what drift or predict reads)."""
    cfg = run_config(physics, init)
    model = build_model(cfg.model)
    if physics:
        model.set_physics({"mean": np.array([-4.0]), "std": np.array([1.0]),
                           "w": np.array([0.5]), "b": np.array(0.1), "floor": np.array(0.0)},
                          IDENTITY)
    return build_payload(model, cfg, get_task("matbench_jdft2d"), IDENTITY,
                         model.graph_spec().z_table)


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """(a 'model file' holding a live pickle, the marker it creates when unpickled)."""
    marker, path = tmp_path / "PWNED", tmp_path / "ckpt" / "foundation.model"
    path.parent.mkdir()
    torch.save(Touch(marker), path)
    return path, marker


def crafted(payload: dict, folder: Path, source: str, path: str | None,
            sha256: str | None) -> Path:
    """`payload` with its foundation fields chosen by an attacker, saved (checksummed) in
    `folder` beside the attacker's file."""
    payload["config"]["model"]["source"] = source
    payload["foundation"].update(source=Path(source).name, sha256=sha256)
    payload["foundation"].pop("path", None)
    if path is not None:
        payload["foundation"]["path"] = path
    save_checked(payload, folder / CHECKPOINT_FILE)
    return folder


ATTACKS = ["source-names-the-file", "small-with-a-path", "no-sha256"]


def attack(name: str, evil_file: Path) -> tuple[str, str | None, str | None]:
    """(config.model.source, foundation.path, foundation.sha256) of each crafted checkpoint."""
    sha = sha256_file(evil_file)
    return {"source-names-the-file": (str(evil_file), str(evil_file), sha),
            "small-with-a-path": ("small", str(evil_file), sha),
            "no-sha256": (str(evil_file), str(evil_file), None)}[name]


def one_line_refusal(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("matxfer: error:"), err
    return err


@pytest.mark.parametrize("how", ATTACKS)
def test_predict_never_unpickles_the_foundation_file_a_checkpoint_names(how, evil, nacl,
                                                                        tmp_path, capsys):
    evil_file, marker = evil
    folder = crafted(real_payload(physics=True), evil_file.parent, *attack(how, evil_file))
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(folder), str(nacl), "--out", str(out)]) == 2
    err = one_line_refusal(capsys)
    assert not marker.exists() and not out.exists()
    assert "--foundation" in err or "sha256" in err.lower(), err


def test_predict_with_physics_uses_a_known_name_checked_against_the_recorded_sha256(
        nacl, tmp_path, capsys):
    folder = tmp_path / "ok"
    save_checked(real_payload(physics=True), folder / CHECKPOINT_FILE)
    assert main(["predict", "--model", str(folder), str(nacl), "--out",
                 str(tmp_path / "p.csv")]) == 0
    assert "NaCl" in (tmp_path / "p.csv").read_text()


def test_predict_with_physics_takes_a_model_file_only_from_the_command_line(evil, nacl,
                                                                             tmp_path, capsys):
    evil_file, marker = evil
    small = weights_file("small")
    folder = crafted(real_payload(physics=True), tmp_path, "my-mace.model",
                     "/train/host/my-mace.model", sha256_file(small))
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(folder), str(nacl), "--out", str(out)]) == 2
    err = one_line_refusal(capsys)
    assert "'my-mace.model'" in err and "--foundation" in err and not out.exists()
    # a file the user names but that is not the checkpoint's: refused before it is loaded
    assert main(["predict", "--model", str(folder), str(nacl), "--out", str(out),
                 "--foundation", str(evil_file)]) == 2
    err = one_line_refusal(capsys)
    assert "sha256" in err and not marker.exists() and not out.exists()
    assert main(["predict", "--model", str(folder), str(nacl), "--out", str(out),
                 "--foundation", str(small)]) == 0
    assert "NaCl" in out.read_text()


@pytest.mark.parametrize("how", ATTACKS)
def test_drift_of_a_checkpoint_never_unpickles_the_file_it_names(how, evil, tmp_path, capsys):
    evil_file, marker = evil
    folder = crafted(real_payload(), evil_file.parent, *attack(how, evil_file))
    assert main(["analyze", "drift", "--checkpoint", str(folder), "--max-structures", "8",
                 "--out", str(tmp_path / "drift"), "--tracking-uri", "off"]) == 2
    one_line_refusal(capsys)
    assert not marker.exists() and not (tmp_path / "drift").exists()


def test_drift_of_a_logged_run_never_unpickles_the_file_its_checkpoint_names(evil, tmp_path,
                                                                            capsys):
    from mlflow import MlflowClient

    evil_file, marker = evil
    folder = crafted(real_payload(), evil_file.parent, *attack("small-with-a-path", evil_file))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("received",
                                                     artifact_location=str(tmp_path / "art")))
    for name in (CHECKPOINT_FILE, CHECKPOINT_FILE + ".sha256"):
        client.log_artifact(run.info.run_id, str(folder / name), "best_model")
    assert main(["analyze", "drift", "--run", run.info.run_id, "--max-structures", "8",
                 "--out", str(tmp_path / "drift"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err  # after mlflow's download progress bars
    assert err.endswith("\n") and err.splitlines()[-1].startswith("matxfer: error:"), err
    assert not marker.exists() and not (tmp_path / "drift").exists()


def test_drift_of_a_random_init_checkpoint_rebuilds_its_start_without_any_file(evil, tmp_path,
                                                                              capsys):
    """θ0 of init=random is the seeded twin of the stored architecture: no file is read."""
    import json

    evil_file, marker = evil
    folder = crafted(real_payload(init="random"), evil_file.parent, str(evil_file),
                     str(evil_file), None)
    assert main(["analyze", "drift", "--checkpoint", str(folder), "--max-structures", "8",
                 "--out", str(tmp_path / "drift"), "--tracking-uri", "off"]) == 0
    assert not marker.exists()
    result = json.loads((tmp_path / "drift" / "drift.json").read_text())
    assert all(v == 0.0 for v in result["drift"].values())  # untrained: θ == θ0 exactly


def test_the_random_start_rebuilt_from_the_architecture_is_the_one_training_built():
    from matxfer.checkpoint import starting_model

    cfg = run_config(init="random")
    payload = real_payload(init="random")
    built = build_model(cfg.model).state_dict()
    rebuilt = starting_model(payload, cfg.model).state_dict()
    assert built.keys() == rebuilt.keys()
    for name, value in built.items():
        assert torch.equal(value, rebuilt[name]), name


def test_convert_unpickles_only_the_old_file_the_user_names(evil, tmp_path, capsys):
    evil_file, marker = evil
    old = real_payload()
    old.pop("format_version")
    old["config"]["model"]["source"] = str(evil_file)  # what an old checkpoint names
    save_checked(old, tmp_path / "old" / CHECKPOINT_FILE)
    new = tmp_path / "new"
    assert main(["checkpoint", "convert", str(tmp_path / "old"), str(new)]) == 2
    err = one_line_refusal(capsys)
    assert "--foundation" in err and not marker.exists() and not new.exists()
    # named on the command line, the foundation is the user's choice
    small = weights_file("small")
    assert main(["checkpoint", "convert", str(tmp_path / "old"), str(new), "--foundation",
                 str(small)]) == 0
    assert (new / CHECKPOINT_FILE).is_file() and not marker.exists()


class Marker:
    """What a DataFrame JSON may name (`@module`/`@class`): its reader imports the module and
    calls the class's from_dict, here creating the marker file the dict names."""

    @classmethod
    def from_dict(cls, d: dict):
        Path(d["marker"]).touch()
        return cls()


def test_drift_never_decodes_objects_in_a_data_file_the_checkpoint_names(tmp_path, capsys):
    import json

    marker, data = tmp_path / "DECODED", tmp_path / "ckpt" / "data.json"
    data.parent.mkdir()
    row = {"@module": __name__, "@class": "Marker", "marker": str(marker)}
    data.write_text(json.dumps({"columns": ["structure", "y"], "index": [0],
                                "data": [[row, 1.0]]}))
    payload = real_payload()
    payload["config"]["data"].update(
        task="received", fold=0, source={"path": str(data), "target": "y"},
        split={"method": "kfold", "k": 2})
    save_checked(payload, data.parent / CHECKPOINT_FILE)
    args = ["analyze", "drift", "--checkpoint", str(data.parent), "--max-structures", "8",
            "--out", str(tmp_path / "drift"), "--tracking-uri", "off"]
    assert main(args) == 2
    err = one_line_refusal(capsys)
    assert "--data" in err and not marker.exists() and not (tmp_path / "drift").exists()


def test_drift_reads_your_data_from_the_path_you_pass():
    from matxfer.analysis.drift_analysis import received_data
    from matxfer.errors import UserError

    own = load_config(overrides={"data.task": "received", "data.split": {"k": 2},
                                 "data.source": {"path": "/train/host/data.json",
                                                 "target": "y"}})
    assert received_data(own, "mine/data.json").data.source.path == "mine/data.json"
    with pytest.raises(UserError, match="--data PATH"):
        received_data(own, None)
    with pytest.raises(UserError, match="--data applies to a checkpoint of your own data"):
        received_data(run_config(), "mine/data.json")
