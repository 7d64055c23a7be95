"""Ray Train: one fine-tune across workers (DDP; NCCL on GPUs, gloo on CPU).

`train_worker` runs on every worker: it places the model, wraps it in DDP, runs the plain loop
from train.py and reports each epoch (with a checkpoint on rank 0); after a worker failure Ray
Train restarts the group and it continues from the last checkpoint's training state.
`fit_on_workers` builds the TorchTrainer for one trial of several workers; a one-worker trial
runs the same `train_process` in its own Tune trial process (`train_in_trial`): starting a
Train controller and worker group cost each trial tens of seconds.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from matxfer.config import RunConfig, ScalingSettings
from matxfer.graphs import VerifiedCache
from matxfer.model import trial_model
from matxfer.run import checkpoint_payload, prepare_fold
from matxfer.storage import CorruptFile, UnsafeFile, load_checked, plain, save_checked
from matxfer.strategies import freeze_blocks
from matxfer.train import TrainResult, fit

CHECKPOINT_FILE = "checkpoint.pt"
RESUME_FILE = "resume.pt"


Report = Callable[[dict, "str | None"], None]  # (metrics, checkpoint folder or None)


def _report_epoch(model, cfg: RunConfig, data, rank: int, resumed_from: int, report: Report,
                  setup: dict[str, float]):
    """Per-epoch callback: metrics from every rank; rank 0 adds a checkpoint every epoch:
    the best weights so far (checkpoint.pt, what evaluation and predict read) and, unless it
    is the last epoch, the state to continue from (resume.pt), each with its checksum. Each
    report names the Ray node the worker runs on, the epoch this worker group resumed after
    (0: a fresh start), and the seconds it took to build the model and read the fold
    (`setup`)."""
    node_id = ray.get_runtime_context().get_node_id()

    def on_epoch(row: dict, result: TrainResult, state) -> None:
        metrics = {**row, "best_val": result.best_val, "best_epoch": result.best_epoch,
                   "node_id": node_id, "resumed_from_epoch": resumed_from, **setup}
        if rank != 0:
            report(metrics, None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            payload = checkpoint_payload(model, cfg, data, result.best_state)
            payload["history"] = plain(list(result.history))
            save_checked(payload, Path(tmp) / CHECKPOINT_FILE)
            if row["epoch"] < cfg.train.epochs:  # after the last epoch nothing resumes
                save_checked(plain(state()), Path(tmp) / RESUME_FILE)  # weights-only loadable
            report(metrics, tmp)  # Ray copies the folder to the run's storage here
    return on_epoch


def resume_state(checkpoint: Checkpoint | None) -> dict | None:
    """The training state of this run's last checkpoint (after a failure), else None.
    A damaged one, or one holding pickled objects besides tensors and plain values, is not
    trusted: the run starts over, which costs time but not correctness."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        try:
            return load_checked(Path(folder) / RESUME_FILE)
        except (CorruptFile, UnsafeFile, FileNotFoundError) as err:
            warnings.warn(f"not resuming from {folder}: {err}", stacklevel=1)
            return None


def train_process(cfg: RunConfig, device: torch.device, rank: int, world: int, report: Report,
                  checkpoint: Checkpoint | None, cache: VerifiedCache | None,
                  wrap: Callable | None = None) -> None:
    """One process's share of a fine-tune: build the model, read the fold from the cache the
    driver built and verified, continue from `checkpoint` when there is one, report every
    epoch."""
    start = time.perf_counter()
    model = trial_model(cfg.model, for_compile=cfg.train.compile != "off")
    freeze_blocks(model, cfg.strategy.freeze_blocks)  # DDP must see only trainable parameters
    built = time.perf_counter()
    data = prepare_fold(cfg, model, progress=False, verified=cache)
    setup = {"model_build_s": built - start, "data_load_s": time.perf_counter() - built}
    model.to(device)
    state = resume_state(checkpoint)
    on_epoch = _report_epoch(model, cfg, data, rank, state["epoch"] if state else 0, report,
                             setup)
    fit(wrap(model) if wrap else model, data, cfg, device, rank=rank, world_size=world,
        log=None, resume=state, on_epoch=on_epoch)


def _train_report(metrics: dict, folder: str | None) -> None:
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if folder else None)


def train_worker(config: dict) -> None:
    """Ray Train worker entry: config = {'run': RunConfig as dict, 'threads': int,
    'cache': VerifiedCache or None}."""
    cfg = RunConfig.model_validate(config["run"])
    torch.set_num_threads(int(config.get("threads") or 1))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    wrap = None
    if world > 1:
        def wrap(model):
            return ray.train.torch.prepare_model(model, move_to_device=False)
    train_process(cfg, ray.train.torch.get_device(), rank, world, _train_report,
                  ray.train.get_checkpoint(), config.get("cache"), wrap)


def train_in_trial(cfg: RunConfig, scaling: ScalingSettings,
                   cache: VerifiedCache | None = None) -> None:
    """A single-worker fine-tune inside the Tune trial's own process (which holds the
    worker's CPUs and GPU): no Train controller or worker group to start. Tune restarts a
    failed trial from its last checkpoint (the study's FailureConfig)."""
    from ray import tune

    torch.set_num_threads(worker_threads(scaling))
    device = torch.device("cuda") if scaling.use_gpu else torch.device("cpu")

    def report(metrics: dict, folder: str | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder)
                    if folder else None)

    train_process(cfg, device, 0, 1, report, tune.get_checkpoint(), cache)


def worker_threads(scaling: ScalingSettings) -> int:
    return max(1, int(scaling.cpus_per_worker))


def fit_on_workers(cfg: RunConfig, scaling: ScalingSettings, storage_path: str, name: str,
                   callbacks: list | None = None,
                   cache: VerifiedCache | None = None) -> ray.train.Result:
    """Run one fine-tune as a Ray Train job (resumes from its last checkpoint when rerun)."""
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    threads = worker_threads(scaling)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"run": cfg.model_dump(), "threads": threads, "cache": cache},
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=os.path.abspath(storage_path)
            if "://" not in storage_path else storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=1), callbacks=callbacks or []),
    )
    return trainer.fit()
