"""The search service: config, search space, and a real (tiny) study on a local Ray instance."""

import json
import os

import numpy as np
import optuna
import pandas as pd
import pytest
from conftest import study_folder, study_identity, write_study_yaml

from matxfer.config import load_study_config
from matxfer.errors import UserError
from matxfer.search import DefineSpace, trial_run_config
from matxfer.storage import load_checked


@pytest.fixture
def study_yaml(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(
        "folds: [0]\nnum_samples: 2\nmax_concurrent_trials: 1\n"
        f"storage_path: {tmp_path / 'ray'}\noutput_dir: {tmp_path / 'studies'}\n"
        f"tracking: {{uri: 'sqlite:///{tmp_path / 'mlflow.db'}'}}\n"
        "scaling: {num_workers: 2, cpus_per_worker: 1}\n"
        "run:\n  data: {task: matbench_jdft2d, max_structures: 40, val_fraction: 0.2}\n"
        "  train: {epochs: 2, batch_size: 8}\n  model: {head_hidden: [32]}\n")
    return path


def test_space_proposes_log_uniform_values_or_off(study_yaml):
    study = load_study_config(study_yaml)
    space = DefineSpace(study.search)
    off = optuna.trial.FixedTrial({"l2sp_on": False, "bss_on": True, "bss": 3e-3})
    space(off)
    cfg = trial_run_config(study, 3, off.params)
    assert (cfg.data.fold, cfg.regularizers.l2sp, cfg.regularizers.bss) == (3, 0.0, 3e-3)
    study_opt = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(20):
        trial = study_opt.ask()
        space(trial)
        for name, rng in (("l2sp", study.search.l2sp), ("bss", study.search.bss)):
            if trial.params[f"{name}_on"]:
                assert rng.low <= trial.params[name] <= rng.high
        study_opt.tell(trial, 1.0)


def test_a_searched_lr_sets_backbone_lr_by_the_explicit_ratio(study_yaml):
    lr = {"low": 1e-4, "high": 1e-2}
    study = load_study_config(study_yaml, {"search.lr": lr, "search.backbone_lr_ratio": 0.5})
    trial = optuna.trial.FixedTrial({"l2sp_on": False, "bss_on": False, "lr": 2e-3})
    DefineSpace(study.search)(trial)
    assert "backbone_lr_ratio" not in study.search.searched()
    cfg = trial_run_config(study, 0, trial.params)
    assert (cfg.train.lr, cfg.train.backbone_lr) == (2e-3, pytest.approx(1e-3))
    default = trial_run_config(load_study_config(study_yaml, {"search.lr": lr}), 0, trial.params)
    assert default.train.backbone_lr == pytest.approx(0.3 * 2e-3)  # documented default
    with pytest.raises(UserError, match="backbone_lr_ratio"):
        load_study_config(study_yaml, {"search.backbone_lr_ratio": 0})


def test_pooling_is_searchable_per_fold(study_yaml):
    study = load_study_config(study_yaml, {"search.pooling": ["mean", "max"]})
    trial = optuna.trial.FixedTrial({"l2sp_on": False, "bss_on": False, "pooling": "max"})
    DefineSpace(study.search)(trial)
    assert trial.params["pooling"] == "max"
    assert trial_run_config(study, 0, trial.params).model.pooling == "max"
    with pytest.raises(UserError, match="search.pooling"):
        load_study_config(study_yaml, {"search.pooling": ["median"]})


def test_first_trial_off_runs_plain_fine_tuning_first_then_tpe(study_yaml):
    """The enqueued all-off point reaches the define-by-run space through Ray's searcher:
    trial 1 is plain fine-tuning, the next ones are proposed by TPE as usual."""
    from matxfer.search import search_for

    study = load_study_config(study_yaml, {"search.first_trial_off": True})
    search_alg, _, _ = search_for(study, 0, "min")
    first = search_alg.suggest("t1")
    assert first == {"l2sp_on": False, "bss_on": False}
    cfg = trial_run_config(study, 0, first)
    assert (cfg.regularizers.l2sp, cfg.regularizers.bss) == (0.0, 0.0)
    search_alg.on_trial_complete("t1", {"best_val": 1.0})
    later = [search_alg.suggest(f"t{i}") for i in range(2, 8)]
    assert any(p["l2sp_on"] or p["bss_on"] for p in later)  # 6 all-off draws: p = 1/4096
    plain = search_for(load_study_config(study_yaml), 0, "min")[0]
    assert "l2sp_on" in plain.suggest("t1")  # without the flag, TPE proposes from trial 1
    never_off = {"low": 1e-6, "high": 1e-1, "allow_off": False}
    forced = load_study_config(study_yaml, {"search.first_trial_off": True,
                                            "search.l2sp": never_off, "search.bss": never_off})
    assert forced.search.first_point() is None  # nothing can be off: the flag does not apply
    assert not search_for(forced, 0, "min")[0]._points_to_evaluate


@pytest.mark.parametrize("variant, choices", [("freeze", [1, 2]), ("pooling", ["mean", "max"])])
def test_a_space_of_choices_only_is_a_grid_run_once(study_yaml, variant, choices):
    """num_samples (4 in the YAML) is capped at the number of combinations, and the study
    runs each combination once (a Tune grid), not sampled with repeats."""
    from ray.tune.search.variant_generator import generate_variants

    from matxfer.search import search_for

    study = load_study_config(study_yaml, variant=variant)
    assert study.num_samples == 2 and study.search.grid_size() == 2
    search_alg, space, samples = search_for(study, 0, "min")
    assert search_alg is None and samples == 1
    name = study.search.searched()[0]
    proposed = [config[name] for _, config in generate_variants(space)]
    assert proposed == choices
    trial = trial_run_config(study, 0, {name: proposed[1]})
    value = trial.model.pooling if name == "pooling" else trial.strategy.freeze_blocks
    assert value == choices[1]


def test_variants_are_config_changes(study_yaml):
    ri = load_study_config(study_yaml, variant="random-init")
    assert ri.name == "random-init" and ri.run.model.init == "random"
    assert ri.search.l2sp is None and ri.search.bss is None and ri.num_samples == 1
    noreg = load_study_config(study_yaml, variant="no-reg")
    assert noreg.run.model.init == "pretrained" and noreg.run.regularizers.l2sp == 0.0
    with pytest.raises(UserError, match="unknown variant 'best'; allowed: main, no-reg"):
        load_study_config(study_yaml, variant="best")


def test_the_dashboard_flag_is_a_setting_of_the_run_not_of_the_study(study_yaml):
    """`--dashboard` starts Ray's dashboard with a local instance; the study (its
    fingerprint, so what it reuses and where its results go) stays the same."""
    from matxfer.cli import build_parser

    args = build_parser().parse_args(["tune", str(study_yaml), "--dashboard"])
    assert args.dashboard is True
    assert build_parser().parse_args(["tune", str(study_yaml)]).dashboard is None
    assert load_study_config(study_yaml).dashboard is False
    assert load_study_config(study_yaml, {"dashboard": True}).dashboard is True
    assert study_identity(study_yaml, dashboard=True).fingerprint == \
        study_identity(study_yaml).fingerprint


def test_every_shipped_study_config_loads():
    from pathlib import Path

    from matxfer.tasks import TASKS

    folder = Path(__file__).parents[1] / "tune_configs"
    tasks = set()
    for path in folder.glob("*.yaml"):
        if path.name != "quickstart_train.yaml":
            tasks.add(load_study_config(path).run.data.task)
    assert tasks == set(TASKS)


@pytest.mark.parametrize("overrides, needle", [
    ({"folds": [0, 7]}, "folds must be distinct values in 0-4"),
    ({"num_samples": 0}, "num_samples"),
    ({"search.l2sp.low": 1.0, "search.l2sp.high": 0.1}, "high (0.1) must exceed low (1.0)"),
    ({"scaling.num_workers": 0}, "scaling.num_workers"),
])
def test_bad_study_configs_fail_at_load_time(study_yaml, overrides, needle):
    with pytest.raises(UserError) as err:
        load_study_config(study_yaml, overrides)
    assert needle in str(err.value)


@pytest.mark.cluster
@pytest.mark.slow
def test_study_on_local_ray_with_two_ddp_workers_then_resume(study_yaml, tmp_path, capsys):
    """Two trials, each a Ray Train run over 2 gloo DDP workers; the best checkpoint is
    evaluated once on the test fold; a rerun skips the finished fold without training
    anything, and completes the MLflow record a crash after result.json left unfinished."""
    import ray
    from mlflow import MlflowClient

    from matxfer.tune import run_study

    study = load_study_config(study_yaml)
    try:
        table = run_study(study)
        out = study_folder(tmp_path / "studies")
        result = json.loads((out / "fold0" / "result.json").read_text())
        assert result["n_trials"] == 2 and result["test_mae"] > 0
        assert result["val_mae"] > 0 and 1 <= result["best_epoch"] <= 2
        summary = json.loads((out / "summary.json").read_text())
        assert summary["mean"] == pytest.approx(result["test_mae"]) and summary["std"] == 0.0
        assert list(table["fold"]) == [0]
        # every epoch's checkpoint holds the state to resume from, except the last epoch's
        kept = [p for p in (tmp_path / "ray").glob("*-train/*/checkpoint_*") if p.is_dir()]
        assert kept
        for ckpt in kept:
            epochs = len(load_checked(ckpt / "checkpoint.pt")["history"])
            assert (ckpt / "resume.pt").is_file() == (epochs < 2), ckpt
        trials = pd.read_csv(out / "fold0" / "trials.csv")
        assert len(trials) == 2
        best = trials.loc[trials["best_val"].idxmin()]  # the selected trial: best validation
        assert best["trial_id"] == result["trial_id"]
        assert best["best_val"] == pytest.approx(result["val_mae"], rel=1e-12)
        # a subset run cannot fill matbench's record (it needs every test id): none is written
        assert summary["matbench_record"] is None
        assert not (out / "matbench_results.json").exists()
        # a crash between result.json and the end of the MLflow record: the parent run
        # still RUNNING, its model never registered
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        client.update_run(result["mlflow_run_id"], status="RUNNING")
        client.delete_registered_model("matxfer-matbench_jdft2d")
        trial_dirs = sorted((tmp_path / "ray").glob("*/_trial_*"))
        capsys.readouterr()
        # rerun: the finished fold is skipped (nothing trained), results unchanged, the
        # MLflow record completed
        again = run_study(study)
        out_text = capsys.readouterr().out
        assert again.iloc[0]["test_mae"] == table.iloc[0]["test_mae"]
        assert "fold 0: finished earlier with the same settings, skipping" in out_text
        assert "completed its MLflow run" in out_text and "trial 1/2" not in out_text
        assert sorted((tmp_path / "ray").glob("*/_trial_*")) == trial_dirs
        assert client.get_run(result["mlflow_run_id"]).info.status == "FINISHED"
        assert set(client.get_registered_model("matxfer-matbench_jdft2d").aliases) == {
            "fold0", f"fold0-{result['fingerprint']}"}
        run_study(study)  # complete now: nothing left to repair
        assert "completed" not in capsys.readouterr().out
        # the settings given to Tune and Ray were scoped to the study
        assert not {"TUNE_GLOBAL_CHECKPOINT_S", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
                    "MLFLOW_HTTP_REQUEST_MAX_RETRIES"} & set(os.environ)
    finally:
        ray.shutdown()
    assert_mlflow_ui_shows_the_study(tmp_path / "mlflow.db", epochs=2, trials=2)
    assert_analysis_of_the_study(tmp_path)


def assert_analysis_of_the_study(tmp_path) -> None:
    """`matxfer analyze drift --run` logs on the fold's run; `matxfer report` writes Table 1."""
    from mlflow import MlflowClient

    from matxfer.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("matbench_jdft2d").experiment_id
    parent, = [r for r in client.search_runs([exp]) if "mlflow.parentRunId" not in r.data.tags]
    run_id = parent.info.run_id
    assert main(["analyze", "drift", "--run", run_id, "--tracking-uri", uri,
                 "--max-structures", "16", "--out", str(tmp_path / "drift")]) == 0
    assert {a.path for a in client.list_artifacts(run_id, "analysis")} == {
        "analysis/drift.json", "analysis/drift.png"}
    assert main(["report", "--experiment", "matbench_jdft2d", "--tracking-uri", uri,
                 "--tasks", "matbench_jdft2d", "matbench_phonons",
                 "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "table1.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| matbench_jdft2d")
    assert "(1, subset*) |" in table[2] and table[3].count("| - ") >= 4  # phonons: no runs, dashes
    for name in ("figure1_training_loss.png", "figure1_fold_metrics.png",
                 "figure1_regularizers.png", "table1.csv", "runs.csv"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def assert_mlflow_ui_shows_the_study(db, epochs: int, trials: int) -> None:
    """`mlflow ui` on the study's SQLite store serves the page and, through the same REST API
    the page uses, the parent run with its child runs and their per-epoch curves."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from mlflow import MlflowClient

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    ui = subprocess.Popen([mlflow, "ui", "--backend-store-uri", f"sqlite:///{db}",
                           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                page = urllib.request.urlopen(url + "/", timeout=2).read().decode()
                break
            except OSError:
                assert time.time() < deadline and ui.poll() is None, "mlflow ui did not start"
                time.sleep(0.5)
        assert "<html" in page.lower()
        client = MlflowClient(url)
        runs = client.search_runs([client.get_experiment_by_name("matbench_jdft2d").experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(parents) == 1 and len(children) == trials
        lengths = set()
        for child in children:  # ASHA may stop a trial early: every curve has its epochs
            assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
            steps = {name: [m.step for m in client.get_metric_history(child.info.run_id, name)]
                     for name in ("train_loss", "val_mae", "l2sp_term", "bss_term")}
            first = sorted(steps["val_mae"])
            assert first == list(range(1, len(first) + 1)) and first
            assert all(sorted(v) == first for v in steps.values())
            lengths.add(len(first))
        assert max(lengths) == epochs
    finally:
        import os
        import signal

        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def test_the_test_fold_is_evaluated_on_the_trials_device_type_when_the_driver_has_it(
        study_yaml, monkeypatch):
    import torch

    from matxfer.selection import evaluation_device

    gpu = load_study_config(study_yaml, {"scaling.use_gpu": True})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert evaluation_device(gpu).type == "cuda"
    assert evaluation_device(load_study_config(study_yaml)).type == "cpu"  # a CPU study
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluation_device(gpu).type == "cpu"  # a driver without a GPU


def test_matbench_record_has_every_test_id_of_every_fold(tmp_path):
    import pandas as pd
    from matbench.bench import MatbenchBenchmark

    from matxfer.datasets.matbench import load_task, official_fold
    from matxfer.records import write_matbench_record

    folds, params = {}, {}
    for fold in range(5):
        _, test = official_fold("matbench_jdft2d", fold)
        folds[fold] = pd.DataFrame({"mbid": test[::-1], "prediction": np.arange(len(test)) * 1.0})
        params[fold] = {"l2sp": 1e-4, "bss": 0.0}
    path = tmp_path / "results.json"
    write_matbench_record("matbench_jdft2d", folds, params, path)
    record = MatbenchBenchmark.from_file(str(path)).tasks_map["matbench_jdft2d"]
    data = record.results["fold_2"]["data"]
    _, test2 = official_fold("matbench_jdft2d", 2)
    assert list(data) == test2  # matbench's own order, whatever order we predicted in
    assert data[test2[-1]] == 0  # the mapping id -> prediction survived
    assert record.results["fold_0"]["parameters"]["l2sp"] == 1e-4
    truth = load_task("matbench_jdft2d").loc[test2[::-1], "target"].to_numpy()
    expected_mae = abs(truth - np.arange(len(test2))).mean()
    assert record.results["fold_2"]["scores"]["mae"] == pytest.approx(expected_mae)
    assert json.loads(path.read_text())["@class"] == "MatbenchBenchmark"


def test_matbench_record_scores_against_the_studys_own_data_dir(tmp_path):
    """A study with `data.data_dir` is scored against that file, not the default copy: here
    the study's file has every target shifted by +100 and the predictions are its targets."""
    import gzip

    import pandas as pd
    from matbench.bench import MatbenchBenchmark

    from matxfer.datasets.matbench import local_data_file, matbench_ids, official_fold
    from matxfer.records import write_matbench_record

    # the file's own layout (pandas "split": columns, data rows), targets shifted by +100
    frame = json.loads(gzip.decompress(local_data_file("matbench_jdft2d").read_bytes()))
    column = frame["columns"].index("exfoliation_en")
    for row in frame["data"]:
        row[column] += 100.0
    (tmp_path / "matbench_jdft2d.json.gz").write_bytes(gzip.compress(json.dumps(frame).encode()))
    ids = matbench_ids("matbench_jdft2d", len(frame["data"]))
    shifted = dict(zip(ids, (row[column] for row in frame["data"]), strict=True))
    folds = {}
    for fold in range(5):
        _, test = official_fold("matbench_jdft2d", fold)
        folds[fold] = pd.DataFrame({"mbid": test, "prediction": [shifted[i] for i in test]})
    path = tmp_path / "results.json"
    write_matbench_record("matbench_jdft2d", folds, dict.fromkeys(range(5), {}), path,
                          data_dir=str(tmp_path))
    record = MatbenchBenchmark.from_file(str(path)).tasks_map["matbench_jdft2d"]
    assert record.results["fold_3"]["scores"]["mae"] == pytest.approx(0.0, abs=1e-9)


def _recorded_terminated(experiment) -> set[str]:
    """Trial ids that the driver's newest experiment-state snapshot records as finished."""
    snapshots = sorted(experiment.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not snapshots:
        return set()
    try:
        state = json.loads(snapshots[-1].read_text())
    except ValueError:  # caught mid-write
        return set()
    trials = [json.loads(t[0]) for t in state["trial_data"]]
    return {t["trial_id"] for t in trials if t["status"] == "TERMINATED"}


FAULT_EPOCHS = 30  # a trial outlasts the lag of Tune's experiment snapshots (up to ~10 s here)


def _stop_after(driver, experiment, n_done: int, how) -> dict[str, str]:
    """Wait until n_done trials finished (every epoch reported, and recorded in the
    driver's experiment state), then interrupt the driver with `how`; returns the finished
    trials' result.json texts."""
    import time

    def finished() -> dict[str, str]:
        """Trials whose last reported epoch is the final one. Not "N lines": a trial
        resumed from a checkpoint after the SIGINT reports the later epochs only."""
        done = {}
        for path in experiment.glob("_trial_*/result.json"):
            text = path.read_text()
            try:
                last = json.loads(text.strip().splitlines()[-1]) if text.strip() else {}
            except ValueError:  # caught mid-write
                continue
            if last.get("epoch") == FAULT_EPOCHS:
                done[path.parent.name] = text
        return done

    deadline = time.time() + 400
    while time.time() < deadline and driver.poll() is None and not (
            len(finished()) >= n_done and len(_recorded_terminated(experiment)) >= n_done):
        time.sleep(0.5)
    done = finished()
    if len(done) != n_done or driver.poll() is not None:
        driver.kill()
        _, err = driver.communicate(timeout=60)
        folders = sorted(p.name for p in experiment.glob("_trial_*"))
        raise AssertionError(f"expected {n_done} finished trial(s) before interrupting, found "
                             f"{folders}; driver exit {driver.returncode}, stderr:\n{err[-4000:]}")
    how(driver)
    return done


@pytest.mark.cluster
@pytest.mark.slow
def test_fault_driver_interrupted_then_sigkilled_resumes_without_rerunning_finished_trials(
        tmp_path):
    """Faults: Ctrl-C (SIGINT) of the driver after trial 1, then SIGKILL of the rerun's whole
    process group (driver, its Ray instance and workers) after trial 2. The third run of the
    same command finishes the study: finished trials are not run again, the Optuna history
    is kept (3 trials in all), MLflow holds one parent run and one run per trial."""
    import os
    import signal
    import subprocess
    import sys

    cfg = write_study_yaml(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", samples=3,
                           epochs=FAULT_EPOCHS)
    command = [sys.executable, "-m", "matxfer.cli", "tune", str(cfg)]
    ident = study_identity(cfg)
    experiment = tmp_path / "ray" / ident.run_name(0)
    fold0 = ident.fold_dir(0)

    def start():  # Tune snapshots its experiment every second (default: 10 s, and 19x a
        # slow save): the driver must not finish the study before a trial's end is recorded
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True,
                                env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"})

    driver = start()
    first = _stop_after(driver, experiment, 1, lambda d: d.send_signal(signal.SIGINT))
    _, err = driver.communicate(timeout=180)
    assert driver.returncode == 130, err[-2000:]
    assert "rerun the same command to resume" in err
    assert not fold0.exists()

    driver = start()
    second = _stop_after(driver, experiment, 2, lambda d: os.killpg(d.pid, signal.SIGKILL))
    driver.communicate(timeout=60)
    assert driver.returncode == -signal.SIGKILL
    assert not fold0.exists()
    assert first.items() <= second.items()  # the rerun left trial 1 alone

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    result = json.loads((fold0 / "result.json").read_text())
    assert result["n_trials"] == 3
    for name, text in second.items():
        assert (experiment / name / "result.json").read_text() == text  # not run again
    assert len(list(experiment.glob("_trial_*"))) == 3
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("matbench_jdft2d").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) - len(children) == 1  # every resumed run reused the fold's parent run
    assert len({r.data.tags["matxfer.trial_id"] for r in children}) == len(children) == 3
    assert all(r.info.status == "FINISHED" for r in children)
