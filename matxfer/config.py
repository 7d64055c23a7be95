"""Typed run configuration: one pydantic model validates YAML files and CLI overrides alike.

Every error surfaces at load time as a :class:`UserError` naming the field and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Pooling = Literal["mean", "sum", "max", "mean+max"]
Init = Literal["pretrained", "random"]
TargetTransform = Literal["auto", "none", "log"]


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, exit code 2."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    task: str = "matbench_jdft2d"
    fold: int = Field(0, ge=0, le=4, description="official Matbench fold, 0-4")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="validation share of train fold")
    val_seed: int = 0
    max_structures: int | None = Field(None, ge=1, description="deterministic subset, smoke runs")
    data_dir: str | None = Field(None, description="folder with <task>.json.gz; default: auto")
    cache_dir: str | None = Field(None, description="graph cache folder; default: auto")

    @model_validator(mode="after")
    def _known_task(self) -> DataConfig:
        from matxfer.data import TASKS

        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; allowed: {', '.join(TASKS)}")
        if self.data_dir and not Path(self.data_dir, f"{self.task}.json.gz").is_file():
            raise ValueError(f"data_dir {self.data_dir!r} holds no {self.task}.json.gz")
        return self


class ModelConfig(_Strict):
    source: str = Field("small", description="'small' (MACE-MP-0 small) or a MACE model file")
    init: Init = "pretrained"
    pooling: Pooling = "mean"
    head_hidden: list[int] = Field(default_factory=lambda: [256, 128])
    dtype: Literal["float32", "float64"] = "float32"
    target_transform: TargetTransform = "auto"
    init_seed: int = 0


class RegularizerConfig(_Strict):
    l2sp: float = Field(0.0, ge=0.0, description="L2-SP strength lambda")
    bss: float = Field(0.0, ge=0.0, description="BSS strength eta")
    bss_k: int = Field(1, ge=1, description="number of smallest singular values shrunk")


class TrainConfig(_Strict):
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(16, ge=2, description="structures per step (>= 2 for BSS)")
    lr: float = Field(1e-3, gt=0.0, description="head learning rate")
    backbone_lr: float | None = Field(3e-4, gt=0.0, description="default: lr")
    head_weight_decay: float = Field(1e-2, ge=0.0)
    backbone_weight_decay: float = Field(0.0, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0)
    grad_clip: float | None = Field(10.0, gt=0.0)
    patience: int | None = Field(None, ge=1, description="early-stopping patience in epochs")
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch intra-op threads")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class RunConfig(_Strict):
    """Everything that defines one fine-tune of one task and fold."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    regularizers: RegularizerConfig = Field(default_factory=RegularizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _no_decay_toward_zero_under_l2sp(self) -> RunConfig:
        if self.regularizers.l2sp > 0 and self.train.backbone_weight_decay > 0:
            raise ValueError(
                "train.backbone_weight_decay must be 0 while regularizers.l2sp > 0 "
                "(decay toward zero moves the L2-SP pull point away from the pretrained weights)"
            )
        return self


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"config key {key!r} is not a section")
    node[leaf] = value


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: 'field.path: message (got value)'."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown config key"
        got = "" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"
        if isinstance(e.get("input"), dict):
            got = ""
        parts.append(f"{loc}: {msg}{got}")
    return "; ".join(parts)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; malformed files raise UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {str(path)!r} is not valid YAML{where}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping, got {type(tree).__name__}")
    return tree


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Build a RunConfig from an optional YAML file plus dotted overrides ('train.epochs': 2)."""
    tree = read_yaml(path) if path else {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise UserError(f"invalid config: {format_validation_error(err)}") from None
