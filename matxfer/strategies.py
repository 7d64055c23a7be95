"""Fine-tuning strategies besides the regularisers: freezing, layer-wise LR decay, LP-FT.

The backbone is split into blocks, bottom to top: the element embedding, then one block per
interaction layer (interaction + product). The head sits above the last block.
- Freezing the first k blocks (surgical fine-tuning): their parameters get requires_grad=False,
  so the optimizer, L2-SP (which anchors trainable parameters only) and DDP all skip them.
- Layer-wise LR decay: block b of n gets backbone_lr * decay**(n - b) (depth from the top; the
  top block has depth 1), the head keeps its own lr.
- LP-FT (Kumar et al. 2022): fit the head on frozen pooled features first (extracted once,
  forward only), then fine-tune everything from that head.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from matxfer.config import RunConfig
from matxfer.errors import UserError
from matxfer.graphs import iterate_batches
from matxfer.metrics import is_better, score, task_loss
from matxfer.model import PropertyModel, block_index, block_names


def n_blocks(model: PropertyModel) -> int:
    """Embedding + one block per interaction layer (3 for MACE-MP-0 small)."""
    return len(block_names(model.backbone))


def block_of(name: str) -> int | None:
    """Backbone block of a PropertyModel parameter name (0 = embedding; model.block_index);
    None for the head and the unused energy readouts."""
    if not name.startswith("backbone."):
        return None
    return block_index(name.removeprefix("backbone."))


def freeze_blocks(model: PropertyModel, k: int) -> list[str]:
    """Freeze the first k blocks; returns the frozen parameter names. Idempotent."""
    if k > n_blocks(model):
        raise UserError(f"strategy.freeze_blocks = {k}, but this backbone has "
                        f"{n_blocks(model)} blocks; allowed: 0-{n_blocks(model)}")
    frozen = []
    for name, p in model.named_parameters():
        block = block_of(name)
        if block is not None and block < k:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def param_groups(model: PropertyModel, cfg: RunConfig) -> list[dict]:
    """AdamW groups: one per backbone block holding trainable parameters (lr decayed by depth),
    then the head (its own lr and weight decay). The head group is always last."""
    t, decay, top = cfg.train, cfg.strategy.lr_decay, n_blocks(model)
    by_block: dict[int, list[nn.Parameter]] = {}
    for name, p in model.backbone_parameters():
        by_block.setdefault(block_index(name), []).append(p)  # trainable: in some block
    groups = [{"params": params, "lr": (t.backbone_lr or t.lr) * decay ** (top - block),
               "weight_decay": t.backbone_weight_decay, "block": block}
              for block, params in sorted(by_block.items())]
    groups.append({"params": list(model.head.parameters()), "lr": t.lr,
                   "weight_decay": t.head_weight_decay, "block": top})
    return groups


@torch.no_grad()
def frozen_features(model: PropertyModel, data, part: str, batch_size: int,
                    device) -> tuple[torch.Tensor, torch.Tensor]:
    """Head inputs [N, d] of the current backbone and targets [N] (task units) of a split."""
    was_training = model.training
    model.eval()
    xs, ys = [], []
    for batch in iterate_batches(data.graphs, data.rows[part], batch_size, device=device):
        xs.append(torch.cat(model.pooled_layer_features(batch), dim=-1))
        ys.append(batch["y"])
    model.train(was_training)
    return torch.cat(xs), torch.cat(ys)


def linear_probe(model: PropertyModel, data, cfg: RunConfig, device) -> list[dict]:
    """LP phase of LP-FT: train only the head on frozen features for strategy.lp_epochs epochs;
    keep the head of the best validation epoch. Backbone weights are not touched.
    Returns one row per epoch: lp_epoch, lp_loss, lp_val (validation metric, task units)."""
    t = cfg.train
    x_train, y_train = frozen_features(model, data, "train", 2 * t.batch_size, device)
    x_val, y_val = frozen_features(model, data, "val", 2 * t.batch_size, device)
    target = data.scaler.encode(y_train).to(x_train.dtype)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=t.lr,
                                  weight_decay=t.head_weight_decay)
    gen = torch.Generator().manual_seed(t.seed)
    rows, best, best_state = [], None, copy.deepcopy(model.head.state_dict())
    for epoch in range(1, cfg.strategy.lp_epochs + 1):
        order = torch.randperm(len(x_train), generator=gen).to(x_train.device)
        total = 0.0
        for chunk in order.split(t.batch_size):
            loss = task_loss(data.spec, model.head(x_train[chunk]).squeeze(-1), target[chunk])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(chunk)
        with torch.no_grad():
            pred = data.scaler.decode(model.head(x_val).squeeze(-1).double())
        val = score(data.spec, y_val.cpu().numpy(), pred.cpu().numpy())
        rows.append({"lp_epoch": epoch, "lp_loss": total / len(x_train), "lp_val": val})
        if best is None or is_better(data.spec, val, best):
            best, best_state = val, copy.deepcopy(model.head.state_dict())
    model.head.load_state_dict(best_state)
    return rows
