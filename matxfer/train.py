"""The per-worker training loop: a plain function of (model, prepared fold data, config).

No Ray here: device placement and DDP wrapping come from the caller (cli -> run.py locally,
distributed.py under Ray Train), so this loop runs as-is in a unit test.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from matxfer.backbones.quiet_mace import import_mace
from matxfer.config import RunConfig, TrainConfig
from matxfer.datasets.splits import FoldSplit
from matxfer.graphs import GraphSet, epoch_batches, iterate_batches
from matxfer.metrics import is_better, score, task_loss
from matxfer.model import PropertyModel, TargetScaler
from matxfer.regularizers import add_l2_sp_grad_, bss_penalty
from matxfer.strategies import freeze_blocks, linear_probe, param_groups
from matxfer.tasks import TaskSpec


@dataclass
class FoldData:
    """One task and fold, ready to train: graphs, ids and row positions per split, scaler."""

    spec: TaskSpec
    graphs: GraphSet
    split: FoldSplit
    scaler: TargetScaler
    rows: dict[str, list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.rows = {part: self.graphs.positions_of(getattr(self.split, part))
                     for part in ("train", "val", "test")}


@dataclass
class TrainResult:
    history: list[dict]
    best_epoch: int
    best_val: float
    best_state: dict

    @property
    def epochs_run(self) -> int:
        return len(self.history)


def loader_options(t: TrainConfig, factor: int = 1) -> dict[str, int | None]:
    """iterate_batches options: the atom/edge budgets of training batches (factor 2:
    evaluation, which keeps no graph) and the prefetch depth."""
    return {"max_atoms": t.max_batch_atoms and factor * t.max_batch_atoms,
            "max_edges": t.max_batch_edges and factor * t.max_batch_edges,
            "prefetch": t.prefetch_batches}


def epoch_seed(t: TrainConfig, epoch: int) -> int:
    """The shuffling seed of one epoch (the same on every rank)."""
    return t.seed * 100_003 + epoch


def schedule_steps(data: FoldData, t: TrainConfig, world_size: int) -> int:
    """Optimizer steps of the whole run on each rank: the batches of every epoch's shuffled
    order (under atom/edge budgets their count depends on the order)."""
    budget = t.max_batch_atoms is not None or t.max_batch_edges is not None
    epochs = range(1, t.epochs + 1) if budget else [1]  # without budgets: the same count
    steps = [len(epoch_batches(data.graphs, data.rows["train"], t.batch_size, True,
                               epoch_seed(t, e), 0, world_size, t.max_batch_atoms,
                               t.max_batch_edges)) for e in epochs]
    return max(1, sum(steps) if budget else steps[0] * t.epochs)


@torch.no_grad()
def predict(model: nn.Module, data: FoldData, part: str, batch_size: int,
            device: torch.device | str = "cpu",
            budget: dict[str, int | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(targets, predictions) in task units for split `part` ('train', 'val' or 'test');
    `budget`: loader_options() (atom/edge limits per batch, prefetch depth)."""
    was_training = model.training
    model.eval()
    ys, preds = [], []
    for batch in iterate_batches(data.graphs, data.rows[part], batch_size, device=device,
                                 **(budget or {})):
        out, _ = model(batch)
        ys.append(batch["y"].cpu())
        preds.append(data.scaler.decode(out.double()).cpu())
    model.train(was_training)
    return torch.cat(ys).numpy(), torch.cat(preds).numpy()


