"""Preflight: every check of files, packages, devices and services a study needs, run once
before any work, and the plan it prints (`matxfer tune CONFIG --check`).

`preflight` collects every problem it finds (not only the first), so `--check` names all of
them in one line; `run_study` calls the same function and refuses on the same problems.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import urllib.parse
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from matxfer.backbones.mace_cueq import cueq_available
from matxfer.checkpoint import CHECKPOINT_FILE
from matxfer.config import DataConfig, RunConfig, StudyConfig
from matxfer.datasets.matbench import local_data_file
from matxfer.datasets.sources import source_format, source_sha256
from matxfer.errors import UserError
from matxfer.identity import StudyIdentity, fold_status, folder_conflict, identify
from matxfer.model_facts import ModelFacts, model_facts
from matxfer.physics.config import PhysicsConfig
from matxfer.run import check_free_space, check_writable
from matxfer.scheduling import (
    describe_nodes,
    durable_location_problems,
    fits,
    per_worker_resources,
)
from matxfer.tracking import check_reachable, file_sha256, resolve_tracking_uri

MARGIN = 16 * 2**20  # bytes kept free beyond the estimated results
LOCAL_CPUS = os.cpu_count() or 1  # what tune.init_ray gives a local instance


@dataclass
class Plan:
    """The outcome of a preflight: what would run, where, and what stops it."""

    study: StudyConfig
    ident: StudyIdentity | None = None
    model: ModelFacts | None = None
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, label: str, text: str) -> None:
        self.lines.append(f"  {label:<9} {text}")

    def raise_problems(self) -> None:
        if self.problems:
            raise UserError("; ".join(self.problems))


@lru_cache(maxsize=4)
def restriction_check(source: str) -> str | None:
    """Why model.restrict_elements cannot run on this MACE model, or None."""
    from matxfer.backbones.mace_elements import restriction_problem
    from matxfer.model import load_backbone

    return restriction_problem(load_backbone(source, dtype=torch.float64), source)


@lru_cache(maxsize=1)
def download_reachable(url: str, timeout: float = 5.0) -> str | None:
    """None when the host of `url` accepts a TCP connection, else the reason."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except OSError as err:
        return str(err.strerror or err)


def matminer_url(task: str) -> str:
    from matminer.datasets.utils import _load_dataset_dict

    return _load_dataset_dict()[task]["url"]


def data_problems(data: DataConfig) -> list[str]:
    """The task's data file is here (data_dir, MATMINER_DATA, ../shared) or downloadable;
    your own data: its file exists."""
    if data.source is not None:
        path = Path(data.source.path)
        return [] if path.is_file() else [f"data.source.path {str(path)!r} does not exist"]
    if local_data_file(data.task, data.data_dir) is not None:
        return []
    if data.data_dir:
        return [f"data_dir {data.data_dir!r} holds no {data.task}.json.gz"]
    url = matminer_url(data.task)
    reason = download_reachable(url)
    return [f"data for {data.task} is not on this machine and {url} is unreachable "
            f"({reason}): set MATMINER_DATA or run.data.data_dir"] if reason else []


def physics_problems(physics: PhysicsConfig | None) -> list[str]:
    """Packages the descriptors to compute need (None: no physics in use)."""
    if (physics is not None and "exfoliation_energy" in physics.descriptors
            and physics.dispersion and importlib.util.find_spec("torch_dftd") is None):
        return ["model.physics.dispersion (D3 for exfoliation_energy) needs torch-dftd (pip "
                "install torch-dftd); allowed without it: dispersion false"]
    return []


def compute_problems(cfg: RunConfig, physics: PhysicsConfig | None = None) -> list[str]:
    """Packages and devices the run's compute path needs (`physics`: the descriptors it
    computes, when not only the run's own)."""
    used = cfg.model.physics if cfg.model.physics and cfg.model.physics.mode != "off" else None
    problems = physics_problems(physics or used)
    if cfg.model.kernels == "cueq" and not cueq_available():
        problems.append("model.kernels 'cueq' needs cuequivariance-torch (pip install "
                        "'matxfer[cueq]'); allowed without it: 'e3nn'")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        problems.append("train.device 'cuda' requested but no CUDA device is available")
    return problems


def preflight_run(cfg: RunConfig) -> ModelFacts:
    """The checks of one fine-tune (`matxfer train`): data, model, packages, devices; every
    problem in one UserError. Returns what it learnt of the model."""
    problems = data_problems(cfg.data) + compute_problems(cfg)
    facts = None
    try:
        facts = model_facts(cfg.model.source, cfg.model.dtype, cfg.data.cache_dir)
    except UserError as err:
        problems.append(str(err))
    if facts is not None and cfg.strategy.freeze_blocks > facts.n_blocks:
        problems.append(f"strategy.freeze_blocks {cfg.strategy.freeze_blocks} exceeds the "
                        f"backbone's {facts.n_blocks} blocks; allowed: 0-{facts.n_blocks}")
    if facts is not None and cfg.model.restrict_elements:
        problems += [p for p in [restriction_check(cfg.model.source)] if p]
    if problems:
        raise UserError("; ".join(problems))
    return facts


