"""What a study searches: the ranges and choices Optuna (or a grid) proposes per trial, and
the run-config changes one proposal makes (`trial_updates`, applied by validation in
`StudyConfig.trial_config`). Kept free of Ray and torch so the typed config can import it."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from matxfer.choices import PhysicsMode, Pooling


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SearchRange(_Frozen):
    """A log-uniform range; with `allow_off`, 'off' (exactly 0) is a choice too."""

    low: float = Field(gt=0.0)
    high: float = Field(gt=0.0)
    allow_off: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> SearchRange:
        if self.high <= self.low:
            raise ValueError(f"high ({self.high}) must exceed low ({self.low})")
        return self


_SEARCH_SETTINGS = ("first_trial_off", "backbone_lr_ratio")  # how to search, not what


class SearchSpace(_Frozen):
    """What Optuna proposes per trial; a null entry keeps the run template's value."""

    l2sp: SearchRange | None = Field(default_factory=lambda: SearchRange(low=1e-6, high=1e-1))
    bss: SearchRange | None = Field(default_factory=lambda: SearchRange(low=1e-5, high=1e-1))
    lr: SearchRange | None = Field(None, description="the head's learning rate, log-uniform")
    backbone_lr_ratio: float = Field(
        0.3, gt=0.0, description="with lr searched, each trial's backbone_lr = ratio x lr "
        "(0.3: the defaults' 3e-4 / 1e-3); unused when lr is not searched")
    lr_decay: SearchRange | None = Field(None, description="log-uniform in (0, 1]; off = 1")
    freeze_blocks: list[int] | None = Field(None, description="choices of k")
    lp_epochs: list[int] | None = Field(None, description="choices of LP epochs")
    pooling: list[Pooling] | None = Field(None, description="choices of readout pooling, "
                                          "picked per fold by validation")
    physics: list[PhysicsMode] | None = Field(
        None, description="choices of run.model.physics.mode (off, zero-shot, features, "
        "residual), picked per fold by validation; needs run.model.physics.descriptors")
    descriptors: list[list[str]] | None = Field(
        None, description="choices of run.model.physics.descriptors (each a list of names), "
        "picked per fold by validation; the descriptors of every choice are computed once")
    calibration: list[Literal["linear", "huber"]] | None = Field(
        None, description="choices of run.model.physics.calibration (linear, huber), picked "
        "per fold by validation")
    first_trial_off: bool = Field(
        False, description="the first trial runs with every allow_off range off (plain "
        "fine-tuning for l2sp/bss), so each search scores the no-reg baseline too; it does "
        "not apply (no trial is enqueued) when no searched range can be off, e.g. under the "
        "no-reg, random-init, lp-ft, llrd, freeze and pooling variants")

    @model_validator(mode="after")
    def _valid_strategy_space(self) -> SearchSpace:
        if self.lr_decay is not None and self.lr_decay.high > 1.0:
            raise ValueError(f"lr_decay.high ({self.lr_decay.high}) must be at most 1")
        for name in ("freeze_blocks", "lp_epochs"):
            choices = getattr(self, name)
            if choices is not None and (not choices or min(choices) < 0):
                raise ValueError(f"{name} must list one or more counts >= 0 (got {choices})")
        if self.pooling is not None and not self.pooling:
            raise ValueError("pooling must list one or more of mean, sum, max, mean+max")
        if self.descriptors is not None and (not self.descriptors
                                             or not all(self.descriptors)):
            raise ValueError(f"descriptors must list one or more non-empty lists of names "
                             f"(got {self.descriptors})")
        if self.calibration is not None and not self.calibration:
            raise ValueError("calibration must list one or more of linear, huber")
        return self

    def choices(self, name: str) -> list[Any]:
        """The distinct choices of a searched list as Optuna / Tune values (plain scalars: a
        descriptor set is one string, its names joined by '+')."""
        values = getattr(self, name)
        if name == "descriptors":
            values = ["+".join(v) for v in values]
        return list(dict.fromkeys(values))

    def all_descriptors(self) -> list[str]:
        """Every descriptor some choice of `descriptors` names, in first-seen order."""
        return list(dict.fromkeys(d for choice in self.descriptors or [] for d in choice))

    def first_point(self) -> dict[str, bool] | None:
        """The Optuna parameters of the enqueued first trial, or None when first_trial_off is
        off or does not apply (no searched range has an 'off' choice)."""
        point = self.off_point()
        return point if self.first_trial_off and point else None

    def searched(self) -> list[str]:
        """Names of the searched hyperparameters."""
        return [n for n in type(self).model_fields
                if n not in _SEARCH_SETTINGS and getattr(self, n) is not None]

    def off_point(self) -> dict[str, bool]:
        """Optuna parameters of the all-off trial: every allow_off range switched off (the
        learning rate is never off). Its keys are the on/off switches of the space."""
        return {f"{n}_on": False for n in self.searched() if n != "lr"
                and isinstance(getattr(self, n), SearchRange) and getattr(self, n).allow_off}

    def grid_size(self) -> int | None:
        """Number of combinations when every searched entry is a list of choices (the space
        is then enumerated, not sampled); None when a range is searched."""
        entries = [getattr(self, n) for n in self.searched()]
        if not entries or not all(isinstance(e, list) for e in entries):
            return None
        return math.prod(len(self.choices(n)) for n in self.searched())

    def trial_cap(self) -> int | None:
        """The most distinct trials the space holds: 1 when nothing is searched, the grid's
        size for choices only, None (no cap) when a range is sampled."""
        return 1 if not self.searched() else self.grid_size()

    def corners(self) -> Iterator[dict[str, Any]]:
        """Optuna-style parameters at every corner of the space (each range at its ends, each
        choice), so validation can prove every trial it may propose is a valid run."""
        axes = []
        for name in self.searched():
            space = getattr(self, name)
            if isinstance(space, list):
                axes.append([{name: v} for v in self.choices(name)])
            else:
                axes.append([{name: v, f"{name}_on": True} for v in (space.low, space.high)])
        for combo in itertools.product(*axes):
            yield {k: v for part in combo for k, v in part.items()}


def trial_updates(search: SearchSpace, params: dict[str, Any]) -> dict[str, Any]:
    """Dotted run-config keys -> values that one proposal (Optuna's `params`) sets."""
    updates: dict[str, Any] = {}
    for name in ("l2sp", "bss"):
        if getattr(search, name) is not None:
            on = params.get(f"{name}_on", True)
            updates[f"regularizers.{name}"] = float(params[name]) if on else 0.0
    if search.lr is not None:
        updates["train.lr"] = float(params["lr"])
        updates["train.backbone_lr"] = float(params["lr"]) * search.backbone_lr_ratio
    if search.lr_decay is not None and params.get("lr_decay_on", True):
        updates["strategy.lr_decay"] = float(params["lr_decay"])
    for name in ("freeze_blocks", "lp_epochs"):
        if getattr(search, name) is not None:
            updates[f"strategy.{name}"] = int(params[name])
    if search.pooling is not None:
        updates["model.pooling"] = params["pooling"]
    if search.physics is not None:
        updates["model.physics.mode"] = params["physics"]
    if search.descriptors is not None:
        updates["model.physics.descriptors"] = params["descriptors"].split("+")
    if search.calibration is not None:
        updates["model.physics.calibration"] = params["calibration"]
    return updates
