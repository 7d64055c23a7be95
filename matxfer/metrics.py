"""A task's training loss and its evaluation metric (Matbench's: MAE or ROC-AUC)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from matxfer.tasks import TaskSpec


def score(spec: TaskSpec, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """MAE in task units (regression) or ROC-AUC (classification)."""
    if spec.kind == "classification":
        from sklearn.metrics import roc_auc_score  # 0.35 s to import: only where it is used

        return float(roc_auc_score(y_true.astype(int), y_pred))
    return float(np.mean(np.abs(y_true - y_pred)))


def is_better(spec: TaskSpec, new: float, best: float) -> bool:
    """Whether `new` beats `best` (higher ROC-AUC, lower MAE)."""
    return new > best if spec.kind == "classification" else new < best


def task_loss(spec: TaskSpec, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 in standardised space (regression) or BCE with logits (classification)."""
    if spec.kind == "classification":
        return nn.functional.binary_cross_entropy_with_logits(out, target)
    return nn.functional.l1_loss(out, target)
