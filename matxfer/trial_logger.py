"""Live MLflow logging of a study's trials from the driver (a Ray Tune callback): one child
run per trial under the fold's parent run, per-epoch metrics, then the learning curve and the
trial's best checkpoint."""

from __future__ import annotations

import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from ray import tune

from matxfer.checkpoint import CHECKPOINT_FILE
from matxfer.config import StudyConfig
from matxfer.search import trial_run_config
from matxfer.selection import error_line
from matxfer.storage import checked_files
from matxfer.tracking import learning_curve_png

HISTORY_KEYS = ("lr", "train_loss", "task_loss", "l2sp_term", "bss_term", "seconds",
                "structures_per_s", "best_val")


class Finishing(NamedTuple):
    """A finished trial whose files are still to be logged."""
    run_id: str
    history: pd.DataFrame
    drawing: Future | None  # -> the learning-curve PNG's path
    folder: tempfile.TemporaryDirectory
    checkpoint: str | None


class TrialLogger(tune.Callback):
    """Live MLflow logging from the driver: one child run per trial under the fold's parent,
    per-epoch metrics (history.csv names), then the learning-curve PNG and best checkpoint."""

    def __init__(self, tracker, parent_id: str, study: StudyConfig, fold: int,
                 run_name: str) -> None:
        self.tracker, self.parent_id, self.study, self.fold = tracker, parent_id, study, fold
        self.run_name = run_name
        self.metric = f"val_{study.run.data.spec.metric}"
        self.runs: dict[str, str] = {}
        self.history: dict[str, list[dict]] = {}
        self.checkpoints: dict[str, str] = {}
        self._finishing: list[Finishing] = []
        self._drawer: ThreadPoolExecutor | None = None  # draws learning curves off Tune's loop

    def __getstate__(self) -> dict:  # Tune pickles its run config; the client stays behind
        return {**self.__dict__, "tracker": None, "_finishing": [], "_drawer": None}

    def _run_id(self, trial) -> str:
        if trial.trial_id not in self.runs:
            cfg = trial_run_config(self.study, self.fold, trial.config)
            run_id = self.tracker.start_run(
                f"trial-{trial.trial_id}", {"mlflow.parentRunId": self.parent_id},
                ("matxfer.trial_id", f"{self.run_name}/{trial.trial_id}"))
            self.tracker.log_params(run_id, {
                "l2sp": cfg.regularizers.l2sp, "bss": cfg.regularizers.bss,
                "bss_k": cfg.regularizers.bss_k, "lr": cfg.train.lr,
                "backbone_lr": cfg.train.backbone_lr, "init": cfg.model.init,
                "pooling": cfg.model.pooling, "seed": cfg.train.seed,
                "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs,
                "workers": self.study.scaling.num_workers, "fold": self.fold,
                **{f"strategy.{k}": v for k, v in cfg.strategy.model_dump().items()}})
            self.runs[trial.trial_id] = run_id
        return self.runs[trial.trial_id]

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        keys = (*HISTORY_KEYS, self.metric)
        metrics = {k: result[k] for k in keys if k in result}
        self.tracker.log_metrics(self._run_id(trial), metrics, step=int(result.get("epoch", 0)))
        self.history.setdefault(trial.trial_id, []).append(
            {"epoch": result.get("epoch", 0), **metrics})
        if result.get("checkpoint_path"):
            self.checkpoints[trial.trial_id] = result["checkpoint_path"]

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        """Hand the learning curve to the drawing thread and go on: Tune starts the next trial
        after this returns. The trial's files and the end of its run are logged from this
        thread once the drawing is done (`on_step_end`), all of them by the experiment's end."""
        run_id = self._run_id(trial)
        history = pd.DataFrame(self.history.get(trial.trial_id, []))
        folder = tempfile.TemporaryDirectory()
        drawing = None
        if len(history):
            if self._drawer is None:
                self._drawer = ThreadPoolExecutor(1, thread_name_prefix="learning-curve")
            drawing = self._drawer.submit(learning_curve_png, history,
                                          Path(folder.name) / "learning_curve.png", self.metric)
        ckpt = self.checkpoints.get(trial.trial_id)  # a DDP trial's Ray Train checkpoint
        if ckpt is None and trial.checkpoint is not None:  # a one-worker trial's own
            ckpt = trial.checkpoint.path
        self._finishing.append(Finishing(run_id, history, drawing, folder, ckpt))
        self._log_finished(wait=False)

    def on_step_end(self, iteration, trials, **info) -> None:
        self._log_finished(wait=False)

    def on_experiment_end(self, trials, **info) -> None:
        """Tune calls this at every end of a fit (finished, interrupted or failed)."""
        self._log_finished(wait=True)
        if self._drawer is not None:
            self._drawer.shutdown()
            self._drawer = None

    def _log_finished(self, wait: bool) -> None:
        waiting = []
        for item in self._finishing:
            if wait or item.drawing is None or item.drawing.done():
                self._finish(item)
            else:
                waiting.append(item)
        self._finishing = waiting

    def _finish(self, item: Finishing) -> None:
        try:
            files: dict = {"history.csv": item.history}
            if item.drawing is not None:
                files["learning_curve.png"] = item.drawing.result()
            self.tracker.log_files(item.run_id, files)
            if item.checkpoint and Path(item.checkpoint, CHECKPOINT_FILE).is_file():
                self.tracker.log_files(item.run_id,
                                       checked_files(Path(item.checkpoint), CHECKPOINT_FILE),
                                       "best_checkpoint")
            self.tracker.end_run(item.run_id)
        finally:
            item.folder.cleanup()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run_id = self._run_id(trial)
        reason = ""
        if trial.error_file and Path(trial.error_file).is_file():
            reason = error_line(Exception(Path(trial.error_file).read_text()))
        self.tracker.call(self.tracker.client.set_tag, run_id, "error", reason or "failed")
        self.tracker.end_run(run_id, "FAILED")
