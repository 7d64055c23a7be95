"""Optional relaxation of atomic positions with the potential before descriptors (cell fixed).

ASE's FIRE drives it, one structure at a time (a relaxation is sequential by nature); each
force call goes through the same batched Potential as the descriptors.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from matxfer.physics.config import PhysicsConfig
from matxfer.physics.potential import Frame, Potential

FMAX = 0.02  # eV/Å: converged when every force component is below this
STEPS = 200


class _PotentialCalculator(Calculator):
    implemented_properties = ("energy", "forces")

    def __init__(self, potential: Potential) -> None:
        super().__init__()
        self.potential = potential

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        frame = Frame(atoms.numbers, atoms.positions, np.asarray(atoms.cell),
                      tuple(bool(p) for p in atoms.pbc))
        energies, forces, _ = self.potential.evaluate([(frame, self.potential.edges(frame, 0.0))])
        self.results = {"energy": float(energies[0]), "forces": forces[0]}


def relaxed(frame: Frame, potential: Potential, cfg: PhysicsConfig) -> Frame:
    """The frame after FIRE on atomic positions (at most STEPS steps, fmax FMAX eV/Å); the
    input frame when the relaxation fails."""
    from ase.optimize import FIRE

    if cfg.relax == "none":
        return frame
    atoms = Atoms(numbers=frame.numbers, positions=frame.positions,
                  cell=frame.cell, pbc=frame.pbc)
    atoms.calc = _PotentialCalculator(potential)
    try:
        FIRE(atoms, logfile=None).run(fmax=FMAX, steps=STEPS)
    except (ValueError, np.linalg.LinAlgError):
        return frame
    return Frame(frame.numbers, atoms.positions.copy(), frame.cell, frame.pbc)
