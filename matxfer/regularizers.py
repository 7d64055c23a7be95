"""Anti-forgetting regularisers as pure functions on tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def l2_sp_penalty(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2-SP (Li et al. 2018): sum_i ||w_i - w0_i||^2 over the pretrained parameters.

    `anchors` are detached copies of the starting weights, same shapes as `params`. The squared
    difference (not a norm) keeps the gradient, 2 (w - w0), defined at w = w0. Multiply by
    lambda outside. The definition; the training step uses `add_l2_sp_grad_`, its
    closed-form gradient (tested equal).
    """
    if len(params) != len(anchors):
        raise ValueError(f"{len(params)} parameters but {len(anchors)} anchors")
    if not params:
        return torch.zeros(())
    diffs = torch._foreach_sub(list(params), list(anchors))
    return torch.stack([(d * d).sum() for d in diffs]).sum()


@torch.no_grad()
def add_l2_sp_grad_(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor],
                    scale: float) -> float:
    """Adds the gradient of scale * l2_sp_penalty, 2 * scale * (w - w0), to each parameter's
    .grad in place (a missing .grad becomes that term) and returns the penalty's value.

    Same gradient as back-propagating the penalty, without its autograd graph: fused
    multi-tensor ops making half the passes over the weights (benchmarks/README.md, row 1).
    Call it after loss.backward() (and after DDP's all-reduce: the term is the same on every
    rank) and before clipping and the optimizer step.
    """
    if len(params) != len(anchors):
        raise ValueError(f"{len(params)} parameters but {len(anchors)} anchors")
    if not params:
        return 0.0
    diffs = torch._foreach_sub(list(params), list(anchors))
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    torch._foreach_add_([p.grad for p in params], diffs, alpha=2.0 * scale)
    return scale * float(torch.stack(torch._foreach_norm(diffs)).pow(2).sum())


def bss_penalty(features: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Batch Spectral Shrinkage (Chen et al. 2019): sum of the k smallest squared singular values.

    features: [batch, dim] pooled features of the batch (not normalised). Only min(batch, dim)
    singular values exist; k is clipped to that. torch.linalg.svdvals keeps gradients finite
    even with repeated singular values. Multiply by eta outside.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [batch, dim], got shape {tuple(features.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sigma = torch.linalg.svdvals(features)  # descending
    k = min(k, sigma.numel())
    return sigma[-k:].pow(2).sum()
