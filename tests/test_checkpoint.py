"""Checkpoints are self-contained (no foundation weights needed to predict), portable (no paths
of the machine that wrote them) and safe to load (weights-only: a pickled payload never runs)."""

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import matxfer
from matxfer.backbones.mace_arch import decode, encode
from matxfer.checkpoint import (
    CHECKPOINT_FILE,
    FORMAT_VERSION,
    convert_checkpoint,
    load_checkpoint,
)
from matxfer.config import load_config
from matxfer.errors import UserError
from matxfer.storage import load_checked, plain, save_checked, sha256_file


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch `matxfer train` output folder: (folder, run config)."""
    from matxfer.run import run_finetune

    cfg = load_config(overrides={
        "data.task": "matbench_jdft2d", "data.max_structures": 24, "data.val_fraction": 0.2,
        "train.epochs": 1, "train.batch_size": 8, "train.threads": 2,
        "model.head_hidden": [16]})
    out = tmp_path_factory.mktemp("trained") / "run"
    run_finetune(cfg, out, progress=False)
    return out, cfg


def original_model(folder: Path, cfg):
    """The fine-tuned model as the training process had it: the foundation model file rebuilt
    by build_model, with the checkpoint's weights."""
    from matxfer.model import build_model

    model = build_model(cfg.model)
    model.load_state_dict(load_checked(folder / CHECKPOINT_FILE)["model_state"])
    return model.eval()


def strings(tree):
    if isinstance(tree, str):
        yield tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from strings(v)


@pytest.mark.slow
def test_a_checkpoint_carries_what_prediction_needs_and_no_paths(trained):
    from matxfer.model import weights_file

    folder, cfg = trained
    payload = torch.load(folder / CHECKPOINT_FILE, weights_only=True)
    assert payload["format_version"] == FORMAT_VERSION
    assert payload["matxfer_version"] == matxfer.__version__
    assert payload["task_spec"] == {"name": "matbench_jdft2d", "target": "exfoliation_en",
                                    "unit": "meV/atom", "kind": "regression", "metric": "mae"}
    assert payload["foundation"] == {"init": "pretrained", "source": "small", "seed": 0,
                                     "sha256": sha256_file(weights_file("small"))}
    assert payload["backbone"]["class"] == "ScaleShiftMACE"
    assert payload["backbone"]["dtype"] == "float32"
    assert payload["head"] == {"pooling": "mean", "hidden": [16]}
    assert len(payload["z_table"]) == 89 and set(payload["scaler"]) >= {"mean", "std", "log"}
    assert "data_dir" not in payload["config"]["data"]
    assert "cache_dir" not in payload["config"]["data"]
    meta = {k: v for k, v in payload.items() if k != "model_state"}
    json.dumps(meta)  # every value outside the weights is plain JSON
    here = [str(Path.home()), str(folder.parent), os.getcwd()]
    assert not [s for s in strings(meta) if os.path.isabs(s) or any(h in s for h in here)]
    assert all(isinstance(t, torch.Tensor) for t in payload["model_state"].values())


def test_the_architecture_config_round_trips_through_json(backbone):
    from e3nn import o3
    from mace.tools.scripts_utils import extract_config_mace_model

    config = extract_config_mace_model(backbone)
    back = decode(json.loads(json.dumps(encode(config))))
    assert back.keys() == config.keys()
    assert back["hidden_irreps"] == o3.Irreps("128x0e") == config["hidden_irreps"]
    assert back["interaction_cls"] is config["interaction_cls"]
    assert back["readout_cls"] is config["readout_cls"]
    assert back["gate"] is config["gate"] is torch.nn.functional.silu
    assert np.array_equal(back["atomic_energies"], config["atomic_energies"])
    assert back["atomic_energies"].dtype == config["atomic_energies"].dtype
    assert torch.equal(back["atomic_numbers"], config["atomic_numbers"])
    with pytest.raises(ValueError, match="not a class of mace.modules"):
        decode({"__class__": "Popen"})


@pytest.mark.slow
def test_the_rebuilt_model_predicts_like_the_original(trained, jdft2d_graphs):
    from matxfer.graphs import collate

    folder, cfg = trained
    rebuilt, _, stored_cfg, _ = load_checkpoint(folder)
    original = original_model(folder, cfg)
    assert stored_cfg.model == cfg.model and stored_cfg.data.task == cfg.data.task
    state = rebuilt.state_dict()
    for name, value in original.state_dict().items():
        assert torch.equal(state[name], value), name
    batch = collate(jdft2d_graphs, list(range(32)))
    with torch.no_grad():
        a, b = original(batch)[0], rebuilt(batch)[0]
    # float32: a rebuilt architecture may hold e3nn constants that differ in the last
    # float64 digits, which can flip the last float32 bit of early products; over the
    # network's few hundred sequential operations that stays below ~1e-5 relative
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