def preflight_predict(ref: str) -> None:
    """`matxfer predict --model REF`: a checkpoint file, or a folder holding one, or a
    registered model on a tracking server that answers (checked before any download)."""
    path = Path(ref)
    if path.is_dir() and not (path / CHECKPOINT_FILE).is_file():
        raise UserError(f"--model {ref!r} is a folder without {CHECKPOINT_FILE}; pass a run "
                        "or fold folder, a checkpoint file, or a registered model NAME[@ALIAS]")
    if not path.exists():
        check_reachable(resolve_tracking_uri())


def check_own_data(plan: Plan, data: DataConfig) -> str:
    """A user's data file(s): present and readable (their content hash), and how it splits."""
    src, split = data.source, data.outer_split
    problems = data_problems(data)
    if not problems:
        try:
            sha = source_sha256(src)
        except UserError as err:
            problems.append(str(err))
    if problems:
        plan.problems += problems
        return "missing"
    column = f" by {split.column!r}" if split.method == "column" else ""
    plan.add("data", f"{data.task}: your data {src.path} ({source_format(src)}, target "
             f"{src.target!r}{', ' + src.unit if src.unit else ''}, {src.kind}; sha256 "
             f"{sha[:12]}), split {split.method}{column} k={split.k} seed {split.seed}")
    return sha


def check_data(plan: Plan) -> str:
    """The task's data file (its SHA-256), or 'matminer:<task>' when it will be downloaded."""
    data = plan.study.run.data
    if data.source is not None:
        return check_own_data(plan, data)
    spec = data.spec
    local = local_data_file(data.task, data.data_dir)
    if local is not None:
        sha = file_sha256(str(local))
        plan.add("data", f"{spec.name}: {spec.size} structures ({spec.target}, {spec.unit}), "
                 f"{local} (sha256 {sha[:12]})")
        return sha
    problems = data_problems(data)
    plan.problems += problems
    if data.data_dir:
        return "missing"
    plan.add("data", f"{spec.name}: {spec.size} structures, downloaded by matminer from "
             f"{matminer_url(data.task)}")
    return f"matminer:{data.task}"


def check_model(plan: Plan) -> str:
    cfg = plan.study.run.model
    try:
        facts = model_facts(cfg.source, cfg.dtype, plan.study.run.data.cache_dir)
    except UserError as err:
        plan.problems.append(str(err))
        return "missing"
    plan.model = facts
    if cfg.restrict_elements:
        plan.problems += [p for p in [restriction_check(cfg.source)] if p]
    plan.add("model", f"{cfg.source} ({facts.path.name}, sha256 {facts.sha256[:12]}, "
             f"{facts.n_params:,} parameters), init {cfg.init}, pooling {cfg.pooling}")
    for k in [plan.study.run.strategy.freeze_blocks, *(plan.study.search.freeze_blocks or [])]:
        if k > facts.n_blocks:
            plan.problems.append(f"freeze_blocks {k} exceeds the backbone's {facts.n_blocks} "
                                 f"blocks; allowed: 0-{facts.n_blocks}")
    return facts.sha256


def check_cluster(plan: Plan, nodes: list[dict]) -> None:
    """Attached to a cluster: can one trial's workers ever be placed on its nodes?"""
    s = plan.study.scaling
    verdict = fits(per_worker_resources(s.cpus_per_worker, s.use_gpu), s.num_workers, nodes)
    plan.add("cluster", describe_nodes(nodes))
    if verdict is not True:
        plan.problems.append(f"{verdict}; nodes offer: {describe_nodes(nodes)}")


def check_devices(plan: Plan, attached: bool) -> None:
    s = plan.study.scaling
    shape = f"CPU {s.cpus_per_worker:g}" + (f", GPU {s.gpus_per_worker:g}" if s.use_gpu else "")
    backend = ("DDP, NCCL" if s.use_gpu else "DDP, gloo") if s.num_workers > 1 else \
        "in the trial's own process"
    plan.add("workers", f"{s.num_workers} per trial x {{{shape}}} ({backend}), "
             f"{plan.study.max_concurrent_trials} trial(s) at a time")
    local_cpus = LOCAL_CPUS
    no_cuda = s.use_gpu and not torch.cuda.is_available()  # reported below, once
    if not attached and not no_cuda and s.num_workers * s.cpus_per_worker > local_cpus:
        plan.problems.append(
            f"one trial needs {s.num_workers} worker(s) x {s.cpus_per_worker:g} CPUs but the "
            f"local Ray instance has {local_cpus} (lower scaling.cpus_per_worker or "
            "scaling.num_workers, or attach a cluster with --address)")
    if no_cuda and not attached:
        plan.problems.append("scaling.use_gpu is true but this machine has no CUDA device "
                             "(pass --cpu for gloo CPU workers, or --address of a GPU cluster)")


