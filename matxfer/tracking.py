"""MLflow: experiments, parent/child runs, artifacts, the model registry. No Ray here.

One experiment per task; one parent run per (task, fold) study; one child run per trial
(tag mlflow.parentRunId). Calls go through `Tracker.call`, which retries with back-off, and
per-epoch metrics are buffered while the server is unreachable, so a restarted tracking server
loses nothing.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from matxfer import __version__
from matxfer.config import StudyConfig
from matxfer.errors import UserError
from matxfer.scoped_env import scoped_env
from matxfer.storage import checked_files

DEFAULT_DB = "mlflow.db"
# answers that retrying cannot change (anything else may be a server that is restarting)
PERMANENT = {"RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_PARAMETER_VALUE",
             "PERMISSION_DENIED", "UNAUTHENTICATED"}
LOCAL_ARTIFACTS = "mlruns"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Configured URI, else MLFLOW_TRACKING_URI, else a SQLite file in the working directory."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (UserError, exit 2) when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status == 200:
                return
    except OSError as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                        f"(mlflow_server/start.sh) or unset the tracking URI") from None
    raise UserError(f"MLflow tracking server {uri} answered /health with an error")


@lru_cache(maxsize=8)
def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def reproducibility_tags(task: str, model_path: Path, data_source: str) -> dict[str, str]:
    return {"git_commit": git_commit(), "matxfer_version": __version__,
            "data_sha256": data_source, "model_sha256": file_sha256(str(model_path)),
            "ray_version": package_version("ray"), "torch_version": package_version("torch"),
            "mace_version": package_version("mace-torch"),
            "chgnet_version": package_version("chgnet"), "task": task}


def learning_curve_png(history: pd.DataFrame, path: Path, metric: str) -> Path:
    """Train loss and validation metric (top), weighted regulariser terms (bottom) vs epoch.
    A bare Figure (no pyplot state): the driver draws these on a thread while Tune runs."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 6))
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(history["epoch"], history["train_loss"], "o-", label="train loss")
    top.plot(history["epoch"], history["task_loss"], "x--", label="task loss")
    twin = top.twinx()
    twin.plot(history["epoch"], history[metric], "s-", color="C3", label=metric)
    twin.set_ylabel(metric)
    top.set_ylabel("loss (standardised)")
    top.legend(loc="upper left")
    twin.legend(loc="upper right")
    bottom.plot(history["epoch"], history["l2sp_term"], "o-", label="λ·L2-SP")
    bottom.plot(history["epoch"], history["bss_term"], "x-", label="η·BSS")
    bottom.set_xlabel("epoch")
    bottom.set_ylabel("weighted term")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# MLflow's HTTP layer would retry a dead server for minutes per call, stalling the study:
