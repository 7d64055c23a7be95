"""MACE-MP-0 backbone (pretrained or its random twin) + pooled MLP head: PropertyModel."""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _import_mace_quietly() -> None:
    """Import mace before e3nn (it sets up torch>=2.6 unpickling of MACE models), without the
    banner it prints when the optional cuequivariance kernels are absent."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mace.modules  # noqa: F401
        import mace.tools.scripts_utils  # noqa: F401


_import_mace_quietly()

from matxfer.config import ModelConfig  # noqa: E402
from matxfer.errors import UserError  # noqa: E402

SMALL_FILE = "2023-12-10-mace-128-L0_energy_epoch-249.model"
SHARED_MODELS = Path("shared") / "models"


def resolve_model_path(source: str) -> Path:
    """'small' -> MATXFER_MODEL, ../shared/models/<file>, or mace's cache/download; else a path."""
    if source != "small":
        path = Path(source)
        if not path.is_file():
            raise UserError(
                f"model file {source!r} does not exist; use 'small' or a MACE model file")
        return path
    if os.environ.get("MATXFER_MODEL"):
        return resolve_model_path(os.environ["MATXFER_MODEL"])
    repo_root = Path(__file__).resolve().parents[1]
    for base in (Path.cwd(), repo_root):
        for folder in (base.parent / SHARED_MODELS, base / SHARED_MODELS):
            candidate = folder / SMALL_FILE
            if candidate.is_file():
                return candidate
    from mace.calculators.foundations_models import download_mace_mp_checkpoint

    try:  # users outside this machine: mace's own cache, downloaded once
        return Path(download_mace_mp_checkpoint("small"))
    except Exception as err:
        raise UserError(f"cannot find or download MACE-MP-0 'small': {err}") from None


