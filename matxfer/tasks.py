"""Task specs: the Matbench v0.1 structure tasks (names, targets, units, kinds and sizes, a
registry of values config validation checks names against); a user dataset's spec comes from
its config (config.DataConfig.spec)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from matxfer.errors import UserError

N_MATBENCH_FOLDS = 5


@dataclass(frozen=True)
class TaskSpec:
    """One property task: a Matbench task or a user's dataset (`custom`, size unknown: 0).
    `log_target`: default log transform for positive targets."""

    name: str
    target: str
    unit: str
    kind: Literal["regression", "classification"]
    size: int
    log_target: bool = False
    custom: bool = False

    @property
    def metric(self) -> str:
        return "mae" if self.kind == "regression" else "rocauc"


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("matbench_jdft2d", "exfoliation_en", "meV/atom", "regression", 636, True),
        TaskSpec("matbench_phonons", "last phdos peak", "cm^-1", "regression", 1265, True),
        TaskSpec("matbench_dielectric", "n", "unitless", "regression", 4764, True),
        TaskSpec("matbench_log_gvrh", "log10(G_VRH)", "log10(GPa)", "regression", 10987),
        TaskSpec("matbench_log_kvrh", "log10(K_VRH)", "log10(GPa)", "regression", 10987),
        TaskSpec("matbench_perovskites", "e_form", "eV/unit cell", "regression", 18928),
        TaskSpec("matbench_mp_gap", "gap pbe", "eV", "regression", 106113),
        TaskSpec("matbench_mp_is_metal", "is_metal", "boolean", "classification", 106113),
        TaskSpec("matbench_mp_e_form", "e_form", "eV/atom", "regression", 132752),
    ]
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[name]
