"""The search service: one Ray Tune study (Optuna TPE + ASHA) per task and fold.

A one-worker trial trains in its own Tune trial process; a trial of several workers is a Ray
Train (DDP) run (distributed.py). After a fold's study, the best trial by
validation is evaluated once on the test fold, reusing its best checkpoint: a refit on the
whole training fold would leave early stopping without a validation split, and the checkpoint
is exactly the model the search selected.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import pandas as pd
import ray
from ray import tune

from matxfer.config import StudyConfig, derive
from matxfer.datasets.loading import fold_split
from matxfer.errors import StudyInterrupted, UserError
from matxfer.graphs import VerifiedCache, cache_file, task_graphs
from matxfer.identity import StudyIdentity, claim_folder
from matxfer.model_facts import keep_facts
from matxfer.physics.cache import descriptor_table
from matxfer.preflight import LOCAL_CPUS, Plan, preflight
from matxfer.progress import StudyProgress, quiet_ray_output
from matxfer.records import summarize
from matxfer.run import write_outputs
from matxfer.scheduling import (
    SchedulingWatchdog,
    StudyStalled,
    cluster_nodes,
    fit_watched,
    per_worker_resources,
    trial_resources,
)
from matxfer.scoped_env import scoped_env
from matxfer.search import search_for, trial_run_config
from matxfer.selection import EvaluationWarmup, evaluate_best
from matxfer.storage import recorded_sha256
from matxfer.tracking import (
    complete_fold_result,
    log_fold_result,
    log_summary,
    open_parent_run,
    open_tracker,
)
from matxfer.trial_logger import TrialLogger, complete_trial_runs

# A Ray Train worker group may take longer than Train's 30 s default to start on a loaded
# machine; a local instance's processes inherit this (a cluster keeps its own settings).
LOCAL_INSTANCE_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120"}
# Ray starts a worker per CPU for the first driver's tasks; Tune's trial actors and Train's
# workers carry their own runtime env and never use them, and on a small machine their
# start-up takes CPU from the first trial's.
NO_PRESTART = {"prestart_worker_first_driver": False}


def init_ray(address: str | None = None, num_cpus: int | None = None,
             dashboard: bool = True) -> None:
    """Attach to a cluster (address or RAY_ADDRESS) or start a local instance, with Ray's
    dashboard (http://127.0.0.1:8265) when `dashboard`: its head and modules are some ten
    processes that take seconds of a small machine's start-up."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # "local": never attach to a stray cluster named in /tmp/ray
        num_cpus = num_cpus or LOCAL_CPUS  # coordinators take none (scheduling.py)
        with pinned_local_address(), scoped_env(LOCAL_INSTANCE_ENV), quiet_ray_output():
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                     _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
                     log_to_driver=False, _system_config=NO_PRESTART)


@contextlib.contextmanager
def local_ray() -> Iterator[None]:
    """Stop the Ray instance started inside this block when it ends (a local one, or the
    connection to a cluster); one that was already running stays. Stopping it here rather
    than in Ray's exit hook saves the half second that hook sleeps first."""
    running = ray.is_initialized()
    try:
        yield
    finally:
        if not running:
            ray.shutdown()