def load_backbone(source: str, init: str = "pretrained", seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    """The MACE model; `init='random'` gives the identical architecture, freshly initialised."""
    path = resolve_model_path(source)
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(f"cannot load MACE model {str(path)!r}: {err}") from None
    if not isinstance(model, nn.Module) or not hasattr(model, "interactions"):
        raise UserError(f"{str(path)!r} does not hold a MACE model")
    if init == "random":
        from mace.tools.scripts_utils import extract_config_mace_model

        cfg = extract_config_mace_model(model)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = type(model)(**cfg)
    for p in model.readouts.parameters():  # energy readouts get no gradient from our head
        p.requires_grad_(False)
    return model.to(dtype)


# The backbone's blocks, bottom to top: the one definition used by freezing, layer-wise LR
# decay, weight drift and the per-layer features. Block 0 embeds elements and distances;
# block i + 1 is interaction i with its product (the features after it are layer i + 1).
_BLOCK_OF = ((re.compile(r"^(?:node_embedding|radial_embedding)\."), None),
             (re.compile(r"^(?:interactions|products)\.(\d+)\."), 1))
_UNUSED = re.compile(r"^(?:readouts|scale_shift|atomic_energies_fn)\.")  # energy head: frozen


def block_names(backbone: nn.Module) -> list[str]:
    """'embedding', then 'interaction_<i>' per interaction (+ product) block."""
    return ["embedding"] + [f"interaction_{i}" for i in range(len(backbone.interactions))]


def block_index(name: str) -> int | None:
    """Block (index into block_names) of a backbone parameter name such as
    'interactions.0.linear.weight'; None for the energy readouts, which the property model
    does not use. A name in neither raises: an unknown architecture's weights must not be
    filed under some block silently."""
    for pattern, offset in _BLOCK_OF:
        match = pattern.match(name)
        if match:
            return 0 if offset is None else int(match.group(1)) + offset
    if _UNUSED.match(name):
        return None
    raise ValueError(f"backbone parameter {name!r} belongs to no block of the backbone")


def scalar_columns(backbone: nn.Module) -> list[torch.Tensor]:
    """Per interaction layer, the column indices of the invariant (0e) node features."""
    from e3nn import o3

    columns = []
    for product in backbone.products:
        irreps = o3.Irreps(str(product.linear.irreps_out))
        idx = [torch.arange(s.start, s.stop) for s, (_, ir) in zip(irreps.slices(), irreps)
               if ir.l == 0 and ir.p == 1]
        columns.append(torch.cat(idx))
    return columns


def pool(x: torch.Tensor, batch: torch.Tensor, n_graphs: int, how: str) -> torch.Tensor:
    """Pool node features x [n_atoms, d] per structure -> [n_graphs, d] ([.., 2d] for mean+max)."""
    index = batch.unsqueeze(-1).expand_as(x)
    total = x.new_zeros(n_graphs, x.shape[1]).scatter_add(0, index, x)
    if how == "sum":
        return total
    counts = torch.bincount(batch, minlength=n_graphs).clamp(min=1).unsqueeze(-1).to(x.dtype)
    mean = total / counts
    if how == "mean":
        return mean
    peak = x.new_full((n_graphs, x.shape[1]), float("-inf")).scatter_reduce(
        0, index, x, reduce="amax", include_self=True)
    return peak if how == "max" else torch.cat([mean, peak], dim=-1)


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def backbone_layer_features(bb: nn.Module, batch: dict,
                            columns: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per interaction+product block of MACE `bb`, node features [n_atoms, d_l] at `columns`."""
    from mace.modules.utils import get_edge_vectors_and_lengths

    node_attrs, edge_index = batch["node_attrs"], batch["edge_index"]
    vectors, lengths = get_edge_vectors_and_lengths(
        positions=batch["positions"], edge_index=edge_index, shifts=batch["shifts"])
    edge_attrs = bb.spherical_harmonics(vectors)
    edge_feats, cutoff = bb.radial_embedding(lengths, node_attrs, edge_index, bb.atomic_numbers)
    node_feats = bb.node_embedding(node_attrs)
    feats = []
    for i, (interaction, product) in enumerate(zip(bb.interactions, bb.products)):
        node_feats, sc = interaction(
            node_attrs=node_attrs, node_feats=node_feats, edge_attrs=edge_attrs,
            edge_feats=edge_feats, edge_index=edge_index, cutoff=cutoff, first_layer=(i == 0))
        node_feats = product(node_feats=node_feats, sc=sc, node_attrs=node_attrs)
        feats.append(node_feats[:, columns[i]])
    return feats


_PHYSICS_KEYS = {"phys_mean": "mean", "phys_std": "std", "calib_w": "w", "calib_b": "b",
                 "calib_floor": "floor", "target_log": "log", "target_mean": "t_mean",
                 "target_std": "t_std"}


def _physics_buffers(n: int) -> list[tuple[str, tuple]]:
    """(name, shape) of the physics buffers for n descriptors."""
    return [(name, (n,) if name in ("phys_mean", "phys_std", "calib_w") else ())
            for name in _PHYSICS_KEYS]


class PropertyModel(nn.Module):
    """MACE backbone -> per-layer invariant node features -> pooled -> MLP head -> [B]."""

    def __init__(self, backbone: nn.Module, pooling: str = "mean",
                 head_hidden: list[int] | None = None, physics: str = "off",
                 n_physics: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.fast_path = None  # RestrictedBackbone / CueqBackbone: same weights, other compute
        cols = scalar_columns(backbone)
        for i, c in enumerate(cols):
            self.register_buffer(f"scalar_cols_{i}", c, persistent=False)
        width = sum(len(c) for c in cols) * (2 if pooling == "mean+max" else 1)
        width += n_physics if physics == "features" else 0
        dtype = next(backbone.parameters()).dtype
        self.head = mlp([width, *(head_hidden or [256, 128]), 1]).to(dtype)
        self.physics = physics
        if physics != "off":  # set from the training fold (set_physics), saved with the weights
            for name, shape in _physics_buffers(n_physics):
                self.register_buffer(name, torch.zeros(shape, dtype=torch.float64))
        if physics == "residual":  # start from the calibrated descriptors exactly
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    def set_physics(self, calibration: dict[str, np.ndarray], scaler: TargetScaler) -> None:
        """Descriptor standardisation (mean, std [d]) and calibration (w [d], b [], floor [])
        from matxfer.physics.calibration.calibrate; the target scaler that maps the calibrated
        value (task units, or logits) into the model's output space."""
        values = {**calibration, "log": float(scaler.log), "t_mean": scaler.mean,
                  "t_std": scaler.std}
        for name, key in _PHYSICS_KEYS.items():
            getattr(self, name).copy_(torch.as_tensor(values[key], dtype=torch.float64))

    def _physics_z(self, batch: dict) -> torch.Tensor:
        """Standardised descriptors [B, d] (float64); a failed (NaN) descriptor is the training
        mean, 0."""
        z = (batch["phys"].double() - self.phys_mean.double()) / self.phys_std.double()
        return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)

    def calibrated(self, batch: dict) -> torch.Tensor:
        """The descriptors' linear calibration [B] in the model's output space: computed in
        task units (logits for classification), then log (clipped at the floor) when the
        target is, and standardised as the target scaler does."""
        c = self._physics_z(batch) @ self.calib_w.double() + self.calib_b.double()
        if self.target_log.item():
            c = torch.log(torch.clamp(c, min=float(self.calib_floor)))
        return (c - float(self.target_mean)) / float(self.target_std)

    def restrict_elements(self, elements: list[int]) -> None:
        """Run the backbone on these elements only (same results, less compute; see
        matxfer.elements). Batches holding other elements still take the full path."""
        from matxfer.elements import RestrictedBackbone

        self._set_fast_path(RestrictedBackbone(self.backbone, elements, backbone_layer_features))

    def use_cueq_kernels(self) -> None:
        """Compute the backbone with cuequivariance kernels (same weights and results; see
        matxfer.kernels)."""
        from matxfer.kernels import CueqBackbone

        self._set_fast_path(CueqBackbone(self.backbone, backbone_layer_features))

    def _set_fast_path(self, path) -> None:
        path.apply_(lambda t: t.to(next(self.backbone.parameters()).device))
        self.fast_path = path

    def _apply(self, fn, recurse=True):  # .to()/.double() move the fast path along
        super()._apply(fn, recurse)
        if getattr(self, "fast_path", None) is not None:
            self.fast_path.apply_(fn)
        return self

    def layer_features(self, batch: dict) -> list[torch.Tensor]:
        """Invariant node features after each interaction+product block: list of [n_atoms, d_l]."""
        cols = [getattr(self, f"scalar_cols_{i}") for i in range(len(self.backbone.products))]
        path = getattr(self, "fast_path", None)
        if path is not None and path.covers(batch["node_attrs"]):
            return path.layer_features(self.backbone, batch, cols)
        return backbone_layer_features(self.backbone, batch, cols)

    def pooled_layer_features(self, batch: dict) -> list[torch.Tensor]:
        """Per layer, pooled invariant features [B, d_l] (or [B, 2 d_l] for mean+max)."""
        n_graphs = batch["ptr"].numel() - 1
        return [pool(f, batch["batch"], n_graphs, self.pooling) for f in self.layer_features(batch)]

    def forward(self, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns (prediction [B] in standardised target space, pooled per-layer features).
        Physics: zero-shot is the calibration alone (no backbone pass, no features); features
        joins the standardised descriptors to the head's input; residual adds the
        calibration to the head's output."""
        if self.physics == "zero-shot":
            return self.calibrated(batch), []
        pooled = self.pooled_layer_features(batch)
        x = torch.cat(pooled, dim=-1)
        if self.physics == "features":
            x = torch.cat([x, self._physics_z(batch).to(x.dtype)], dim=-1)
        out = self.head(x).squeeze(-1)
        if self.physics == "residual":
            out = out + self.calibrated(batch).to(out.dtype)
        return out, pooled

    def backbone_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable backbone parameters (the ones L2-SP anchors)."""
        return [(n, p) for n, p in self.backbone.named_parameters() if p.requires_grad]


class TargetScaler:
    """Optional log, then standardise with training-split statistics. Classification: identity."""

    def __init__(self, y_train: np.ndarray, log: bool, classification: bool = False) -> None:
        self.log, self.classification = log, classification
        z = self._forward_transform(np.asarray(y_train, dtype=np.float64))
        self.mean = 0.0 if classification else float(z.mean())
        self.std = 1.0 if classification else float(z.std() or 1.0)

    def _forward_transform(self, y: np.ndarray) -> np.ndarray:
        return np.log(y) if self.log else y

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        z = torch.log(y) if self.log else y
        return (z - self.mean) / self.std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model output -> task units (probabilities for classification)."""
        if self.classification:
            return torch.sigmoid(z)
        y = z * self.std + self.mean
        return torch.exp(y) if self.log else y

    def state(self) -> dict:
        return {"log": self.log, "classification": self.classification,
                "mean": self.mean, "std": self.std}

    @classmethod
    def from_state(cls, state: dict) -> TargetScaler:
        obj = cls.__new__(cls)
        obj.__dict__.update(state)
        return obj


def compile_ready(backbone: nn.Module) -> nn.Module:
    """The same MACE rebuilt without e3nn's TorchScript code generation and fx-simplified
    (mace.tools.compile.prepare), so torch.compile can trace it; identical state dict."""
    from mace.tools.compile import prepare
    from mace.tools.scripts_utils import extract_config_mace_model

    dtype = next(backbone.parameters()).dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        twin = prepare(type(backbone))(**extract_config_mace_model(backbone))
    finally:
        torch.set_default_dtype(previous)
    twin.load_state_dict(backbone.state_dict())
    for mine, theirs in zip(twin.parameters(), backbone.parameters()):
        mine.requires_grad_(theirs.requires_grad)
    return twin.to(dtype)


def build_model(cfg: ModelConfig, for_compile: bool = False) -> PropertyModel:
    """The PropertyModel of a config; `for_compile`: a backbone torch.compile can trace."""
    dtype = getattr(torch, cfg.dtype)
    backbone = load_backbone(cfg.source, cfg.init, cfg.init_seed, dtype)
    if for_compile:
        backbone = compile_ready(backbone)
    physics = cfg.physics
    with torch.random.fork_rng():
        torch.manual_seed(cfg.init_seed)
        model = PropertyModel(backbone, cfg.pooling, cfg.head_hidden,
                              physics.mode if physics else "off",
                              len(physics.descriptors) if physics else 0)
    if cfg.kernels == "cueq":
        model.use_cueq_kernels()
    return model
