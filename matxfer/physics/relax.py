"""Optional relaxation with the potential before descriptors: positions, or positions and cell.

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
    implemented_properties = ("energy", "forces", "stress")

    def __init__(self, potential: Potential) -> None:
        super().__init__()
        self.potential = potential

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        frame = Frame(atoms.numbers, atoms.positions, np.asarray(atoms.cell),
                      tuple(bool(p) for p in atoms.pbc))
        stress = "stress" in properties
        energies, forces, stresses = self.potential.evaluate(
            [(frame, self.potential.edges(frame, 0.0))], stress=stress)
        self.results = {"energy": float(energies[0]), "forces": forces[0]}
        if stress:  # ASE's Voigt order: xx, yy, zz, yz, xz, xy
            s = stresses[0]
            self.results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2],
                                               s[0, 1]])


def relaxed(frame: Frame, potential: Potential, cfg: PhysicsConfig) -> Frame:
    """The frame after FIRE (at most STEPS steps, fmax FMAX eV/Å) on atomic positions, or
    on positions and cell (ASE's FrechetCellFilter; crystals only); the input frame when the
    relaxation fails."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    if cfg.relax == "none":
        return frame
    atoms = Atoms(numbers=frame.numbers, positions=frame.positions,
                  cell=frame.cell, pbc=frame.pbc)
    atoms.calc = _PotentialCalculator(potential)
    cell = cfg.relax == "positions+cell" and frame.periodic
    try:
        FIRE(FrechetCellFilter(atoms) if cell else atoms, logfile=None).run(fmax=FMAX,
                                                                           steps=STEPS)
    except (ValueError, np.linalg.LinAlgError):
        return frame
    return Frame(frame.numbers, atoms.positions.copy(), np.asarray(atoms.cell).copy(),
                 frame.pbc)
