"""cuequivariance kernels as a compute path: same weights, same results, NVIDIA's kernels.

MACE converts an e3nn model into one built on cuequivariance (`mace.cli.convert_e3nn_cueq`):
the same architecture with fused tensor-product kernels, whose weights are the e3nn ones
reshaped, except the symmetric contractions, which are concatenated and projected onto
cuequivariance's basis. Here that converted model (the twin) is only a compute path, as in
matxfer.backbones.mace_elements: at every forward its weights are computed from the e3nn backbone's
parameters by that same linear map, so the e3nn weights stay the only parameters (optimizer,
L2-SP anchor, checkpoints, drift) and gradients flow back to them.

Needs the optional extra `pip install 'matxfer[cueq]'` (cuequivariance-torch; on CUDA also
cuequivariance-ops-torch-cu12 for the fast kernels; without them it runs its torch fallback).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from matxfer.backbones.mace_elements import _Features
from matxfer.backbones.quiet_mace import import_mace
from matxfer.errors import UserError

_SYMMETRIC = re.compile(r"^products\.(\d+)\.symmetric_contractions\.weight$")


def cueq_available() -> bool:
    """Whether cuequivariance-torch can be imported."""
    try:
        import cuequivariance  # noqa: F401
        import cuequivariance_torch  # noqa: F401
    except ImportError:
        return False
    return True


def _cueq_twin(full: nn.Module) -> nn.Module:
    """MACE's cuequivariance conversion of `full` (same dtype, on the CPU)."""
    import contextlib
    import io

    import_mace()
    from mace.cli.convert_e3nn_cueq import run

    previous = torch.get_default_dtype()  # run() sets the default dtype to the model's
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return run(full, device="cpu", return_model=True)
    finally:
        torch.set_default_dtype(previous)


def _contraction_maps(full: nn.Module) -> dict[int, tuple[list[str], torch.Tensor | None]]:
    """Per product block: the e3nn weight names concatenated (along axis 1) into the twin's
    symmetric-contraction weight, and the projection [a, b] applied after (None: none)."""
    import cuequivariance as cue
    import_mace()
    from e3nn import o3
    from mace.cli.convert_e3nn_cueq import get_kmax_pairs
    from mace.tools.cg import O3_e3nn
    from mace.tools.cg_cueq_tools import symmetric_contraction_proj
    from mace.tools.scripts_utils import extract_config_mace_model

    cfg = extract_config_mace_model(full)
    correlation, reduced = cfg["correlation"], cfg.get("use_reduced_cg", True)
    pairs = get_kmax_pairs(len(cfg["hidden_irreps"].slices()) - 1, correlation,
                           cfg["num_interactions"], cfg.get("keep_last_layer_irreps", False))
    params, maps = dict(full.named_parameters()), {}
    suffixes = ["_max"] + [f".{i}" for i in range(correlation - 1)]
    for i, kmax in pairs:
        prefix = f"products.{i}.symmetric_contractions.contractions"
        names = [f"{prefix}.{k}.weights{j}" for k in range(kmax + 1) for j in suffixes]
        names = [n for n in names if n in params]  # unreduced CG drops zeroed weights
        proj = None
        if reduced:
            sc = full.products[i].symmetric_contractions
            _, p = symmetric_contraction_proj(
                cue.Irreps(O3_e3nn, str(o3.Irreps(r.ir for r in sc.irreps_in))),
                cue.Irreps(O3_e3nn, str(o3.Irreps(r.ir for r in sc.irreps_out))),
                list(range(1, correlation + 1)))
            proj = torch.tensor(p, dtype=params[names[0]].dtype)
        maps[i] = (names, proj)
    return maps


class CueqBackbone:
    """The cuequivariance compute path of an e3nn backbone; like RestrictedBackbone not an
    nn.Module, so the twin's parameters never reach optimizers, state dicts or DDP."""

    def __init__(self, full: nn.Module, features: Callable) -> None:
        """features(backbone, batch) -> per-layer node features (backbones.mace's)."""
        if not cueq_available():
            raise UserError("model.kernels 'cueq' needs cuequivariance-torch; install it with "
                            "pip install 'matxfer[cueq]' or use kernels 'e3nn'")
        twin = _cueq_twin(full)
        for p in twin.parameters():
            p.requires_grad_(False)
        self.contractions = _contraction_maps(full)
        self.shapes = {n: p.shape for n, p in twin.named_parameters()}
        self.module = _Features(twin, features)
        self._check(full, twin)

    def _check(self, full: nn.Module, twin: nn.Module) -> None:
        """The map must reproduce MACE's own conversion exactly (guards MACE changes)."""
        with torch.no_grad():
            mapped = self.parameters_from(full)
        for name, value in twin.named_parameters():
            if not torch.allclose(mapped["twin." + name], value, rtol=1e-6, atol=1e-7):
                raise ValueError(f"cuequivariance parameter {name} is not the mapped e3nn one")

    def apply_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a tensor conversion (nn.Module._apply's fn: device/dtype) to every tensor."""
        self.module._apply(fn)
        self.contractions = {i: (names, None if proj is None else fn(proj))
                             for i, (names, proj) in self.contractions.items()}

    def covers(self, node_attrs: torch.Tensor) -> bool:
        """Every batch runs on this path."""
        return True

    def parameters_from(self, full: nn.Module) -> dict[str, torch.Tensor]:
        """The twin's parameters computed (differentiably) from the e3nn backbone's."""
        params = dict(full.named_parameters())
        out = {}
        for name, shape in self.shapes.items():
            match = _SYMMETRIC.match(name)
            if match is None:
                out["twin." + name] = params[name].reshape(shape)
                continue
            names, proj = self.contractions[int(match.group(1))]
            weight = torch.cat([params[n] for n in names], dim=1)  # [elements, a, channels]
            if proj is not None:
                weight = torch.einsum("zau,ab->zbu", weight, proj.to(weight.dtype))
            out["twin." + name] = weight
        return out

    def layer_features(self, full: nn.Module, batch: dict) -> list[torch.Tensor]:
        """The e3nn backbone's features for a batch, computed with cuequivariance kernels."""
        from torch.func import functional_call

        return functional_call(self.module, self.parameters_from(full), (batch,))