@contextlib.contextmanager
def pinned_local_address():
    """Choose the local instance's GCS port up front and export it as RAY_ADDRESS while Ray
    starts, so its processes and workers inherit it: Ray's own helpers in the workers (Train's
    placement-group cleaner asks the state API for "the" cluster) then find this instance, not
    another one on the machine or a stale /tmp/ray/ray_current_cluster; picking the wrong one
    removed live trials' resources. The driver's environment is restored afterwards."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with scoped_env({"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"127.0.0.1:{port}"},
                    override=True):
        yield


def snapshot_env(study: StudyConfig) -> dict[str, str]:
    """Tune's experiment-state snapshot period while a fold runs: at least every 2 s on local
    storage (Tune's "auto" waits >= 10 s), so after a SIGKILL of the driver a trial that
    finished before the last snapshot is not run again; cloud storage keeps "auto" (each
    snapshot is an upload)."""
    return {} if "://" in study.storage_path else {"TUNE_GLOBAL_CHECKPOINT_S": "2"}


def _trial(params: dict, study_json: str, fold: int, run_name: str,
           cache: VerifiedCache) -> None:
    """Tune trainable: one trial. One worker: trains here; several: launches their Ray Train
    (DDP) run and waits on it. `cache`: the graph cache the driver verified."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from matxfer.distributed import fit_on_workers, train_in_trial

    study = StudyConfig.model_validate_json(study_json)
    cfg = trial_run_config(study, fold, params)
    if study.scaling.num_workers == 1:
        train_in_trial(cfg, study.scaling, cache)
        return
    fit_on_workers(cfg, study.scaling, study.storage_path,
                   name=f"{run_name}-train/{tune.get_context().get_trial_id()}",
                   callbacks=[TuneReportCallback()], cache=cache)


def storage_uri(study: StudyConfig) -> str:
    path = study.storage_path
    return path if "://" in path else os.path.abspath(path)


def make_tuner(study: StudyConfig, fold: int, run_name: str, callbacks: list | None = None,
               cache: VerifiedCache | None = None) -> tune.Tuner:
    """A new Tuner for one fold, or the interrupted one of the same study (same fingerprint,
    hence the same `run_name`) restored, finished trials kept."""
    s = study.scaling
    trainable = tune.with_resources(
        tune.with_parameters(_trial, study_json=study.model_dump_json(), fold=fold,
                             run_name=run_name, cache=cache),
        trial_resources(s.cpus_per_worker, s.use_gpu, s.gpus_per_worker, s.num_workers))
    path = os.path.join(storage_uri(study), run_name)
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        tuner._local_tuner._run_config.callbacks = callbacks  # callbacks are not persisted
        return tuner
    spec = study.run.data.spec
    mode = "max" if spec.kind == "classification" else "min"
    search_alg, param_space, samples = search_for(study, fold, mode)
    scheduler = None
    if study.asha.enabled and study.num_samples > 1:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", metric="best_val", mode=mode,
                                  max_t=study.run.train.epochs,
                                  # a budget cut below the grace period (a smoke run) just
                                  # stops no trial early
                                  grace_period=min(study.asha.grace_period,
                                                   study.run.train.epochs),
                                  reduction_factor=study.asha.reduction_factor)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search_alg,
                                    scheduler=scheduler, num_samples=samples,
                                    max_concurrent_trials=study.max_concurrent_trials,
                                    # a one-worker trial's process (imports, CUDA
                                    # context) serves the next trial; a DDP trial's
                                    # coordinator cannot be reset after its Train run
                                    reuse_actors=study.scaling.num_workers == 1),
        run_config=tune.RunConfig(
            name=run_name, callbacks=callbacks, storage_path=storage_uri(study), verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            # a one-worker trial restarts from its last checkpoint once (Ray Train does
            # this for a DDP trial's worker group)
            failure_config=tune.FailureConfig(max_failures=int(s.num_workers == 1))),
    )


def build_graph_cache(study: StudyConfig, plan: Plan) -> VerifiedCache:
    """Build (or load and verify) the task's graph cache once in the driver; trials read it
    trusting this check (`VerifiedCache`: the file and its checksum). Every requested fold is
    split here too, so data that cannot be split stops the study before anything starts."""
    d, m = study.run.data, plan.model
    args = (d, m.graph)
    def splits(graphs) -> None:
        for fold in study.folds:
            fold_split(derive(d, {"fold": fold}), graphs)

    splits(task_graphs(*args, check=splits))  # a cached set is checked too
    path = cache_file(*args)
    physics = study.physics_to_compute()
    if physics is not None:  # once, first: every trial reads the cache
        descriptor_table(d, study.run.model, physics, path)
    return str(path.resolve()), recorded_sha256(path)


