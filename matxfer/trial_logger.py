"""Live MLflow logging of a study's trials from the driver (a Ray Tune callback): one child
run per trial under the fold's parent run, per-epoch metrics, then the learning curve and the
trial's best checkpoint. Every MLflow call runs on one worker thread, in the order Tune
reported, so Tune's loop (and the next trial's start) never waits on the tracking store."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from ray import tune

from matxfer.checkpoint import CHECKPOINT_FILE
from matxfer.config import StudyConfig
from matxfer.search import trial_run_config
from matxfer.selection import best_checkpoint_file, error_line
from matxfer.storage import checked_files
from matxfer.tracking import learning_curve_png

HISTORY_KEYS = ("lr", "train_loss", "task_loss", "l2sp_term", "bss_term", "seconds",
                "structures_per_s", "best_val")


class TrialLogger(tune.Callback):
    """Live MLflow logging from the driver: one child run per trial under the fold's parent,
    per-epoch metrics (history.csv names), then the learning-curve PNG and best checkpoint.
    Tune's end of the fit (finished, interrupted or failed) waits for the worker; a driver
    killed before that leaves runs open, which `complete_trial_runs` finishes on the rerun."""

    def __init__(self, tracker, parent_id: str, study: StudyConfig, fold: int,
                 run_name: str) -> None:
        self.tracker, self.parent_id, self.study, self.fold = tracker, parent_id, study, fold
        self.run_name = run_name
        self.metric = f"val_{study.run.data.spec.metric}"
        self.runs: dict[str, str] = {}  # the worker's: trial id -> run id
        self.history: dict[str, list[dict]] = {}
        self.checkpoints: dict[str, str] = {}
        self._worker: ThreadPoolExecutor | None = None
        self._queued: list[Future] = []

    def __getstate__(self) -> dict:  # Tune pickles its run config; the client stays behind
        return {**self.__dict__, "tracker": None, "_worker": None, "_queued": []}

    def _submit(self, fn: Callable, *args) -> None:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="mlflow-trials")
        self._queued = [f for f in self._queued if not f.done() or f.exception()]
        self._queued.append(self._worker.submit(fn, *args))

    def _run_id(self, trial_id: str, config: dict) -> str:
        if trial_id not in self.runs:
            cfg = trial_run_config(self.study, self.fold, config)
            run_id = self.tracker.start_run(
                f"trial-{trial_id}", {"mlflow.parentRunId": self.parent_id},
                ("matxfer.trial_id", f"{self.run_name}/{trial_id}"))
            self.tracker.log_params(run_id, {
                "l2sp": cfg.regularizers.l2sp, "bss": cfg.regularizers.bss,
                "bss_k": cfg.regularizers.bss_k, "lr": cfg.train.lr,
                "backbone_lr": cfg.train.backbone_lr, "init": cfg.model.init,
                "pooling": cfg.model.pooling, "seed": cfg.train.seed,
                "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs,
                "workers": self.study.scaling.num_workers, "fold": self.fold,
                **{f"strategy.{k}": v for k, v in cfg.strategy.model_dump().items()}})
            self.runs[trial_id] = run_id
        return self.runs[trial_id]

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        keys = (*HISTORY_KEYS, self.metric)
        metrics = {k: result[k] for k in keys if k in result}
        step = int(result.get("epoch", 0))
        self.history.setdefault(trial.trial_id, []).append({"epoch": step, **metrics})
        if result.get("checkpoint_path"):
            self.checkpoints[trial.trial_id] = result["checkpoint_path"]
        self._submit(self._log_metrics, trial.trial_id, dict(trial.config), metrics, step)

    def _log_metrics(self, trial_id: str, config: dict, metrics: dict, step: int) -> None:
        self.tracker.log_metrics(self._run_id(trial_id, config), metrics, step=step)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        history = pd.DataFrame(self.history.get(trial.trial_id, []))
        ckpt = self.checkpoints.get(trial.trial_id)  # a DDP trial's Ray Train checkpoint
        if ckpt is None and trial.checkpoint is not None:  # a one-worker trial's own
            ckpt = trial.checkpoint.path
        self._submit(self._complete, trial.trial_id, dict(trial.config), history, ckpt)

    def _complete(self, trial_id: str, config: dict, history: pd.DataFrame,
                  ckpt: str | None) -> None:
        finish_trial_run(self.tracker, self._run_id(trial_id, config), history, self.metric,
                         ckpt)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        reason = ""
        if trial.error_file and Path(trial.error_file).is_file():
            reason = error_line(Exception(Path(trial.error_file).read_text()))
        self._submit(self._fail, trial.trial_id, dict(trial.config), reason or "failed")

    def _fail(self, trial_id: str, config: dict, reason: str) -> None:
        run_id = self._run_id(trial_id, config)
        self.tracker.call(self.tracker.client.set_tag, run_id, "error", reason)
        self.tracker.end_run(run_id, "FAILED")

    def on_experiment_end(self, trials, **info) -> None:
        """Wait for the worker; an error in it surfaces here."""
        queued, self._queued = self._queued, []
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        for future in queued:
            future.result()


def finish_trial_run(tracker, run_id: str, history: pd.DataFrame, metric: str,
                     checkpoint: str | None, status: str = "FINISHED") -> None:
    """Log a finished trial's history.csv, learning curve and best checkpoint; end its run."""
    with tempfile.TemporaryDirectory() as tmp:
        files: dict = {"history.csv": history}
        if len(history):
            files["learning_curve.png"] = learning_curve_png(
                history, Path(tmp) / "learning_curve.png", metric)
        tracker.log_files(run_id, files)
    if checkpoint and Path(checkpoint, CHECKPOINT_FILE).is_file():
        tracker.log_files(run_id, checked_files(Path(checkpoint), CHECKPOINT_FILE),
                          "best_checkpoint")
    tracker.end_run(run_id, status)


def complete_trial_runs(tracker, parent_id: str, metric: str, results) -> int:
    """Finish the runs of trials that a killed driver saw end (Tune will not report them
    again) but had not finished logging: their missing epochs, files and end, from the trial's
    own records. Returns how many were completed."""
    open_runs = tracker.call(
        tracker.client.search_runs, [tracker.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and "
                      "attributes.status = 'RUNNING'")
    by_trial = {r.data.tags.get("matxfer.trial_id", "").rsplit("/", 1)[-1]: r.info.run_id
                for r in open_runs}
    completed = 0
    for result in results:
        run_id = by_trial.get(str(result.metrics.get("trial_id")))
        if run_id is None:
            continue
        frame = result.metrics_dataframe
        history = pd.DataFrame() if frame is None else frame[
            [k for k in ("epoch", *HISTORY_KEYS, metric) if k in frame]]
        logged = {m.step for m in tracker.call(tracker.client.get_metric_history, run_id,
                                               metric)}
        for row in history.to_dict("records"):
            if int(row["epoch"]) not in logged:
                tracker.log_metrics(run_id, {k: v for k, v in row.items() if k != "epoch"},
                                    step=int(row["epoch"]))
        ckpt = best_checkpoint_file(result)
        finish_trial_run(tracker, run_id, history, metric, ckpt.path if ckpt else None,
                         "FAILED" if result.error else "FINISHED")
        completed += 1
    return completed
