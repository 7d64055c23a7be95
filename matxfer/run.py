"""One fine-tune end to end, without Ray: prepare the fold, train, test once, write outputs.

`matxfer train` calls `run_finetune`; the Ray Train worker reuses `prepare_fold` and `fit`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from matxfer import __version__
from matxfer.checkpoint import backbone_facts, build_payload
from matxfer.config import RunConfig
from matxfer.datasets.loading import data_files, fold_split
from matxfer.errors import UserError
from matxfer.graphs import GraphSet, VerifiedCache, cache_file, present_elements, task_graphs
from matxfer.metrics import score
from matxfer.model import PropertyModel, TargetScaler, build_model
from matxfer.physics.cache import aligned, descriptor_table
from matxfer.physics.calibration import calibrate
from matxfer.storage import save_checked
from matxfer.train import FoldData, TrainResult, fit, loader_options, predict

OUTPUT_FILES = ("result.json", "history.csv", "predictions.csv", "checkpoint.pt", "config.yaml")


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device 'cuda' requested but no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def prepare_fold(cfg: RunConfig, model: PropertyModel, progress: bool = True,
                 verified: VerifiedCache | None = None, calibrate: bool = True) -> FoldData:
    """Graphs (cached; `verified`: the cache file the study's driver checked), official fold
    with validation split, and a train-split target scaler. With physics: the descriptors,
    and (`calibrate`; not for a trained model being evaluated) their calibration.

    With model.restrict_elements, `model` then computes on the task's elements only."""
    spec = cfg.data.spec
    graphs = task_graphs(cfg.data, model.graph_spec(), progress, verified)
    if cfg.model.restrict_elements:
        model.restrict_elements(present_elements(graphs.species, graphs.z_table))
    targets = pd.Series(graphs.targets, index=graphs.ids, name="target")
    split = fold_split(cfg.data, graphs)
    log = {"auto": spec.log_target, "log": True, "none": False}[cfg.model.target_transform]
    y_train = targets.loc[split.train].to_numpy()
    if log and (y_train <= 0).any():
        raise UserError(f"model.target_transform 'log' needs positive targets; {spec.name} has "
                        f"values <= 0 (use 'none')")
    scaler = TargetScaler(y_train, log=log, classification=spec.kind == "classification")
    physics = cfg.model.physics
    if physics is not None and physics.mode != "off":
        graph_file = Path(verified[0]) if verified else cache_file(cfg.data, model.graph_spec())
        attach_physics(cfg, model if calibrate else None, graphs, split.train, scaler,
                       graph_file, progress)
    return FoldData(spec, graphs, split, scaler)


def attach_physics(cfg: RunConfig, model: PropertyModel | None, graphs: GraphSet,
                   train_ids: list[str], scaler: TargetScaler, graph_file: Path,
                   progress: bool) -> None:
    """Descriptors of every structure (cached) onto the graphs; their standardisation and
    calibration fitted on the training split only (never validation or test) into `model`
    (None: a trained model keeps its own)."""
    physics = cfg.model.physics
    table = descriptor_table(cfg.data, cfg.model, physics, graph_file, progress)
    graphs.descriptors = aligned(table, graphs.ids, len(physics.descriptors))
    if model is None:
        return
    rows = graphs.positions_of(train_ids)
    model.set_physics(calibrate(graphs.descriptors[rows], graphs.targets[rows],
                                scaler.classification, physics.calibration), scaler)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to clobber a finished result; make sure the parent folder is writable."""
    if (out / "result.json").exists() and not overwrite:
        raise UserError(f"{str(out)!r} already holds a result.json; choose another --out "
                        f"or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a folder")
    check_writable(out, "--out")


def check_writable(path: Path, what: str) -> None:
    """The nearest existing folder at or above `path` must be a writable folder."""
    probe = existing_parent(path)
    try:  # a real file, not os.access: root passes access() on read-only or virtual mounts
        if not probe.is_dir():
            raise NotADirectoryError(20, "not a folder")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise UserError(f"{what} {str(path)!r} is not writable ({str(probe)!r}: "
                        f"{err.strerror})") from None


def existing_parent(path: Path) -> Path:
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    return probe


def check_free_space(path: Path, needed: int, what: str) -> None:
    """Refuse to start when the disk under `path` cannot hold `needed` bytes of results."""
    free = shutil.disk_usage(existing_parent(path)).free
    if free < needed:
        raise UserError(f"{what} {str(path)!r} has {free / 2**20:.0f} MiB free; this run needs "
                        f"about {needed / 2**20:.0f} MiB for checkpoints and results")


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def result_record(cfg: RunConfig, data: FoldData, trained: TrainResult, test_score: float,
                  seconds: float, model: PropertyModel) -> dict:
    spec = data.spec
    return {**backbone_facts(model, cfg.model),
        "task": spec.name, "fold": cfg.data.fold, "unit": spec.unit, "init": cfg.model.init,
        "pooling": cfg.model.pooling, "l2sp": cfg.regularizers.l2sp,
        "bss": cfg.regularizers.bss, "bss_k": cfg.regularizers.bss_k,
        "lr": cfg.train.lr, "backbone_lr": cfg.train.backbone_lr, "seed": cfg.train.seed,
        "epochs": cfg.train.epochs, "epochs_run": trained.epochs_run,
        "best_epoch": trained.best_epoch, f"val_{spec.metric}": trained.best_val,
        f"test_{spec.metric}": test_score, "n_train": len(data.split.train),
        "n_val": len(data.split.val), "n_test": len(data.split.test),
        "structures_per_s": float(np.mean([h["structures_per_s"] for h in trained.history])),
        "seconds": round(seconds, 2), "matxfer_version": __version__,
        "skipped_rows": len(data.graphs.skipped),
        "physics": cfg.model.physics.mode if cfg.model.physics else "off",
    }


def checkpoint_payload(model: PropertyModel, cfg: RunConfig, data: FoldData,
                       state: dict | None = None) -> dict:
    """A self-contained checkpoint (matxfer.checkpoint): architecture, weights (`state`,
    default the model's), scaler, task, portable config."""
    return build_payload(model, cfg, data.spec, data.scaler, data.graphs.z_table, state)


def write_outputs(out: Path, files: dict[str, object]) -> None:
    """Write every output into a staging folder, then move it into place in one step."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private; results are meant to be shared
    try:
        for name, content in files.items():
            path = stage / name
            if isinstance(content, pd.DataFrame):
                content.to_csv(path, index=False)
            elif isinstance(content, bytes):
                path.write_bytes(content)
            elif name.endswith(".json"):
                path.write_text(json.dumps(content, indent=2) + "\n")
            elif name.endswith(".yaml"):
                path.write_text(yaml.safe_dump(content, sort_keys=False))
            else:
                save_checked(content, path)  # with its .sha256 sidecar
        if not out.exists():
            os.replace(stage, out)
            return
        for item in stage.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def run_finetune(cfg: RunConfig, out: str | Path | None, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Fine-tune one task and fold; evaluate once on the test fold; write outputs under `out`."""
    start = time.perf_counter()
    out_dir = Path(out) if out else None
    if out_dir:
        check_output_dir(out_dir, overwrite)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg.model, for_compile=cfg.train.compile != "off")
    if out_dir:  # the checkpoint plus a margin, so a finished result is never lost to a full disk
        check_free_space(out_dir, 2 * model_bytes(model) + 16 * 2**20, "--out")
    data = prepare_fold(cfg, model, progress)
    model.to(device)
    trained = fit(model, data, cfg, device, log=print if progress else None)
    y_test, p_test = predict(model, data, "test", cfg.train.batch_size * 2, device,
                             loader_options(cfg.train, 2))
    test_score = score(data.spec, y_test, p_test)
    record = result_record(cfg, data, trained, test_score, time.perf_counter() - start, model)
    if out_dir:
        model.cpu()
        write_outputs(out_dir, {
            "result.json": record,
            "history.csv": pd.DataFrame(trained.history),
            "predictions.csv": pd.DataFrame({"mbid": data.split.test, "target": y_test,
                                             "prediction": p_test}),
            "config.yaml": cfg.model_dump(),
            "checkpoint.pt": checkpoint_payload(model, cfg, data),
            **data_files(cfg.data, data.split, data.graphs),
        })
    return record
