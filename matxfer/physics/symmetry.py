"""The displaced copies behind a Γ-point Hessian, with or without crystal symmetry.

Without symmetry every coordinate moves by ±h (6n copies). With it (phonopy, on the cell as
given: no supercell, no primitive reduction) only symmetry-inequivalent atoms and directions
move, and phonopy rebuilds the full force constants from their forces by symmetry: on
matbench_phonons that is 4.2x fewer atoms through the potential for the same Hessian.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from matxfer.physics.potential import Frame


@dataclass
class Displacements:
    """Copies of one structure and the Hessian [3n,3n] eV/Å² their forces give."""

    frame: Frame
    h: float
    frames: list[Frame] = field(default_factory=list)
    phonopy: object | None = None  # phonopy.Phonopy when symmetry is used

    def hessian(self, forces: Sequence[np.ndarray]) -> np.ndarray:
        """Symmetrised Hessian from the forces [n,3] of `frames`, in their order."""
        if self.phonopy is None:
            rows = central_rows(forces, self.h)
        else:
            self.phonopy.forces = np.stack(forces)
            self.phonopy.produce_force_constants()
            fc = self.phonopy.force_constants  # [n, n, 3, 3]: d2E / du_ia du_jb
            n = len(fc)
            rows = fc.transpose(0, 2, 1, 3).reshape(3 * n, 3 * n)
        return 0.5 * (rows + rows.T)


def displaced(frame: Frame, h: float) -> list[Frame]:
    """6n copies: atom a moved by +h then -h along x, y, z (order: a, axis, sign)."""
    out = []
    for a in range(len(frame.numbers)):
        for k in range(3):
            for sign in (1.0, -1.0):
                pos = frame.positions.copy()
                pos[a, k] += sign * h
                out.append(Frame(frame.numbers, pos, frame.cell, frame.pbc))
    return out


def central_rows(forces: Sequence[np.ndarray], h: float) -> np.ndarray:
    """Central-difference Hessian [3n,3n] eV/Å² (row i: coordinate i displaced) from the
    forces [n,3] of the `displaced` copies; symmetric up to finite-difference error."""
    plus, minus = np.stack(forces[0::2]), np.stack(forces[1::2])  # [3n, n, 3]
    return -(plus - minus).reshape(len(plus), -1) / (2 * h)


def all_coordinates(frame: Frame, h: float) -> Displacements:
    return Displacements(frame, h, displaced(frame, h))


def by_symmetry(frame: Frame, h: float, symprec: float = 1e-5) -> Displacements:
    """phonopy's symmetry-reduced displacements of a periodic frame. The copies are built
    here from phonopy's (atom, vector) list, so atoms keep their unwrapped positions and the
    frame's neighbour list stays valid."""
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    unit = PhonopyAtoms(numbers=frame.numbers, cell=frame.cell, positions=frame.positions)
    phonon = Phonopy(unit, supercell_matrix=np.eye(3, dtype=int), primitive_matrix=np.eye(3),
                     symprec=symprec, log_level=0)
    # always ±h: "auto" (-h only where symmetry does not map +h onto it) would save another
    # 11% of atoms on matbench_phonons; a change of values needs a new cache FORMAT
    phonon.generate_displacements(distance=h, is_plusminus=True)
    frames = []
    for entry in phonon.dataset["first_atoms"]:
        pos = frame.positions.copy()
        pos[entry["number"]] += entry["displacement"]
        frames.append(Frame(frame.numbers, pos, frame.cell, frame.pbc))
    return Displacements(frame, h, frames, phonon)


def displacements(frame: Frame, h: float, symmetry: bool) -> Displacements:
    """By symmetry for a crystal when asked (falling back to every coordinate when phonopy
    cannot analyse the cell), every coordinate otherwise."""
    if symmetry and frame.periodic:
        try:
            return by_symmetry(frame, h)
        except Exception:  # noqa: BLE001 - spglib/phonopy raise many types on odd cells
            pass
    return all_coordinates(frame, h)
