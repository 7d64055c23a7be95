"""Element restriction: run the backbone on the task's elements only, same weights, same results.

MACE-MP-0 carries per-element weights for 89 elements (node embedding, skip tensor products,
symmetric contractions); a task uses a few dozen. MACE's own fine-tuning copies the present
elements into a smaller model (`load_foundations_elements`); here that smaller model is only a
compute path: its element tables are gathered from the full model's parameters at every forward,
so the full parameters stay the only weights (optimizer, L2-SP anchor, checkpoints and drift see
the 89-element model) and gradients flow back to them unchanged.

The gather map is found by probing `load_foundations_elements` itself with index-coded weights,
so it follows whatever layout and rescaling MACE uses for each block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from matxfer.backbones.quiet_mace import import_mace


@dataclass(frozen=True)
class Gather:
    """restricted[name] = full[source] (identity), or full[source] viewed as `rows` =
    (A, n_full, B) with the elements' rows of axis 1 selected, or full[source].flatten()[index];
    then times `scale` and viewed as `shape`."""

    source: str
    index: torch.Tensor | None  # [numel] int64 into the flattened source; None: identity/rows
    scale: torch.Tensor | None  # [] or [numel] model dtype; None: 1
    shape: torch.Size
    rows: tuple[int, int, int] | None = None


def _row_select(local: torch.Tensor, numel: int, columns: torch.Tensor,
                n_full: int) -> tuple[int, int, int] | None:
    """(A, n_full, B) when flat gather `local` is view(A, n_full, B)[:, columns, :] of a
    parameter with `numel` weights (MACE's per-element tables are all of this form)."""
    if numel % n_full or local.numel() % len(columns):
        return None
    inner = numel // n_full
    for b in (d for d in range(1, inner + 1) if inner % d == 0):
        a = inner // b
        expected = (torch.arange(a)[:, None, None] * n_full * b + columns[None, :, None] * b
                    + torch.arange(b)[None, None, :]).flatten()
        if expected.numel() == local.numel() and torch.equal(expected, local):
            return (a, n_full, b)
    return None


def _restricted_twin(full: nn.Module, elements: Sequence[int]) -> nn.Module:
    """A fresh MACE of the same architecture whose element tables hold only `elements`."""
    import_mace()
    from mace.tools.scripts_utils import extract_config_mace_model

    index = [int(z) for z in full.atomic_numbers]
    cfg = extract_config_mace_model(full)
    cfg["atomic_numbers"], cfg["num_elements"] = list(elements), len(elements)
    cfg["atomic_energies"] = cfg["atomic_energies"][..., [index.index(z) for z in elements]]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return type(full)(**cfg).double()
    finally:
        torch.set_default_dtype(previous)


def _copy_elements(twin: nn.Module, full: nn.Module, elements: Sequence[int]) -> dict:
    """MACE's own restriction of `full` into `twin` (in place: it also copies non-parameter
    attributes such as avg_num_neighbors); returns the twin's parameters by name."""
    import_mace()
    from mace.tools.finetuning_utils import load_foundations_elements
    from mace.tools.scripts_utils import extract_config_mace_model
    from mace.tools.utils import AtomicNumberTable

    max_l = extract_config_mace_model(full)["hidden_irreps"].lmax
    load_foundations_elements(twin, full, AtomicNumberTable(list(elements)),
                              load_readout=True, max_L=max_l)
    return {n: p.detach().clone() for n, p in twin.named_parameters()}


def _probe(full: nn.Module, twin: nn.Module, elements: Sequence[int]) -> tuple[dict, ...]:
    """Restrict copies of `full` whose weights are coded by global position: (position + 1,
    position + 1 + total, 1) per weight; returns the twin's parameters for each code, the full
    parameter names and their start offsets in the global numbering."""
    import copy

    probe = copy.deepcopy(full).double()
    params = dict(probe.named_parameters())
    names = list(params)
    sizes = torch.tensor([params[n].numel() for n in names])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    total = float(starts[-1])

    def restrict(code) -> dict:
        with torch.no_grad():
            for n, s in zip(names, starts[:-1].tolist()):
                params[n].copy_(code(torch.arange(s, s + params[n].numel(),
                                                  dtype=torch.float64)).view_as(params[n]))
        return _copy_elements(twin, probe, elements)

    coded = restrict(lambda i: i + 1)
    shifted = restrict(lambda i: i + 1 + total)
    ones = restrict(torch.ones_like)
    return coded, shifted, ones, names, starts


def gather_map(full: nn.Module, elements: Sequence[int]) -> tuple[nn.Module, dict[str, Gather]]:
    """The restricted twin of `full` and, per twin parameter, where it comes from in `full`.

    Raises ValueError when a twin parameter is not a (scaled) gather of one full parameter.
    """
    twin = _restricted_twin(full, elements)
    table = [int(z) for z in full.atomic_numbers]
    columns, n_full = torch.tensor([table.index(int(z)) for z in elements]), len(table)
    coded, shifted, ones, names, starts = _probe(full, twin, elements)
    _copy_elements(twin, full, elements)  # the real weights and attributes, last
    buffers = dict(full.named_buffers())  # MACE turns some full buffers into twin parameters:
    dtype, maps = next(full.parameters()).dtype, {}  # those keep the twin's own (copied) value
    for name in (n for n in coded if n not in buffers):
        position = torch.round(coded[name] / ones[name]).long().flatten() - 1
        moved = torch.round(shifted[name] / ones[name]).long().flatten() - 1 - int(starts[-1])
        which = int(torch.searchsorted(starts, position[0], right=True)) - 1
        local = position - starts[which]
        if not torch.equal(position, moved) or not ((local >= 0) & (
                local < starts[which + 1] - starts[which])).all():
            raise ValueError(f"restricted parameter {name} is not a gather of one full parameter")
        maps[name] = _gather(names[which], local, ones[name].flatten(), coded[name].shape,
                             int(starts[which + 1] - starts[which]), columns, n_full, dtype)
    return twin.to(dtype), maps


def _gather(source: str, local: torch.Tensor, scale: torch.Tensor, shape: torch.Size,
            numel: int, columns: torch.Tensor, n_full: int, dtype: torch.dtype) -> Gather:
    """The cheapest Gather that reproduces flat gather `local` times `scale`."""
    if bool((scale == scale[0]).all()):
        scale = scale[:1].reshape(())  # MACE rescales a whole table by one factor
    scale = None if bool((scale == 1).all()) else scale.to(dtype)
    if local.numel() == numel and torch.equal(local, torch.arange(numel)):
        return Gather(source, None, scale, shape)
    rows = _row_select(local, numel, columns, n_full)
    return Gather(source, None if rows else local, scale, shape, rows)


class _Features(nn.Module):
    """twin + feature function as one module, so torch.func.functional_call can swap in the
    gathered parameters."""

    def __init__(self, twin: nn.Module, features: Callable) -> None:
        super().__init__()
        self.twin, self.features = twin, features

    def forward(self, batch: dict) -> list[torch.Tensor]:
        return self.features(self.twin, batch)


class RestrictedBackbone:
    """The restricted compute path of a full backbone; not an nn.Module on purpose, so its
    twin's parameters never reach optimizers, state dicts or DDP."""

    def __init__(self, full: nn.Module, elements: Sequence[int], features: Callable) -> None:
        """features(backbone, batch) -> per-layer node features (backbones.mace's)."""
        self.elements = [int(z) for z in elements]
        twin, self.maps = gather_map(full, self.elements)
        for p in twin.parameters():
            p.requires_grad_(False)
        self.module = _Features(twin, features)
        table = [int(z) for z in full.atomic_numbers]
        self.columns = torch.tensor([table.index(z) for z in self.elements])
        others = torch.ones(len(table), dtype=torch.bool)
        others[self.columns] = False
        self.other_columns = others.nonzero().flatten()

    def apply_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a tensor conversion (nn.Module._apply's fn: device/dtype) to every tensor."""
        self.module._apply(fn)
        self.columns, self.other_columns = fn(self.columns), fn(self.other_columns)
        self.maps = {n: Gather(g.source, None if g.index is None else fn(g.index),
                               None if g.scale is None else fn(g.scale), g.shape, g.rows)
                     for n, g in self.maps.items()}

    def covers(self, node_attrs: torch.Tensor) -> bool:
        """Whether every atom of a batch ([n_atoms, 89] one-hot) is one of the elements."""
        return not bool(node_attrs[:, self.other_columns].any())

    def parameters_from(self, full: nn.Module) -> dict[str, torch.Tensor]:
        """The twin's parameters gathered (differentiably) from the full backbone's."""
        params = dict(full.named_parameters())
        out = {}
        for name, g in self.maps.items():
            source = params[g.source]
            if g.rows is not None:
                source = source.reshape(g.rows).index_select(1, self.columns)
            elif g.index is not None:
                source = source.flatten()[g.index]
            if g.scale is not None:
                source = source * g.scale
            out["twin." + name] = source.reshape(g.shape)
        return out

    def layer_features(self, full: nn.Module, batch: dict) -> list[torch.Tensor]:
        """The full backbone's features for a batch of the elements, computed on the twin."""
        from torch.func import functional_call

        batch = {**batch, "node_attrs": batch["node_attrs"][:, self.columns]}
        return functional_call(self.module, self.parameters_from(full), (batch,))


def restriction_problem(full: nn.Module, source: str) -> str | None:
    """Why `full` cannot be restricted to fewer elements (MACE's own element copy fails for
    it, e.g. residual interactions with L > 0 in mace 0.3.16), or None when it can."""
    try:
        gather_map(full, [int(z) for z in full.atomic_numbers[:2]])
    except (RuntimeError, ValueError, IndexError) as err:
        return (f"model.restrict_elements is not supported for model.source {source!r} "
                f"({type(err).__name__}: {str(err).splitlines()[0][:120]}); set it false")
    return None
