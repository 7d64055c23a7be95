"""The three ways to use the potential's physics (zero-shot, features, residual) through the
model, `matxfer train`, the descriptor cache, `matxfer predict`, a study variant and the report,
on the small labelled dataset the tests write (tests/datasets/own_data.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from ase.io import write

from matxfer.config import ModelConfig
from matxfer.model import TargetScaler, build_model
from matxfer.physics.calibration import calibrate, standardised
from matxfer.physics.config import PhysicsConfig

sys.path.insert(0, str(Path(__file__).parents[1] / "datasets"))
from own_data import crystals, molecule  # noqa: E402

DESCRIPTORS = ["phonon_max", "k_vrh"]


def matxfer(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matxfer.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900, env=dict(os.environ))


def physics_model(mode: str):
    cfg = ModelConfig(head_hidden=[8], physics=PhysicsConfig(mode=mode, descriptors=DESCRIPTORS))
    model = build_model(cfg)
    model.set_physics({"mean": np.array([300.0, 50.0]), "std": np.array([100.0, 10.0]),
                       "w": np.array([0.5, -0.2]), "b": np.array(0.1), "floor": np.array(0.0)},
                      IDENTITY)
    return model


IDENTITY = TargetScaler.from_state({"log": False, "classification": False, "mean": 0.0,
                                    "std": 1.0})


def tiny_batch(jdft2d_graphs, n_phys: int = 2) -> dict:
    from matxfer.graphs import collate

    jdft2d_graphs.descriptors = np.array([[400.0, 40.0], [np.nan, 60.0], [200.0, np.nan]]
                                         + [[300.0, 50.0]] * (len(jdft2d_graphs) - 3))
    try:
        return collate(jdft2d_graphs, [0, 1, 2])
    finally:
        jdft2d_graphs.descriptors = None


def test_residual_model_starts_at_the_calibrated_descriptors(jdft2d_graphs):
    model = physics_model("residual")
    batch = tiny_batch(jdft2d_graphs)
    out, pooled = model(batch)
    z = np.array([[1.0, -1.0], [0.0, 1.0], [-1.0, 0.0]])  # NaN -> 0
    np.testing.assert_allclose(out.detach().numpy(), z @ [0.5, -0.2] + 0.1, rtol=1e-6)
    assert len(pooled) == len(model.backbone.interactions)  # the backbone ran (head, BSS)


def test_features_mode_feeds_standardised_descriptors_to_the_head(jdft2d_graphs):
    plain = build_model(ModelConfig(head_hidden=[8]))
    model = physics_model("features")
    assert model.head[0].in_features == plain.head[0].in_features + 2
    batch = tiny_batch(jdft2d_graphs)
    out, _ = model(batch)
    batch["phys"][0, 0] = 9e9  # the descriptors reach the prediction
    assert model(batch)[0][0] != out[0] and torch.isfinite(model(batch)[0]).all()


def test_zero_shot_model_is_the_calibration_alone(jdft2d_graphs):
    model = physics_model("zero-shot")
    out, pooled = model(tiny_batch(jdft2d_graphs))
    assert pooled == []
    np.testing.assert_allclose(out.numpy(), [0.8, -0.1, -0.4], rtol=1e-6)


def write_salts(folder: Path) -> Path:
    path = folder / "salts.extxyz"
    write(path, crystals() + [molecule()], format="extxyz")
    return path


def run_yaml(folder: Path, data: Path, mode: str, **physics) -> Path:
    run = {"data": {"task": "salts", "fold": 1, "val_fraction": 0.2,
                    "cache_dir": str(folder / "cache"),
                    "source": {"path": str(data), "target": "y", "id_key": "id", "unit": "Å"},
                    "split": {"method": "kfold", "k": 4}},
           "train": {"epochs": 2, "batch_size": 8}, "model": {
               "head_hidden": [16], "physics": {"mode": mode, "descriptors": DESCRIPTORS,
                                                **physics}}}
    path = folder / f"run-{mode}.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`matxfer train` in each mode on the salts (the descriptor cache built by the first)."""
    folder = tmp_path_factory.mktemp("physics")
    data = write_salts(folder)
    runs = {}
    for mode in ("zero-shot", "residual", "features"):
        done = matxfer("train", "--config", str(run_yaml(folder, data, mode)), "--out",
                       f"out-{mode}", cwd=folder)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[mode] = done
    return folder, runs