# inside Tracker.call it fails fast, and `call` and the metric buffer handle the outage.
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class Tracker:
    """A thin, retrying wrapper over MlflowClient for one experiment."""

    def __init__(self, uri: str, experiment: str, retries: int = 8, backoff_s: float = 2.0):
        from mlflow import MlflowClient

        self.uri, self.retries, self.backoff_s = uri, retries, backoff_s
        self.client = MlflowClient(tracking_uri=uri)
        existing = self.call(self.client.get_experiment_by_name, experiment)
        self.experiment_id = existing.experiment_id if existing else self.call(
            self.client.create_experiment, experiment)
        self.pending: dict[str, list] = {}

    def call(self, fn: Callable, *args, _retries: int | None = None, **kwargs) -> Any:
        """Run an MLflow call, retrying with exponential back-off while the server is away."""
        from mlflow.exceptions import MlflowException

        retries = self.retries if _retries is None else _retries
        for attempt in range(retries + 1):
            try:
                with scoped_env(FAIL_FAST):
                    return fn(*args, **kwargs)
            except Exception as err:
                definite = isinstance(err, MlflowException) and err.error_code in PERMANENT
                if definite or attempt == retries:
                    raise
                time.sleep(min(60.0, self.backoff_s * 2 ** attempt))

    def find_run(self, tag: str, value: str) -> str | None:
        runs = self.call(self.client.search_runs, [self.experiment_id],
                         filter_string=f"tags.`{tag}` = '{value}'", max_results=1)
        return runs[0].info.run_id if runs else None

    def start_run(self, name: str, tags: dict[str, str], key: tuple[str, str]) -> str:
        """Create a run, or reuse the one carrying tag key=value (resumed studies)."""
        found = self.find_run(*key)
        if found:
            return found
        run = self.call(self.client.create_run, self.experiment_id, run_name=name,
                        tags={**tags, key[0]: key[1]})
        return run.info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        self.call(self.client.log_batch, run_id, params=items)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Buffered: on failure the metrics wait and go out with the next successful call."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.setdefault(run_id, []).extend(
            Metric(k, float(v), now, step) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool))
        try:
            self.flush(run_id, retries=0)
        except Exception:
            pass  # kept in self.pending; flushed later

    def flush(self, run_id: str, retries: int | None = None) -> None:
        batch = self.pending.get(run_id, [])
        while batch:
            self.call(self.client.log_batch, run_id, metrics=batch[:1000], _retries=retries)
            del batch[:1000]

    def log_files(self, run_id: str, files: dict[str, Any], artifact_path: str | None = None):
        """Write {name: DataFrame | dict | bytes-path} to a temp folder and log them."""
        import json

        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                target = Path(tmp) / name
                if isinstance(content, pd.DataFrame):
                    content.to_csv(target, index=False)
                elif isinstance(content, dict):
                    target.write_text(json.dumps(content, indent=2, default=str))
                else:
                    target.write_bytes(Path(content).read_bytes())
            self.call(self.client.log_artifacts, run_id, tmp, artifact_path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.flush(run_id)
        self.call(self.client.set_terminated, run_id, status)

    def register(self, run_id: str, model_name: str, fold: int, fingerprint: str,
                 artifact_path: str) -> int:
        """Register the run's artifact folder as a version of `model_name` with two aliases:
        `fold<k>-<fingerprint>` (this study's model for ever) and `fold<k>` (the newest study's
        model; when that moves away from another study's version, say so)."""
        from mlflow.exceptions import MlflowException

        try:
            self.call(self.client.get_registered_model, model_name)
        except MlflowException:
            self.call(self.client.create_registered_model, model_name)
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        known = self.call(self.client.search_model_versions,
                          f"name='{model_name}' and run_id='{run_id}'")
        version = known[0] if known else self.call(  # a rerun completing this run reuses it
            self.client.create_model_version, model_name, source, run_id,
            tags={"matxfer.fingerprint": fingerprint, "fold": str(fold)})
        alias = f"fold{fold}"
        before = self.call(self.client.get_registered_model, model_name).aliases.get(alias)
        self.call(self.client.set_registered_model_alias, model_name, f"{alias}-{fingerprint}",
                  version.version)
        self.call(self.client.set_registered_model_alias, model_name, alias, version.version)
        if before is not None:
            old = self.call(self.client.get_model_version, model_name, before)
            old_fp = old.tags.get("matxfer.fingerprint")
            if old_fp and old_fp != fingerprint:
                print(f"registry: {model_name}@{alias} now points at version {version.version} "
                      f"(study {fingerprint}); version {before} stays at "
                      f"{model_name}@{alias}-{old_fp}")
        return int(version.version)


def open_parent_run(tracker: Tracker, study: StudyConfig, fold: int, name: str,
                    fingerprint: str) -> str:
    """The fold's parent run (reused when the same study resumes: `name` carries the
    fingerprint), with the search space."""
    from matxfer.datasets.loading import source_id
    from matxfer.model import weights_file

    task = study.run.data.task
    tags = reproducibility_tags(task, weights_file(study.run.model.source),
                                source_id(study.run.data))
    tags.update({"variant": study.name, "fold": str(fold), "matxfer.fingerprint": fingerprint,
                 "unit": study.run.data.spec.unit})
    run_id = tracker.start_run(name, tags, ("matxfer.study", name))
    tracker.log_params(run_id, {
        "search_space": study.search.model_dump_json(), "num_samples": study.num_samples,
        "init": study.run.model.init, "pooling": study.run.model.pooling,
        "epochs": study.run.train.epochs, "batch_size": study.run.train.batch_size,
        "workers": study.scaling.num_workers, "fold": fold, "variant": study.name,
        "max_structures": study.run.data.max_structures})
    return run_id


def log_fold_result(tracker: Tracker, parent_id: str, study: StudyConfig, fold: int,
                    outcome: dict, folder: Path) -> None:
    """Best parameters, test metric and files on the parent run; register the fold's model."""
    record = outcome["record"]
    spec = study.run.data.spec
    tracker.log_params(parent_id, {f"best_{k}": record[k] for k in ("l2sp", "bss", "lr")})
    tracker.log_params(parent_id, {k: record[k] for k in ("backbone", "backbone_params")
                                   if k in record})
    tracker.call(tracker.client.set_tag, parent_id, "best_trial", str(record.get("trial_id")))
    metrics = {k: record[k] for k in (f"val_{spec.metric}", f"test_{spec.metric}", "best_epoch")}
    tracker.log_metrics(parent_id, metrics, step=0)
    files = {k: v for k, v in outcome["files"].items() if k != "checkpoint.pt"}
    tracker.log_files(parent_id, files)
    tracker.log_files(parent_id, checked_files(folder, "checkpoint.pt"), "best_model")
    if study.tracking.register_model:
        name = f"matxfer-{spec.name}" + ("" if study.name == "main" else f"-{study.name}")
        tracker.register(parent_id, name, fold, record["fingerprint"], "best_model")
    tracker.end_run(parent_id)


def complete_fold_result(tracker: Tracker, study: StudyConfig, fold: int, record: dict,
                         folder: Path) -> bool:
    """A fold whose result.json exists but whose parent run a crash left unfinished (or its
    model unregistered): log the fold's files and register its model now, from `folder`.
    True when something was repaired."""
    run_id = record.get("mlflow_run_id")
    if not run_id or tracker.client.get_run(run_id).info.status == "FINISHED":
        return False
    files = {p.name: p for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix != ".sha256" and p.name != "checkpoint.pt"}
    log_fold_result(tracker, run_id, study, fold, {"record": record, "files": files}, folder)
    return True


def make_tracker(study: StudyConfig) -> Tracker | None:
    """The study's tracker, or None when tracking is off; an unreachable server fails here."""
    if not study.tracking.enabled:
        return None
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(study.tracking.uri)
    check_reachable(uri)
    try:
        return Tracker(uri, study.tracking.experiment or study.run.data.task)
    except MlflowException as err:
        if err.error_code not in {"UNAUTHENTICATED", "PERMISSION_DENIED"}:
            raise
        raise UserError(f"MLflow tracking server {uri} refused the request ({err.error_code}); "
                        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None


def open_tracker(study: StudyConfig) -> Callable[[], Tracker | None]:
    """`make_tracker`, started now; call the result for the tracker. A tracking server is
    checked and opened here, so a refusal stops the study before Ray starts; a local SQLite
    store (whose schema check takes seconds) is opened in a thread while the caller starts
    Ray, its errors raised when the result is called."""
    if not study.tracking.enabled or not resolve_tracking_uri(
            study.tracking.uri).startswith("sqlite:"):
        tracker = make_tracker(study)
        return lambda: tracker
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="matxfer-mlflow")
    future = pool.submit(make_tracker, study)
    pool.shutdown(wait=False)
    return future.result


def log_summary(tracker: Tracker, out: Path, run_names: list[str]) -> None:
    """The study's summary (and Matbench record, when complete) in folder `out`, logged on
    every fold's parent run."""
    files = {p.name: p for p in out.glob("summary.*")}
    if (out / "matbench_results.json").exists():
        files["matbench_results.json"] = out / "matbench_results.json"
    for name in run_names:
        run_id = tracker.find_run("matxfer.study", name)
        if run_id:
            tracker.log_files(run_id, files)
    print(f"MLflow: {tracker.uri}  experiment {tracker.experiment_id} "
          f"(training runs: #/experiments/{tracker.experiment_id}/runs)")
