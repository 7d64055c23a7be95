"""Model selection of one fold's study: the best trial by validation, its best checkpoint
evaluated once on the test fold (no refit: early stopping would lose its validation data,
and the checkpoint is exactly the model the search selected), and the trials table."""

from __future__ import annotations

import threading
from pathlib import Path

import pandas as pd
import ray
import torch
from ray import tune

from matxfer.backbones.registry import prebuild
from matxfer.checkpoint import backbone_facts, load_checkpoint
from matxfer.config import StudyConfig
from matxfer.datasets.loading import data_files
from matxfer.distributed import CHECKPOINT_FILE
from matxfer.identity import StudyIdentity
from matxfer.metrics import score
from matxfer.storage import load_checked
from matxfer.train import loader_options, predict


def best_checkpoint_file(result) -> ray.train.Checkpoint | None:
    """The trial's last reported checkpoint: it holds the trial's best weights so far (every
    epoch's checkpoint.pt carries the best state). A one-worker trial reports it to Tune
    itself; a DDP trial's Ray Train run passes its path to Tune as a metric."""
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    history = result.metrics_dataframe
    if history is not None and CHECKPOINT_PATH_KEY in history:
        paths = history[CHECKPOINT_PATH_KEY].dropna()
        if len(paths):
            return ray.train.Checkpoint(paths.iloc[-1])
    return result.checkpoint


class EvaluationWarmup(tune.Callback):
    """Builds the architecture of the first finished trial's checkpoint on a thread while the
    other trials run, so that loading the selected checkpoint after the study (same
    architecture: one backbone per study) skips seconds of MACE construction. The build is the
    one `load_checkpoint` does, kept per process; Tune's end of the fit waits for it."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def __getstate__(self) -> dict:  # Tune pickles its run config
        return {"_thread": None}

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

        if self._thread is not None:
            return
        folder = (trial.last_result or {}).get(CHECKPOINT_PATH_KEY) or (
            trial.checkpoint.path if trial.checkpoint is not None else None)
        if folder and Path(folder, CHECKPOINT_FILE).is_file():
            self._thread = threading.Thread(target=_prebuild, name="evaluation-warmup",
                                            args=(Path(folder, CHECKPOINT_FILE),), daemon=True)
            self._thread.start()

    def on_experiment_end(self, trials, **info) -> None:
        if self._thread is not None:
            self._thread.join()


def _prebuild(path: Path) -> None:
    try:
        prebuild(load_checked(path)["backbone"])
    except Exception:  # noqa: BLE001 - only a head start: the evaluation loads and reports it
        pass


def evaluation_device(study: StudyConfig) -> torch.device:
    """Where the selected model meets the test fold: the trials' device type when this process
    has one (a GPU study on a driver with CUDA), else the CPU."""
    gpu = study.scaling.use_gpu and torch.cuda.is_available()
    return torch.device("cuda" if gpu else "cpu")


def evaluate_best(study: StudyConfig, ident: StudyIdentity, fold: int,
                  results: tune.ResultGrid) -> dict:
    """Select the best trial by validation; evaluate its checkpoint once on the test fold."""
    from matxfer.run import prepare_fold

    spec = study.run.data.spec
    mode = "max" if spec.kind == "classification" else "min"
    best = results.get_best_result("best_val", mode, scope="last", filter_nan_and_inf=True)
    ckpt = best_checkpoint_file(best) if best is not None else None
    if ckpt is None:
        raise RuntimeError(f"{ident.run_name(fold)}: no trial finished with a checkpoint")
    with ckpt.as_directory() as folder:
        model, scaler, cfg, payload = load_checkpoint(Path(folder) / CHECKPOINT_FILE,
                                                      study.run.data, own=True)
        data = prepare_fold(cfg, model, progress=False, calibrate=False)
        data.scaler = scaler
        device = evaluation_device(study)
        y, p = predict(model.to(device), data, "test", 64, device, loader_options(cfg.train, 2))
        record = {
            "task": spec.name, "fold": fold, "variant": study.name, "unit": spec.unit,
            "fingerprint": ident.fingerprint,
            "trial_id": best.metrics.get("trial_id"), **backbone_facts(model, cfg.model),
            "init": cfg.model.init,
            "pooling": cfg.model.pooling, **physics_choice(cfg),
            "l2sp": cfg.regularizers.l2sp, "bss": cfg.regularizers.bss, "lr": cfg.train.lr,
            **cfg.strategy.model_dump(),
            "best_epoch": int(best.metrics["best_epoch"]),
            f"val_{spec.metric}": float(best.metrics["best_val"]),
            f"test_{spec.metric}": score(spec, y, p),
            "max_structures": cfg.data.max_structures,
            "n_trials": len(results), "n_train": len(data.split.train),
            "n_val": len(data.split.val), "n_test": len(data.split.test),
            "skipped_rows": len(data.graphs.skipped),
        }
        files = {"result.json": record, "checkpoint.pt": payload,
                 "predictions.csv": pd.DataFrame({"mbid": data.split.test, "target": y,
                                                  "prediction": p}),
                 "trials.csv": trials_table(results),
                 **data_files(cfg.data, data.split, data.graphs)}
    return {"record": record, "files": files, "predictions": p}


def physics_choice(cfg) -> dict:
    """The selected trial's physics (mode, descriptors, calibration), when it used any."""
    physics = cfg.model.physics
    if physics is None or physics.mode == "off":
        return {}
    return {"physics": physics.mode, "descriptors": list(physics.descriptors),
            "calibration": physics.calibration}


def trials_table(results: tune.ResultGrid) -> pd.DataFrame:
    """One row per trial that reported; failed trials carry their reason in `error`."""
    df = results.get_dataframe()
    keep = [c for c in df.columns if c.startswith("config/") or c in (
        "trial_id", "best_val", "best_epoch", "epoch", "training_iteration", "train_loss")]
    df = df[keep].assign(error="")
    failed = pd.DataFrame([{"trial_id": r.metrics.get("trial_id") or Path(r.path).name,
                            "error": error_line(r.error)} for r in results if r.error])
    if len(failed):
        df = pd.concat([df[~df["trial_id"].isin(failed["trial_id"])], failed],
                       ignore_index=True)
    return df


def error_line(err: BaseException) -> str:
    """The root cause of a failed trial in one line (Ray wraps it in several layers)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    causes = [ln for ln in lines if "Error:" in ln and not ln.startswith("File ")]
    return (causes[-1] if causes else (lines[-1] if lines else type(err).__name__))[:300]
