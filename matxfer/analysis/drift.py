"""How far fine-tuning moved the weights and the representations. Pure functions on tensors.

Relative drift of a group of tensors: ‖θ − θ0‖_F / ‖θ0‖_F over all of them together.
Linear CKA (Kornblith et al. 2019) of two representations X [n, d1], Y [n, d2]:
    ‖Ycᵀ Xc‖_F² / (‖Xcᵀ Xc‖_F · ‖Ycᵀ Yc‖_F), with Xc, Yc centred over the n rows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from matxfer.model import block_index


def module_group(name: str) -> str | None:
    """Parameter name of a PropertyModel -> its backbone block ('embedding', 'interaction_<i>':
    model.block_index) or 'head'; None for the unused energy readouts."""
    if name.startswith("head."):
        return "head"
    block = block_index(name.removeprefix("backbone."))
    return None if block is None else ("embedding" if block == 0 else f"interaction_{block - 1}")


def relative_drift(theta: list[torch.Tensor], theta0: list[torch.Tensor]) -> float:
    """‖θ − θ0‖_F / ‖θ0‖_F over the concatenation of matching tensors (0 if θ0 is all zero)."""
    diff = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(theta, theta0))
    base = sum(float(b.double().pow(2).sum()) for b in theta0)
    return (diff / base) ** 0.5 if base > 0 else 0.0


def group_drift(state: dict[str, torch.Tensor], state0: dict[str, torch.Tensor],
                names: list[str]) -> dict[str, float]:
    """Relative drift per module group over the parameters `names` of two state dicts."""
    groups: dict[str, list[str]] = {}
    for name in names:
        group = module_group(name)
        if group is not None:
            groups.setdefault(group, []).append(name)
    return {g: relative_drift([state[n] for n in ns], [state0[n] for n in ns])
            for g, ns in sorted(groups.items(), key=lambda kv: _group_order(kv[0]))}


def _group_order(group: str) -> tuple:
    """embedding, interaction_0, interaction_1, ..., head."""
    if group == "head":
        return (2, 0)
    return (0, 0) if group == "embedding" else (1, int(group.rpartition("_")[2]))


def element_rows(tensor: torch.Tensor, n_elements: int) -> torch.Tensor | None:
    """A weight with the element axis first ([n_elements, ...], MACE's symmetric contractions)
    viewed as [n_elements, -1]; None if the tensor is not laid out that way."""
    if tensor.dim() >= 2 and tensor.shape[0] == n_elements:
        return tensor.reshape(n_elements, -1)
    return None


RowsOf = Callable[[str, torch.Tensor], "torch.Tensor | None"]


def element_drift(state: dict[str, torch.Tensor], state0: dict[str, torch.Tensor],
                  names: list[str], rows_of: RowsOf, present: list[int]) -> dict[str, float]:
    """Per group, drift of the per-element rows of the elements `present` (table indices) only:
    rows of absent elements never receive a gradient and would dilute the per-tensor figure.
    `rows_of(name, tensor)` gives a per-element weight as [n_elements, -1], else None."""
    rows: dict[str, tuple[list, list]] = {}
    for name in names:
        group, new = module_group(name), rows_of(name, state[name])
        if group is None or new is None:
            continue
        pair = rows.setdefault(group, ([], []))
        pair[0].append(new[present])
        pair[1].append(rows_of(name, state0[name])[present])
    return {g: relative_drift(*pair) for g, pair in
            sorted(rows.items(), key=lambda kv: _group_order(kv[0]))}


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of representations x [n, d1] and y [n, d2] of the same n inputs; in [0, 1]."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / norm) if norm > 0 else 0.0
