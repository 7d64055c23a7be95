"""The MACE family: MACE-MP-0 and every MACE model file, any max_L, correlation and depth.

Sources: 'small' (found offline: MATXFER_MODEL, ../shared/models, else mace's own cache and
download), any other name mace's `mace_mp` knows (downloaded and cached by mace), or a path to
a MACE model file. Layer features come from MACE's own forward (`node_feats`, the per-
interaction product outputs it concatenates), restricted to their invariant (0e) channels.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import os
import re
from pathlib import Path

import torch
from torch import nn

from matxfer.backbones.base import Family
from matxfer.backbones.quiet_mace import import_mace
from matxfer.errors import UserError
from matxfer.graphs import GraphSpec

SMALL_FILE = "2023-12-10-mace-128-L0_energy_epoch-249.model"
SHARED_MODELS = Path("shared") / "models"


def mace_names() -> list[str]:
    """The foundation-model names mace's own `mace_mp` downloads."""
    import_mace()
    from mace.calculators.foundations_models import mace_mp_names

    return [n for n in mace_mp_names if n]


def _offline_small() -> Path | None:
    """MACE-MP-0 small beside the checkout (../shared/models), if present."""
    repo_root = Path(__file__).resolve().parents[2]
    for base in (Path.cwd(), repo_root):
        for folder in (base.parent / SHARED_MODELS, base / SHARED_MODELS):
            if (folder / SMALL_FILE).is_file():
                return folder / SMALL_FILE
    return None


def resolve_model_path(source: str) -> Path:
    """'small' -> MATXFER_MODEL, ../shared/models/<file>, or mace's cache/download; another
    mace name -> mace's cache/download; else the path of a MACE model file."""
    if source == "small" and os.environ.get("MATXFER_MODEL"):
        return resolve_model_path(os.environ["MATXFER_MODEL"])
    if source == "small" and _offline_small() is not None:
        return _offline_small()
    names = mace_names()
    if source not in names:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"model.source {source!r} is neither a model file nor a known "
                            f"name; allowed names: {', '.join(names)}, chgnet, chgnet-0.3.0, "
                            "chgnet-0.2.0")
        return path
    import_mace()
    from mace.calculators.foundations_models import download_mace_mp_checkpoint

    try:  # users outside this machine: mace's own cache, downloaded once
        with contextlib.redirect_stdout(io.StringIO()):
            return Path(download_mace_mp_checkpoint(source))
    except Exception as err:
        what = "MACE-MP-0" if source == "small" else "MACE model"
        raise UserError(f"cannot find or download {what} {source!r}: {err}") from None


def scalar_slices(net: nn.Module) -> list[tuple[slice, list[int]]]:
    """Per interaction layer: its span in MACE's concatenated `node_feats`, and the
    invariant (0e) columns within it."""
    import_mace()
    from e3nn import o3

    out, start = [], 0
    for product in net.products:
        irreps = o3.Irreps(str(product.linear.irreps_out))
        cols = [c for s, (_, ir) in zip(irreps.slices(), irreps) if ir.l == 0 and ir.p == 1
                for c in range(s.start, s.stop)]
        out.append((slice(start, start + irreps.dim), cols))
        start += irreps.dim
    return out


def mace_features(net: nn.Module, batch: dict) -> list[torch.Tensor]:
    """MACE's own forward (no forces) -> per interaction layer the invariant node features
    [n_atoms, d_l]."""
    n_graphs = batch["ptr"].numel() - 1
    data = {k: batch[k] for k in ("node_attrs", "positions", "edge_index", "shifts", "batch",
                                  "ptr")}
    data["positions"] = data["positions"].detach().clone()  # MACE marks it requires_grad
    data["cell"] = data["positions"].new_zeros(n_graphs, 3, 3)
    node_feats = net(data, training=True, compute_force=False)["node_feats"]
    feats = []
    for span, cols in scalar_slices(net):
        layer = node_feats[:, span]
        contiguous = cols == list(range(cols[0], cols[-1] + 1))
        feats.append(layer[:, cols[0]:cols[-1] + 1] if contiguous else layer[:, cols])
    return feats