def describe_search(plan: Plan) -> None:
    study = plan.study
    space = study.search
    parts = []
    for name in space.searched():
        entry = getattr(space, name)
        if isinstance(entry, list):
            parts.append(f"{name} in {entry}")
        else:
            parts.append(f"{name} log-uniform [{entry.low:g}, {entry.high:g}]"
                         + (" or off" if entry.allow_off else ""))
    if not parts:
        parts = ["nothing (one run per fold)"]
    if space.first_trial_off:
        parts.append("first trial all off" if space.first_point()
                     else "first_trial_off does not apply (no range can be off)")
    plan.add("search", "; ".join(parts))
    grace = min(study.asha.grace_period, study.run.train.epochs)
    asha = (f"ASHA (grace {grace} epochs, reduction "
            f"{study.asha.reduction_factor:g})" if study.asha.enabled and study.num_samples > 1
            else "no early stopping of trials")
    requested = study.num_samples_requested
    capped = (f" (num_samples {requested} {'capped' if requested > study.num_samples else 'raised'}"
              f": the space holds {study.num_samples} distinct trial(s), each run once)"
              if requested != study.num_samples else "")
    plan.add("trials", f"{study.num_samples} per fold{capped}, {asha}")
    t = study.run.train
    plan.add("budget", f"{t.epochs} epochs, batch {t.batch_size}, patience {t.patience}, "
             f"max_structures {study.run.data.max_structures}")
    physics = study.physics_to_compute()
    if physics is not None:
        mode = "searched" if study.search.physics else physics.mode
        chosen = [n for n in ("descriptors", "calibration") if getattr(study.search, n)]
        per_fold = f"; {' and '.join(chosen)} picked per fold" if chosen else ""
        plan.add("physics", f"{mode}: {', '.join(physics.descriptors)} of the "
                 f"pretrained potential (computed once per dataset before the first trial, "
                 f"then cached){per_fold}")


def check_outputs(plan: Plan) -> None:
    study, ident = plan.study, plan.ident
    checks = [(Path(study.study_dir or study.output_dir), "study_dir" if study.study_dir
               else "output_dir")]
    if "://" not in study.storage_path:  # s3:// and friends are checked by Ray
        checks.append((Path(study.storage_path), "storage_path"))
    for path, what in checks:
        try:
            check_writable(path, what)
        except UserError as err:
            plan.problems.append(str(err))
            return
    if plan.model is not None:
        weights = plan.model.n_bytes
        needs = [(checks[0], len(study.folds) * 2 * weights)]
        if len(checks) > 1:  # each running trial keeps a checkpoint (+ optimizer state)
            needs.append((checks[1], study.max_concurrent_trials * 2 * 5 * weights))
        for (path, what), size in needs:
            try:
                check_free_space(path, size + MARGIN, what)
            except UserError as err:
                plan.problems.append(str(err))
    conflict = folder_conflict(ident)
    if conflict:
        plan.problems.append(conflict)
    status = {f: fold_status(ident, f, storage_dir(study)) for f in study.folds}
    plan.add("folds", "  ".join(f"{f}: {s}" for f, s in status.items())
             + "   (finished: skipped; interrupted: resumed)")
    plan.add("results", f"{ident.folder}/  (fingerprint {ident.fingerprint})")
    plan.add("ray", f"{storage_dir(study)}/{ident.run_name(study.folds[0])} ...")


def storage_dir(study: StudyConfig) -> str:
    path = study.storage_path
    return path if "://" in path else str(Path(path).absolute())


def check_tracking(plan: Plan) -> None:
    tracking = plan.study.tracking
    if not tracking.enabled:
        plan.add("tracking", "off")
        return
    uri = resolve_tracking_uri(tracking.uri)
    try:
        check_reachable(uri)
    except UserError as err:
        plan.problems.append(str(err))
    plan.add("tracking", f"{uri}, experiment {tracking.experiment or plan.study.run.data.task}")


def preflight(study: StudyConfig, nodes: list[dict] | None = None) -> Plan:
    """Check everything a study needs before training; the plan lists what would run.
    `nodes`: the attached cluster's nodes (scheduling.cluster_nodes), None for a local run."""
    plan = Plan(study)
    plan.lines.append(f"study {study.run.data.task} [{study.name}]")
    data_sha = check_data(plan)
    weights_sha = check_model(plan)
    plan.ident = identify(study, data_sha, weights_sha)
    plan.lines[0] += f"  fingerprint {plan.ident.fingerprint}"
    describe_search(plan)
    plan.problems += compute_problems(study.run, study.physics_to_compute())
    check_devices(plan, attached=nodes is not None)
    if nodes is not None:
        check_cluster(plan, nodes)
    check_outputs(plan)
    check_tracking(plan)
    tracking = (resolve_tracking_uri(study.tracking.uri) if study.tracking.enabled else "off")
    plan.problems += durable_location_problems(study.study_dir or study.output_dir,
                                               study.storage_path, tracking)
    return plan