@pytest.mark.slow
def test_descriptors_are_computed_once_and_reused_by_every_mode(trained):
    folder, runs = trained
    assert "physics descriptors: 25 structures" in runs["zero-shot"].stderr
    assert "physics descriptors:" not in runs["residual"].stderr  # from the cache
    # one file per group of descriptors: Γ phonons (phonon_max), elastic (k_vrh)
    assert len(list((folder / "cache").glob("salts-*-physics-*.pt"))) == 2


@pytest.mark.slow
def test_zero_shot_scores_the_training_fold_calibration_on_the_test_fold(trained):
    """Recomputed here from the cached descriptors and the written split: the calibration
    sees only training rows (not validation, not test) and the test fold is scored once."""
    from matxfer.storage import load_checked

    folder, _ = trained
    out = folder / "out-zero-shot"
    columns = {}  # descriptor -> {id: value}, from the group files
    for cache in (folder / "cache").glob("salts-*-physics-*.pt"):
        table = load_checked(cache)
        for j, name in enumerate(table["names"]):
            columns[name] = dict(zip(table["ids"], table["values"][:, j].numpy()))
    x = {i: np.array([columns[name][i] for name in DESCRIPTORS]) for i in columns["k_vrh"]}
    split = json.loads((out / "split.json").read_text())
    y = {a.info["id"]: a.info["y"] for a in crystals() + [molecule()]}
    train = np.array([y[i] for i in split["train"]])
    cal = calibrate(np.stack([x[i] for i in split["train"]]), train, False)  # task units
    test_x = np.stack([x[i] for i in split["test"]])
    pred = standardised(test_x, cal["mean"], cal["std"]) @ cal["w"] + cal["b"]
    mae = np.abs(pred - [y[i] for i in split["test"]]).mean()
    record = json.loads((out / "result.json").read_text())
    assert record["test_mae"] == pytest.approx(mae, rel=1e-4)
    assert record["epochs_run"] == 1


