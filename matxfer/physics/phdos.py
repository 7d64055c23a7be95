"""The phonon density of states of a crystal from supercell force constants.

phonopy builds the n x n x n supercell and its symmetry-reduced displacements; the displaced
supercells go through the batched potential with the other structures' copies (one neighbour
list per structure, shared by its copies); phonopy turns their forces into force constants,
frequencies on a q-mesh and a Gaussian-smeared DOS. Matbench phonons' target is the DOS's
highest-frequency peak, a whole-Brillouin-zone quantity that Γ alone misses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase.units import _c

from matxfer.physics.config import PhysicsConfig
from matxfer.physics.potential import Frame

THZ_TO_CM1 = 1e12 / (_c * 100)  # ≈ 33.356
PEAK_FLOOR = 0.05  # a peak must exceed this fraction of the DOS maximum


def supercell_phonopy(frame: Frame, cfg: PhysicsConfig, symprec: float = 1e-5):
    """(phonopy.Phonopy with displacements generated, the undisplaced supercell Frame, its
    displaced copies). The copies are the supercell's own positions plus phonopy's
    displacement of one atom each, so the supercell's neighbour list serves them all."""
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    unit = PhonopyAtoms(numbers=frame.numbers, cell=frame.cell, positions=frame.positions)
    phonon = Phonopy(unit, supercell_matrix=np.eye(3, dtype=int) * cfg.dos_supercell,
                     primitive_matrix=np.eye(3), symprec=symprec, log_level=0)
    phonon.generate_displacements(distance=cfg.displacement)  # ±h only where symmetry needs it
    cell = phonon.supercell
    big = Frame(np.asarray(cell.numbers, dtype=np.int64), np.asarray(cell.positions, float),
                np.asarray(cell.cell, float), frame.pbc)
    copies = []
    for entry in phonon.dataset["first_atoms"]:
        pos = big.positions.copy()
        pos[entry["number"]] += entry["displacement"]
        copies.append(Frame(big.numbers, pos, big.cell, big.pbc))
    return phonon, big, copies


def last_peak(freqs: np.ndarray, dos: np.ndarray, floor: float = PEAK_FLOOR) -> float:
    """Frequency of the highest local maximum of a DOS [F] above floor x its maximum (the
    global maximum when no other qualifies), in the units of freqs [F]."""
    d = np.asarray(dos, float)
    inner = (d[1:-1] >= d[:-2]) & (d[1:-1] >= d[2:]) & (d[1:-1] > floor * d.max())
    peaks = np.flatnonzero(inner) + 1
    return float(freqs[peaks[-1]] if len(peaks) else freqs[int(np.argmax(d))])


def dos_values(phonon, forces: Sequence[np.ndarray], cfg: PhysicsConfig) -> dict[str, float]:
    """{"phdos_last_peak", "phonon_band_max"} in cm⁻¹ from the forces [8n,3] eV/Å of the
    displaced supercells, in phonopy's order: force constants (symmetrised), mesh, DOS."""
    phonon.forces = np.stack(forces)
    phonon.produce_force_constants()
    phonon.symmetrize_force_constants()
    phonon.run_mesh([cfg.dos_mesh] * 3, is_gamma_center=True)  # keeps the point group
    band_max = float(phonon.mesh.frequencies.max()) * THZ_TO_CM1
    phonon.run_total_dos(sigma=cfg.dos_sigma)
    dos = phonon.total_dos
    peak = last_peak(np.asarray(dos.frequency_points), np.asarray(dos.dos)) * THZ_TO_CM1
    return {"phdos_last_peak": peak, "phonon_band_max": band_max}
