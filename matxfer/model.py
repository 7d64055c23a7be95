"""A foundation backbone (pretrained or its random twin) + pooled MLP head: PropertyModel."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from matxfer.backbones.mace import compile_ready
from matxfer.backbones.registry import block_index, family_of_net, load_backbone, weights_file
from matxfer.config import ModelConfig
from matxfer.errors import UserError
from matxfer.graphs import GraphSpec

__all__ = ["PropertyModel", "TargetScaler", "block_index", "block_names", "build_model",
           "graph_spec", "load_backbone", "pool", "weights_file"]


def graph_spec(backbone: nn.Module) -> GraphSpec:
    """How the input graphs of a backbone are built and cached."""
    return family_of_net(backbone).graph_spec(backbone)


def block_names(backbone: nn.Module) -> list[str]:
    """The backbone's blocks bottom to top: 'embedding', then 'interaction_<i>' per layer
    (the one definition used by freezing, LR decay, drift and the MI layers)."""
    return family_of_net(backbone).block_names(backbone)


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


_PHYSICS_KEYS = {"phys_mean": "mean", "phys_std": "std", "calib_w": "w", "calib_b": "b",
                 "calib_floor": "floor", "target_log": "log", "target_mean": "t_mean",
                 "target_std": "t_std"}


def _physics_buffers(n: int) -> list[tuple[str, tuple]]:
    """(name, shape) of the physics buffers for n descriptors."""
    return [(name, (n,) if name in ("phys_mean", "phys_std", "calib_w") else ())
            for name in _PHYSICS_KEYS]


class PropertyModel(nn.Module):
    """Backbone (matxfer.backbones) -> per-layer invariant node features -> pooled -> MLP
    head -> [B]."""

    def __init__(self, backbone: nn.Module, pooling: str = "mean",
                 head_hidden: list[int] | None = None, physics: str = "off",
                 n_physics: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.fast_path = None  # RestrictedBackbone / CueqBackbone: same weights, other compute
        self.family = family_of_net(backbone)
        width = sum(self.family.layer_widths(backbone)) * (2 if pooling == "mean+max" else 1)
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
        matxfer.backbones.mace_elements). Batches holding other elements take the full path."""
        from matxfer.backbones.mace import mace_features
        from matxfer.backbones.mace_elements import RestrictedBackbone

        self._needs_mace("model.restrict_elements")
        self._set_fast_path(RestrictedBackbone(self.backbone, elements, mace_features))

    def use_cueq_kernels(self) -> None:
        """Compute the backbone with cuequivariance kernels (same weights and results; see
        matxfer.backbones.mace_cueq)."""
        from matxfer.backbones.mace import mace_features
        from matxfer.backbones.mace_cueq import CueqBackbone

        self._needs_mace("model.kernels 'cueq'")
        self._set_fast_path(CueqBackbone(self.backbone, mace_features))

    def _needs_mace(self, option: str) -> None:
        if self.family.name != "mace":
            raise UserError(f"{option} is not supported by the {self.family.name} backbone")

    def _set_fast_path(self, path) -> None:
        path.apply_(lambda t: t.to(next(self.backbone.parameters()).device))
        self.fast_path = path

    def _apply(self, fn, recurse=True):  # .to()/.double() move the fast path along
        super()._apply(fn, recurse)
        if getattr(self, "fast_path", None) is not None:
            self.fast_path.apply_(fn)
        return self

    def layer_features(self, batch: dict) -> list[torch.Tensor]:
        """Invariant node features after each message-passing layer: list of [n_atoms, d_l]."""
        path = getattr(self, "fast_path", None)
        if path is not None and path.covers(batch["node_attrs"]):
            return path.layer_features(self.backbone, batch)
        return self.family.layer_features(self.backbone, batch)

    def embedding_features(self, batch: dict) -> torch.Tensor:
        """Invariant node features of the element embedding [n_atoms, d_0]."""
        return self.family.embedding_features(self.backbone, batch)

    def block_names(self) -> list[str]:
        return self.family.block_names(self.backbone)

    def graph_spec(self) -> GraphSpec:
        """How this model's input graphs are built and cached (its backbone's)."""
        return self.family.graph_spec(self.backbone)

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


def build_model(cfg: ModelConfig, for_compile: bool = False) -> PropertyModel:
    """The PropertyModel of a config; `for_compile`: a backbone torch.compile can trace."""
    dtype = getattr(torch, cfg.dtype)
    backbone = load_backbone(cfg.source, cfg.init, cfg.init_seed, dtype)
    if for_compile:
        backbone = compile_ready(backbone)
    return model_on(backbone, cfg)


def model_on(backbone: nn.Module, cfg: ModelConfig) -> PropertyModel:
    """The PropertyModel of `backbone` with the head (seeded by cfg.init_seed) build_model
    gives it."""
    physics = cfg.physics
    with torch.random.fork_rng():
        torch.manual_seed(cfg.init_seed)
        model = PropertyModel(backbone, cfg.pooling, cfg.head_hidden,
                              physics.mode if physics else "off",
                              len(physics.descriptors) if physics else 0)
    if cfg.kernels == "cueq":
        model.use_cueq_kernels()
    return model


def trial_model(cfg: ModelConfig, for_compile: bool = False) -> PropertyModel:
    """build_model for one trial of a process that runs many (Tune reuses trial processes):
    the process builds each config once, and every later call gets that module back with its
    built weights, buffers and trainable flags restored, gradients cleared, in train mode.
    Only one trial uses it at a time; the previous trial's module is not kept by anyone."""
    model, state, trainable = _trial_template(cfg.model_dump_json(), for_compile)
    model.load_state_dict(state)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable[name])
        p.grad = None
    return model.train()


@functools.lru_cache(maxsize=1)
def _trial_template(cfg_json: str, for_compile: bool) -> tuple[PropertyModel, dict, dict]:
    model = build_model(ModelConfig.model_validate_json(cfg_json), for_compile)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, state, {n: p.requires_grad for n, p in model.named_parameters()}