@pytest.mark.slow
def test_predict_recomputes_the_descriptors_of_new_structures(trained):
    folder, _ = trained
    out = folder / "out-residual"
    written = pd.read_csv(out / "predictions.csv")  # a molecule too, when in the test fold
    by_id = {a.info["id"]: a for a in crystals() + [molecule()]}
    files = []
    for mbid in written["mbid"]:
        write(folder / f"{mbid}.extxyz", by_id[mbid], format="extxyz")
        files.append(f"{mbid}.extxyz")
    done = matxfer("predict", "--model", str(out), *files, "--out", "pred.csv", cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = pd.read_csv(folder / "pred.csv", keep_default_na=False)
    assert (predicted["error"] == "").all(), predicted["error"]
    np.testing.assert_allclose(predicted["prediction"].astype(float), written["prediction"],
                               rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--physics", "residual"], "physics.mode 'residual' needs physics.descriptors"),
    (["--physics", "features", "--descriptors", "phonon_max,hardness"],
     "unknown descriptor 'hardness'; allowed: phonon_max"),
    (["--physics", "sideways", "--descriptors", "phonon_max"], "'sideways'"),
])
def test_bad_physics_settings_stop_train_with_one_line(flags, message, tmp_path):
    done = matxfer("train", "--task", "matbench_jdft2d", "--out", "out", *flags, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def write_salts_study(folder: Path, **settings) -> None:
    """study.yaml of a 1-epoch study of the salts (3 folds) in `folder`, tracking off."""
    data = write_salts(folder)
    study = {"folds": [0], "num_samples": 1, "asha": {"enabled": False},
             "storage_path": str(folder / "ray"), "output_dir": str(folder / "studies"),
             "tracking": {"enabled": False},
             "run": {"data": {"task": "salts", "val_fraction": 0.2,
                              "source": {"path": str(data), "target": "y", "id_key": "id"},
                              "split": {"method": "kfold", "k": 3}},
                     "train": {"epochs": 1, "batch_size": 8},
                     "model": {"head_hidden": [16], "physics": {"descriptors": DESCRIPTORS}}},
             **settings}
    (folder / "study.yaml").write_text(yaml.safe_dump(study))


@pytest.mark.slow
@pytest.mark.cluster
def test_physics_variants_run_as_studies_and_show_in_the_report(tmp_path):
    write_salts_study(tmp_path)
    for variant in ("zero-shot", "phys-residual"):
        done = matxfer("tune", "study.yaml", "--variant", variant, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    report = matxfer("report", "--results", "studies", "--out", "report", cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    table = (tmp_path / "report/table1.md").read_text()
    assert "MP0 physics zero-shot" in table and "MP0 physics residual" in table


@pytest.mark.slow
@pytest.mark.cluster
def test_descriptor_set_and_calibration_are_picked_per_fold_on_validation(tmp_path):
    """search.descriptors x search.calibration under phys-select: a grid of mode x set x
    calibration per fold; the fold's result is the trial with the best validation score,
    and result.json records its mode, set and calibration."""
    write_salts_study(tmp_path, folds=[0, 1],
                      search={"descriptors": [["phonon_max"], ["phonon_max", "k_vrh"]],
                              "calibration": ["linear", "huber"]})
    done = matxfer("tune", "study.yaml", "--variant", "phys-select", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 per fold (num_samples 1 raised" in done.stdout
    for fold in (0, 1):
        (folder,) = (tmp_path / "studies/salts/phys-select").glob(f"*/fold{fold}")
        trials = pd.read_csv(folder / "trials.csv")
        assert len(trials) == 8
        best = trials.loc[trials["best_val"].idxmin()]
        record = json.loads((folder / "result.json").read_text())
        assert record["val_mae"] == pytest.approx(best["best_val"])
        assert record["physics"] == best["config/physics"]
        assert "+".join(record["descriptors"]) == best["config/descriptors"]
        assert record["calibration"] == best["config/calibration"]


def test_physics_mode_is_searchable_and_needs_descriptors(tmp_path):
    from matxfer.config import derive, load_study_config
    from matxfer.errors import UserError
    from matxfer.search import trial_run_config

    root = Path(__file__).parents[2]
    phonons = root / "tune_configs/cpu/matbench_phonons.yaml"
    study = derive(load_study_config(phonons, {"search.physics": ["off", "residual"]},
                                     "no-reg"), {"search.descriptors": None})
    assert study.search.grid_size() == 4 and study.num_samples == 4  # x linear, huber
    cfg = trial_run_config(study, 0, {"physics": "residual", "calibration": "huber"})
    assert cfg.model.physics.mode == "residual"
    assert cfg.model.physics.descriptors == ["phdos_last_peak", "phonon_band_max"]
    study = load_study_config(phonons, {"search.physics": ["features"],
                                        "run.model.physics.descriptors": []}, "no-reg")
    assert study.physics_to_compute().descriptors == ["phdos_last_peak", "phonon_band_max"]
    with pytest.raises(UserError, match="search.physics needs run.model.physics.descriptors"):
        derive(study, {"search.descriptors": None})  # then nothing names a descriptor


def test_fingerprint_ignores_unused_descriptors_but_not_a_physics_mode():
    from matxfer.config import load_study_config
    from matxfer.identity import study_settings

    root = Path(__file__).parents[2]
    quick = root / "tune_configs/quickstart.yaml"
    def settings(**overrides):
        return study_settings(load_study_config(quick, overrides), "d" * 64, "w" * 64)

    plain = settings()
    assert not any(k.startswith(("run.model.physics", "search.physics")) for k in plain)
    assert settings(**{"run.model.physics.descriptors": ["phonon_max"]}) == plain
    assert settings(**{"run.model.physics.mode": "residual"}) != plain
    assert settings(**{"search.physics": ["off", "features"]}) != plain


def test_log_target_calibration_is_linear_in_the_target_and_clipped_at_the_floor(jdft2d_graphs):
    """A proxy proportional to the property: the calibration y = a x + b is fitted and applied
    in task units; a log-target model sees log(y) of it, standardised like the target."""
    model = physics_model("zero-shot")
    scaler = TargetScaler(np.array([100.0, 400.0, 900.0]), log=True)
    x = np.array([[100.0, 0.0], [400.0, 0.0], [900.0, 0.0]])
    cal = calibrate(x, 2.0 * x[:, 0] + 10.0, classification=False)
    model.set_physics(cal, scaler)
    batch = tiny_batch(jdft2d_graphs)
    batch["phys"] = torch.tensor([[250.0, 0.0], [-1e4, 0.0]], dtype=torch.float64)
    out, _ = model(batch)
    y = scaler.decode(out).numpy()
    assert y[0] == pytest.approx(510.0, rel=1e-6)
    assert y[1] == pytest.approx(cal["floor"], rel=1e-6)  # no log of a negative value