def run_fold(study: StudyConfig, ident: StudyIdentity, fold: int, tracker=None,
             cache: VerifiedCache | None = None) -> dict:
    """One fold's study (resumed if interrupted), then the single test evaluation. Only work
    of the same fingerprint is skipped or resumed: it lives in the study's own folder."""
    done = ident.fold_dir(fold) / "result.json"
    if done.exists():
        record = json.loads(done.read_text())
        if record.get("fingerprint") == ident.fingerprint:
            print(f"fold {fold}: finished earlier with the same settings, skipping ({done})")
            if tracker and complete_fold_result(tracker, study, fold, record, done.parent):
                print(f"fold {fold}: completed its MLflow run {record['mlflow_run_id']} "
                      "(left unfinished by an earlier interruption)")
            return record
        raise UserError(f"{str(done)!r} was computed with other settings (fingerprint "
                        f"{record.get('fingerprint')}, this study {ident.fingerprint})")
    name = ident.run_name(fold)
    parent_id = open_parent_run(tracker, study, fold, name, ident.fingerprint) \
        if tracker else None
    results = fit_fold(study, fold, name, parent_id, tracker, cache)
    if tracker:
        metric = f"val_{study.run.data.spec.metric}"
        if n := complete_trial_runs(tracker, parent_id, metric, results):
            print(f"fold {fold}: completed the MLflow runs of {n} trial(s) an earlier "
                  "interruption left open")
    finished = results.num_terminated + results.num_errors
    if finished < study.num_samples:  # Tune returns normally after a Ctrl-C
        raise StudyInterrupted(f"fold {fold}: study interrupted after {finished} of "
                               f"{study.num_samples} trials; rerun the same command to resume")
    errors = [r.error for r in results if r.error]
    if errors and len(errors) == len(results):
        raise RuntimeError(f"fold {fold}: every trial failed; first error: {errors[0]}")
    outcome = evaluate_best(study, ident, fold, results)
    if tracker:
        outcome["record"]["mlflow_run_id"] = parent_id  # the dict is also result.json's content
    write_outputs(ident.fold_dir(fold), outcome["files"])
    if tracker:
        log_fold_result(tracker, parent_id, study, fold, outcome, ident.fold_dir(fold))
    return outcome["record"]


def fit_fold(study: StudyConfig, fold: int, name: str, parent_id: str | None,
             tracker, cache: VerifiedCache | None = None) -> tune.ResultGrid:
    """Run (or resume) one fold's Tuner with progress lines, the scheduling watchdog and,
    when tracking, live MLflow logging; Ray's own chatter is dropped while it runs."""
    spec = study.run.data.spec
    mode = "max" if spec.kind == "classification" else "min"
    s = study.scaling
    callbacks = [StudyProgress(fold, f"val_{spec.metric}", mode, study.num_samples,
                               epochs=study.run.train.epochs),
                 SchedulingWatchdog(per_worker_resources(s.cpus_per_worker, s.use_gpu),
                                    s.num_workers, timeout_s=study.scheduling_timeout_s),
                 EvaluationWarmup()]
    if tracker:
        callbacks.append(TrialLogger(tracker, parent_id, study, fold, name))
    try:
        with quiet_ray_output(), scoped_env(snapshot_env(study)):  # Optuna logs when built
            return fit_watched(make_tuner(study, fold, name, callbacks, cache))
    except StudyStalled as err:
        raise UserError(f"fold {fold}: {err}") from None


def attached_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


def attached_nodes(address: str | None) -> list[dict] | None:
    """Attach to the cluster (when one is named) and list its nodes; None for a local run."""
    if attached_address(address) is None:
        return None
    init_ray(address)
    return cluster_nodes()


def check_study(study: StudyConfig, address: str | None = None) -> str:
    """`tune --check`: the plan, printed; UserError (exit 2) naming every problem found."""
    plan = preflight(study, attached_nodes(address))
    print("\n".join(plan.lines))
    plan.raise_problems()
    return "ok: the study can start"


def run_study(study: StudyConfig, address: str | None = None) -> pd.DataFrame:
    """All requested folds of one task, then the per-task summary."""
    plan = preflight(study, attached_nodes(address))
    print("\n".join(plan.lines), flush=True)
    plan.raise_problems()
    cache = build_graph_cache(study, plan)  # bad data stops here: nothing written yet
    keep_facts(plan.model, study.run.data.cache_dir)
    opening = open_tracker(study)  # an unreachable server fails here, before Ray starts
    claim_folder(plan.ident)
    # Ray Train's worker groups (DDP trials) free their resources through the dashboard
    init_ray(address, dashboard=study.dashboard or study.scaling.num_workers > 1)
    tracker = opening()  # a SQLite store was opened meanwhile
    records = [run_fold(study, plan.ident, fold, tracker, cache) for fold in study.folds]
    table = summarize(study, plan.ident.folder, records)
    if tracker:
        log_summary(tracker, plan.ident.folder, [plan.ident.run_name(f) for f in table["fold"]])
    print(f"results: {plan.ident.folder}")
    return table