def test_the_evaluation_warmup_prebuilds_what_loading_the_checkpoint_builds(trained):
    """While a study runs, EvaluationWarmup builds the first finished trial's architecture on
    a thread; loading the selected checkpoint afterwards copies that build (no second
    construction), and the copy predicts like a fresh build (tested above)."""
    from types import SimpleNamespace

    from matxfer.backbones.mace_arch import _built_backbone
    from matxfer.selection import EvaluationWarmup

    folder, _ = trained
    _built_backbone.cache_clear()
    warmup = EvaluationWarmup()
    finished = SimpleNamespace(last_result={}, checkpoint=SimpleNamespace(path=str(folder)))
    warmup.on_trial_complete(1, [], finished)
    warmup.on_trial_complete(2, [], finished)  # one build per study, not one per trial
    warmup.on_experiment_end([])
    assert _built_backbone.cache_info().misses == 1
    load_checkpoint(folder)
    info = _built_backbone.cache_info()
    assert (info.misses, info.hits) == (1, 1)


CLEAN_PREDICT = """
import sys
import matxfer
print("matxfer from", matxfer.__file__, file=sys.stderr)
from matxfer.cli import main
sys.exit(main())
"""


@pytest.mark.slow
def test_predict_needs_neither_foundation_weights_nor_data(trained, nacl, tmp_path):
    """A checkpoint folder copied to a 'laptop': no foundation weights (env, ../shared, mace's
    cache), no Matbench data, a copy of the package with no ../shared beside it."""
    from matxfer.predict import Predictor, predict_graphs, prepare

    folder, cfg = trained
    copied = tmp_path / "laptop" / "model"
    shutil.copytree(folder, copied)
    package = tmp_path / "site" / "matxfer"
    shutil.copytree(Path(matxfer.__file__).parent, package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_CACHE_HOME", "MATXFER_CACHE", "MLFLOW_TRACKING_URI")}
    env.update(MATXFER_MODEL="/nonexistent", MATMINER_DATA="/nonexistent",
               HOME=str(tmp_path / "home"), PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run(
        [sys.executable, "-c", CLEAN_PREDICT, "predict", "--model", str(copied), str(nacl)],
        cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the copied package ran, and building the backbone printed nothing else
    assert proc.stderr.splitlines() == [f"matxfer from {package / '__init__.py'}"], proc.stderr
    got = pd.read_csv(io.StringIO(proc.stdout))
    assert got["formula"].tolist() == ["NaCl"] and got["error"].isna().all()

    original = original_model(folder, cfg)
    payload = load_checked(folder / CHECKPOINT_FILE)
    bb = original.backbone
    from matxfer.graphs import GraphSpec

    spec = GraphSpec(tuple(int(z) for z in bb.atomic_numbers), float(bb.r_max), torch.float32)
    graphs, errors = prepare([nacl], spec)
    from matxfer.model import TargetScaler

    expected = predict_graphs(Predictor(original, TargetScaler.from_state(payload["scaler"]),
                                        cfg, "matbench_jdft2d"), graphs)
    assert not errors
    # float32 through a rebuilt architecture (see test_the_rebuilt_model_predicts_like_...)
    assert got["prediction"].iloc[0] == pytest.approx(float(expected[0]), rel=1e-5)


class Touch:
    """A pickled object that creates `marker` when unpickled (as a malicious file would)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_checkpoint_with_a_pickled_object_is_refused_without_running_it(tmp_path, nacl,
                                                                          capsys):
    from matxfer.cli import main

    control = tmp_path / "control"
    save_checked({"x": Touch(tmp_path / "control-ran")}, control)
    torch.load(control, weights_only=False)  # the payload is live: an unsafe load runs it
    assert (tmp_path / "control-ran").exists()

    folder, marker = tmp_path / "evil", tmp_path / "marker"
    save_checked({"format_version": FORMAT_VERSION, "model_state": {"w": torch.zeros(2)},
                  "task": "matbench_jdft2d", "extra": Touch(marker)}, folder / CHECKPOINT_FILE)
    code = main(["predict", "--model", str(folder), str(nacl), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("matxfer: error: refusing") and str(folder / CHECKPOINT_FILE) in err
    assert "allow-list" in err
    assert not marker.exists() and not (tmp_path / "p.csv").exists()


def old_payload(folder: Path, cfg, history) -> dict:
    """The checkpoint layout written before format 2 (from a format-2 one's weights)."""
    new = load_checked(folder / CHECKPOINT_FILE)
    config = cfg.model_dump()
    config["data"]["cache_dir"] = "/elsewhere/cache"  # a path of another machine
    return {"model_state": new["model_state"], "config": config, "scaler": new["scaler"],
            "task": "matbench_jdft2d", "z_table": new["z_table"], "matxfer_version": "0.1.0",
            "history": history}


@pytest.mark.slow
def test_an_old_checkpoint_is_refused_with_how_to_convert_it(trained, nacl, tmp_path, capsys):
    from matxfer.cli import main

    folder, cfg = trained
    old = tmp_path / "old"
    save_checked(old_payload(folder, cfg, [{"epoch": 1, "val_mae": 0.5}]), old / CHECKPOINT_FILE)
    tune_style = tmp_path / "tune-style" / CHECKPOINT_FILE  # numpy floats in its history
    save_checked(old_payload(folder, cfg, [{"epoch": 1, "val_mae": np.float64(0.5)}]),
                 tune_style)
    for path, needle in ((old, "old-format matxfer checkpoint"), (tune_style, "allow-list")):
        assert main(["predict", "--model", str(path), str(nacl)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and "matxfer checkpoint convert" in err


@pytest.mark.slow
def test_an_old_checkpoint_converts_to_the_current_format(trained, nacl, tmp_path):
    from matxfer.predict import predict_files

    folder, cfg = trained
    old = tmp_path / "old" / CHECKPOINT_FILE
    save_checked(old_payload(folder, cfg, [{"epoch": 1, "val_mae": np.float64(0.5)}]), old)
    from matxfer.cli import main

    # the README's command: a run folder in, a new folder out (gets checkpoint.pt)
    assert main(["checkpoint", "convert", str(old.parent), str(tmp_path / "v2")]) == 0
    assert (tmp_path / "v2" / CHECKPOINT_FILE).is_file()
    new = convert_checkpoint(old.parent, tmp_path / "new.pt")
    model, _, new_cfg, payload = load_checkpoint(new)
    assert payload["format_version"] == FORMAT_VERSION and payload["foundation"]["sha256"]
    assert payload["converted_from"] == {"matxfer_version": "0.1.0"}
    assert type(payload["history"][0]["val_mae"]) is float
    assert "cache_dir" not in payload["config"]["data"] and new_cfg.data.cache_dir is None
    state = model.state_dict()
    for name, value in load_checked(folder / CHECKPOINT_FILE)["model_state"].items():
        assert torch.equal(state[name], value), name
    want = predict_files(str(folder), [str(nacl)])["prediction"].iloc[0]
    assert predict_files(str(new), [str(nacl)])["prediction"].iloc[0] == want
    with pytest.raises(UserError, match="already in format"):
        convert_checkpoint(new, tmp_path / "again.pt")


def test_graph_caches_and_resume_states_load_weights_only(jdft2d_graphs, tmp_path):
    from matxfer.graphs import load_graph_set, save_graph_set
    from matxfer.train import TrainResult, training_state, warmup_cosine

    save_graph_set(jdft2d_graphs, tmp_path / "g.pt")
    torch.load(tmp_path / "g.pt", weights_only=True)
    again = load_graph_set(tmp_path / "g.pt")
    assert isinstance(again.targets, np.ndarray) and again.targets.dtype == np.float64
    assert np.array_equal(again.targets, jdft2d_graphs.targets)
    assert again.ids == jdft2d_graphs.ids and again.z_table == jdft2d_graphs.z_table

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = warmup_cosine(optimizer, 1, 4)
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step(), scheduler.step()
    history = [{"epoch": 1, "lr": 1e-3, "val_mae": np.float64(0.5), "n": np.int64(3)}]
    state = training_state(model, optimizer, scheduler, 1,
                           TrainResult(history, 1, np.float64(0.5), model.state_dict()))
    save_checked(plain(state), tmp_path / "resume.pt")  # as distributed.py writes it
    loaded = load_checked(tmp_path / "resume.pt")
    assert [type(v) for v in loaded["history"][0].values()] == [int, float, float, int]
    assert type(loaded["best_val"]) is float
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    warmup_cosine(fresh, 1, 4).load_state_dict(loaded["scheduler"])

