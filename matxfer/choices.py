"""The names a config may choose from, shared by the run config, the physics section and the
search space (imports nothing from matxfer)."""

from __future__ import annotations

from typing import Literal

Pooling = Literal["mean", "sum", "max", "mean+max"]
PhysicsMode = Literal["off", "zero-shot", "features", "residual"]