def make_optimizer(model: PropertyModel, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW: one group per trainable backbone block (lr decayed by depth when
    strategy.lr_decay < 1), then the head with its own lr and weight decay."""
    return torch.optim.AdamW(param_groups(model, cfg))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to each group's lr, then cosine decay to zero, stepped per batch."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Objective:
    """Task loss + lambda * L2-SP + eta * BSS for one batch; keeps w0 for L2-SP.

    The call returns the differentiable part (task loss + BSS); L2-SP's gradient is closed
    form and `after_backward` adds it to the gradients (and its value to the terms)."""

    def __init__(self, model: PropertyModel, cfg: RunConfig, spec: TaskSpec,
                 scaler: TargetScaler) -> None:
        reg = cfg.regularizers
        self.spec, self.scaler = spec, scaler
        self.l2sp, self.bss, self.bss_k = reg.l2sp, reg.bss, reg.bss_k
        self.params = [p for _, p in model.backbone_parameters()]
        self.anchors = [p.detach().clone() for p in self.params] if self.l2sp > 0 else []

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        out, pooled = model(batch)
        target = self.scaler.encode(batch["y"]).to(out.dtype)
        loss_task = task_loss(self.spec, out, target)
        loss = loss_task
        terms = {"task_loss": loss_task.item(), "l2sp_term": 0.0, "bss_term": 0.0}
        if self.bss > 0 and pooled[-1].shape[0] > 1:  # one structure has no batch spectrum
            bss = self.bss * bss_penalty(pooled[-1], self.bss_k)
            loss, terms["bss_term"] = loss + bss, bss.item()
        terms["train_loss"] = loss.item()
        return loss, terms

    def after_backward(self, terms: dict[str, float]) -> None:
        """Add lambda * L2-SP's gradient to the parameters' .grad; complete the terms."""
        if self.l2sp > 0:
            terms["l2sp_term"] = add_l2_sp_grad_(self.params, self.anchors, self.l2sp)
            terms["train_loss"] += terms["l2sp_term"]


def train_epoch(model: nn.Module, objective: Objective, optimizer, scheduler, data: FoldData,
                cfg: RunConfig, epoch: int, device, rank: int, world_size: int) -> dict:
    """One pass over this rank's share of the training split; returns mean terms and speed."""
    model.train()
    sums: dict[str, float] = {}
    n_batches = n_structs = 0
    start = time.perf_counter()
    for batch in iterate_batches(data.graphs, data.rows["train"], cfg.train.batch_size,
                                 shuffle=True, seed=epoch_seed(cfg.train, epoch),
                                 rank=rank, world_size=world_size, device=device,
                                 **loader_options(cfg.train)):
        loss, terms = objective(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        objective.after_backward(terms)
        if cfg.train.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        n_batches += 1
        n_structs += batch["ptr"].numel() - 1
    seconds = time.perf_counter() - start
    if world_size > 1:  # every rank reports (and checks) the means over all ranks
        sums, n_batches, n_structs = all_ranks_sum(sums, n_batches, n_structs, device)
    metrics = {k: v / max(1, n_batches) for k, v in sums.items()}
    metrics.update(seconds=seconds, structures_per_s=n_structs / max(seconds, 1e-9))
    return metrics


def all_ranks_sum(sums: dict[str, float], n_batches: int, n_structs: int,
                  device) -> tuple[dict[str, float], int, int]:
    """The epoch's loss sums and counts added over all DDP ranks (a NaN on one rank makes
    every rank's mean NaN, so every rank stops with the same message)."""
    keys = sorted(sums)
    packed = torch.tensor([sums[k] for k in keys] + [n_batches, n_structs],
                          dtype=torch.float64, device=device)
    torch.distributed.all_reduce(packed)
    values = packed.tolist()
    return dict(zip(keys, values[:-2])), int(values[-2]), int(values[-1])


def training_state(raw: PropertyModel, optimizer, scheduler, epoch: int,
                   result: TrainResult) -> dict:
    """Everything needed to continue after `epoch` exactly as if never stopped."""
    return {"epoch": epoch, "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "history": list(result.history),
            "best_epoch": result.best_epoch, "best_val": result.best_val,
            "best_state": result.best_state}


def restore_state(raw: PropertyModel, optimizer, scheduler, state: dict) -> TrainResult:
    """Load a `training_state` dict; returns the result so far (history, best epoch, weights)."""
    raw.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return TrainResult(list(state["history"]), state["best_epoch"], state["best_val"],
                       state["best_state"])


def probe_head(raw: PropertyModel, data: FoldData, cfg: RunConfig, device, world_size: int,
               log: Callable[[str], None] | None) -> None:
    """LP phase of LP-FT on every rank (same data, same seed), then rank 0's head everywhere."""
    for row in linear_probe(raw, data, cfg, device):
        if log:
            log(f"LP epoch {row['lp_epoch']:3d}  head loss {row['lp_loss']:.4f}  "
                f"val {row['lp_val']:.4f}")
    if world_size > 1:  # round-off may differ between ranks; DDP needs identical replicas
        for p in raw.head.parameters():
            torch.distributed.broadcast(p.data, 0)


EpochCallback = Callable[[dict, TrainResult, Callable[[], dict]], None]


@torch.no_grad()
def zero_shot(raw: PropertyModel, data: FoldData, cfg: RunConfig, device,
              on_epoch: EpochCallback | None, log: Callable[[str], None] | None) -> TrainResult:
    """No training: one row with the calibration's training loss and validation score."""
    spec, batch_size = data.spec, cfg.train.batch_size * 2
    started = time.perf_counter()
    losses, n = 0.0, 0
    for batch in iterate_batches(data.graphs, data.rows["train"], batch_size, device=device):
        out, _ = raw(batch)
        losses += float(task_loss(spec, out, data.scaler.encode(batch["y"]).to(out.dtype)))
        n += 1
    seconds = time.perf_counter() - started
    metric = f"val_{spec.metric}"
    row = {"epoch": 1, "lr": 0.0, "train_loss": losses / max(n, 1),
           "task_loss": losses / max(n, 1), "l2sp_term": 0.0, "bss_term": 0.0,
           "seconds": seconds, "structures_per_s": len(data.rows["train"]) / max(seconds, 1e-9)}
    started = time.perf_counter()
    row[metric] = score(spec, *predict(raw, data, "val", batch_size, device))
    row["val_seconds"] = time.perf_counter() - started
    result = TrainResult([row], 1, row[metric], copy.deepcopy(raw.state_dict()))
    if log:
        log(f"zero-shot physics: calibration fitted on the training split, {metric} "
            f"{row[metric]:.4f} (no fine-tuning)")
    if on_epoch:
        on_epoch(row, result, lambda: {
            "epoch": 1, "model": raw.state_dict(), "optimizer": {}, "scheduler": {},
            "history": [row], "best_epoch": 1, "best_val": row[metric],
            "best_state": result.best_state})
    return result


def compiled(model: nn.Module, backend: str) -> nn.Module:
    """torch.compile for the training step: shapes change every batch, so dynamic; the
    backbone must come from model.compile_ready (build_model(..., for_compile=True))."""
    import_mace()
    from mace.tools.compile import configure_autograd_for_compile

    configure_autograd_for_compile()
    return torch.compile(model, backend=backend, dynamic=True)


def fit(model: nn.Module, data: FoldData, cfg: RunConfig, device: torch.device | str = "cpu",
        rank: int = 0, world_size: int = 1, on_epoch: EpochCallback | None = None,
        log: Callable[[str], None] | None = print, resume: dict | None = None) -> TrainResult:
    """Train with early stopping on the validation metric; best weights are restored at the end.

    `model` may be DDP-wrapped; penalties and state use the underlying PropertyModel.
    `on_epoch(metrics, result_so_far, state)` runs after every epoch (Ray reporting,
    checkpoints); `state()` builds the `training_state` dict that `resume` continues from.
    """
    raw: PropertyModel = getattr(model, "module", model)
    if raw.physics == "zero-shot":  # the calibration fitted on the training fold is the model
        return zero_shot(raw, data, cfg, device, on_epoch, log)
    spec, t = data.spec, cfg.train
    torch.manual_seed(t.seed)
    freeze_blocks(raw, cfg.strategy.freeze_blocks)  # before DDP wrapping too (callers do it)
    if cfg.strategy.lp_epochs and not resume:
        probe_head(raw, data, cfg, device, world_size, log)
    objective = Objective(raw, cfg, spec, data.scaler)  # anchors w0 before any resumed weights
    optimizer = make_optimizer(raw, cfg)
    steps = schedule_steps(data, t, world_size)
    warmup = min(steps, int(t.warmup_epochs * steps / t.epochs))
    scheduler = warmup_cosine(optimizer, warmup, steps)
    metric = f"val_{spec.metric}"
    result = TrainResult([], 0, -math.inf if spec.kind == "classification" else math.inf,
                         copy.deepcopy(raw.state_dict()))
    if resume:
        result = restore_state(raw, optimizer, scheduler, resume)
    step_model = model if t.compile == "off" else compiled(model, t.compile)
    for epoch in range(result.epochs_run + 1, t.epochs + 1):
        if t.patience and result.history and epoch - 1 - result.best_epoch >= t.patience:
            break  # resumed after the epoch that triggered early stopping
        row = {"epoch": epoch, "lr": optimizer.param_groups[-1]["lr"]}
        row.update(train_epoch(step_model, objective, optimizer, scheduler, data, cfg, epoch,
                               device, rank, world_size))
        if not math.isfinite(row["train_loss"]):
            raise FloatingPointError(f"training loss became {row['train_loss']} at epoch {epoch}")
        started = time.perf_counter()
        row[metric] = score(spec, *predict(raw, data, "val", t.batch_size * 2, device,
                                           loader_options(t, 2)))
        row["val_seconds"] = time.perf_counter() - started
        result.history.append(row)
        if is_better(spec, row[metric], result.best_val):
            result.best_val, result.best_epoch = row[metric], epoch
            result.best_state = copy.deepcopy(raw.state_dict())
        if log:
            log(f"epoch {epoch:3d}/{t.epochs}  loss {row['train_loss']:.4f}  "
                f"{metric} {row[metric]:.4f}  best {result.best_val:.4f} (epoch "
                f"{result.best_epoch})  {row['structures_per_s']:.1f} struct/s")
        if on_epoch:
            on_epoch(row, result, lambda e=epoch: training_state(raw, optimizer, scheduler,
                                                                 e, result))
        if t.patience and epoch - result.best_epoch >= t.patience:
            break
    raw.load_state_dict(result.best_state)
    return result