def load_mace_file(path: Path) -> nn.Module:
    """The MACE model pickled in `path` (UserError, one line, when it is not one)."""
    import_mace()
    try:
        net = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(f"cannot load MACE model {str(path)!r}: {err}") from None
    if not isinstance(net, nn.Module) or not hasattr(net, "interactions"):
        raise UserError(f"{str(path)!r} does not hold a MACE model")
    return net


def random_twin(path: Path, seed: int) -> nn.Module:
    """MACE's constructor on the config of the model in `path`, seeded: the same
    architecture, randomly initialised. Constructing takes seconds (e3nn's code generation),
    so a process builds each (file, seed) once and copies it: a random-init study's trials
    reuse their process."""
    stat = path.stat()
    return copy.deepcopy(_built_twin(str(path), (stat.st_size, stat.st_mtime_ns), seed,
                                     torch.get_default_dtype()))


@functools.lru_cache(maxsize=2)
def _built_twin(path: str, stamp: tuple[int, int], seed: int,
                default_dtype: torch.dtype) -> nn.Module:  # built under that default dtype
    from mace.tools.scripts_utils import extract_config_mace_model

    net = load_mace_file(Path(path))
    cfg = extract_config_mace_model(net)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return type(net)(**cfg)


class MaceFamily(Family):
    """Block 0 embeds elements and distances; block i + 1 is interaction i with its product."""

    name = "mace"
    embedding_params = re.compile(r"^(?:node_embedding|radial_embedding)\.")
    layer_params = re.compile(r"^(?:interactions|products)\.(\d+)\.")
    unused_params = re.compile(r"^(?:readouts|scale_shift|atomic_energies_fn|pair_repulsion_fn)\.")

    def weights_file(self, source: str) -> Path:
        return resolve_model_path(source)

    def load(self, source: str, init: str = "pretrained", seed: int = 0,
             dtype: torch.dtype = torch.float32) -> nn.Module:
        path = resolve_model_path(source)
        net = random_twin(path, seed) if init == "random" else load_mace_file(path)
        return self.freeze_unused(net).to(dtype)

    def graph_spec(self, net: nn.Module) -> GraphSpec:
        return GraphSpec(tuple(int(z) for z in net.atomic_numbers), float(net.r_max),
                         next(net.parameters()).dtype)

    def n_layers(self, net: nn.Module) -> int:
        return len(net.interactions)

    def layer_widths(self, net: nn.Module) -> list[int]:
        return [len(cols) for _, cols in scalar_slices(net)]

    def layer_features(self, net: nn.Module, batch: dict) -> list[torch.Tensor]:
        return mace_features(net, batch)

    def embedding_features(self, net: nn.Module, batch: dict) -> torch.Tensor:
        dtype = next(net.parameters()).dtype
        return net.node_embedding(batch["node_attrs"].to(dtype))


def compile_ready(net: nn.Module) -> nn.Module:
    """The same MACE rebuilt without e3nn's TorchScript code generation and fx-simplified
    (mace.tools.compile.prepare), so torch.compile can trace it; identical state dict."""
    import_mace()
    from mace.tools.compile import prepare
    from mace.tools.scripts_utils import extract_config_mace_model

    dtype = next(net.parameters()).dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        twin = prepare(type(net))(**extract_config_mace_model(net))
    finally:
        torch.set_default_dtype(previous)
    missing, unexpected = twin.load_state_dict(net.state_dict(), strict=False)
    # newer mace marks zeroed symmetric-contraction weights with buffers the traceable build
    # does not register; its forward does not read them
    odd = [k for k in missing + unexpected if not k.endswith("_zeroed")]
    if odd:
        raise ValueError(f"the compile-ready MACE does not fit the model's weights: {odd[:3]}")
    for mine, theirs in zip(twin.parameters(), net.parameters()):
        mine.requires_grad_(theirs.requires_grad)
    return twin.to(dtype)
