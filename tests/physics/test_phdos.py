"""The phonon DOS descriptors: the last DOS peak and the band maximum from supercell force
constants, checked against the probe's way (phonopy's own displaced supercells, one potential
call each), against Γ, and on hand-made densities of states."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from phonopy import Phonopy
from phonopy.structure.atoms import PhonopyAtoms

from matxfer.physics.config import PhysicsConfig
from matxfer.physics.descriptors import describe
from matxfer.physics.phdos import THZ_TO_CM1, last_peak
from matxfer.physics.potential import Frame, Potential, frame_of


@pytest.fixture(scope="module")
def potential(backbone):
    return Potential(backbone, batch_atoms=512, dtype=torch.float64)


def gaussian(x, centre, height, width=5.0):
    return height * np.exp(-0.5 * ((x - centre) / width) ** 2)


def test_last_peak_is_the_highest_frequency_peak_above_five_percent_of_the_maximum():
    x = np.linspace(0, 500, 2001)
    dos = gaussian(x, 100, 1.0) + gaussian(x, 300, 0.5)
    assert last_peak(x, dos) == pytest.approx(300, abs=0.3)
    # a bump below 5% of the maximum (a smearing tail, a few weak modes) is not a peak
    assert last_peak(x, dos + gaussian(x, 420, 0.04)) == pytest.approx(300, abs=0.3)
    assert last_peak(x, dos + gaussian(x, 420, 0.06)) == pytest.approx(420, abs=0.3)
    # a monotonic DOS has no inner maximum: its global maximum stands in
    assert last_peak(x, x.copy()) == pytest.approx(500)


def probe_way(atoms, potential: Potential, cfg: PhysicsConfig) -> tuple[float, float]:
    """../shared/probes/phdos_probe.py's way: phonopy's displaced supercells, one potential
    call each with its own neighbour list, then the same DOS."""
    unit = PhonopyAtoms(numbers=atoms.numbers, cell=atoms.cell[:],
                        scaled_positions=atoms.get_scaled_positions())
    phonon = Phonopy(unit, supercell_matrix=np.eye(3, dtype=int) * cfg.dos_supercell,
                     primitive_matrix=np.eye(3), log_level=0)
    phonon.generate_displacements(distance=cfg.displacement)
    forces = []
    for cell in phonon.supercells_with_displacements:
        frame = Frame(np.asarray(cell.numbers), np.asarray(cell.positions),
                      np.asarray(cell.cell), (True,) * 3)
        forces.append(potential.evaluate([(frame, potential.edges(frame, 0.0))])[1][0])
    phonon.forces = np.array(forces)
    phonon.produce_force_constants()
    phonon.symmetrize_force_constants()
    phonon.run_mesh([cfg.dos_mesh] * 3, is_gamma_center=True)
    band_max = phonon.mesh.frequencies.max() * THZ_TO_CM1
    phonon.run_total_dos(sigma=cfg.dos_sigma)
    dos = phonon.total_dos
    return last_peak(dos.frequency_points, dos.dos) * THZ_TO_CM1, band_max


def test_batched_dos_descriptors_equal_the_probe_way(potential):
    crystals = [bulk("NaCl", "rocksalt", a=5.6), bulk("Si", "diamond", a=5.43)]
    cfg = PhysicsConfig(descriptors=["phdos_last_peak", "phonon_band_max"], dos_mesh=8)
    batched = describe([frame_of(a) for a in crystals], potential, cfg)
    probe = np.array([probe_way(a, potential, cfg) for a in crystals])
    # float64 forces of the same positions: one shared neighbour list with a skin vs one list
    # per copy changes only the summation order (~1e-15 relative); h = 0.01 Å amplifies that
    # 100x in the force constants, and a frequency is a square root of them: far below 1e-6
    np.testing.assert_allclose(batched, probe, rtol=1e-6)
    assert (batched > 100).all()


def test_band_maximum_includes_gamma(potential):
    """Γ lies on the Γ-centred mesh, so the band maximum is at least the largest Γ frequency
    of the cell's own Hessian; for Si the top optical mode is at Γ, so they coincide."""
    si = frame_of(bulk("Si", "diamond", a=5.43))
    cfg = PhysicsConfig(descriptors=["phonon_band_max", "phonon_max"], dos_mesh=8)
    band_max, gamma_max = describe([si], potential, cfg)[0]
    # the same second derivative by two finite-difference routes (supercell vs cell images):
    # they agree to the O(h²) truncation of ±0.01 Å steps, well below 1 cm⁻¹ of ~500
    assert band_max == pytest.approx(gamma_max, abs=1.0)


def test_dos_descriptors_are_nan_for_molecules_and_oversized_cells(potential):
    nacl = frame_of(bulk("NaCl", "rocksalt", a=5.6))
    molecule = Frame(nacl.numbers, nacl.positions, np.zeros((3, 3)), (False,) * 3)
    cfg = PhysicsConfig(descriptors=["phdos_last_peak"], max_atoms=1, dos_mesh=4)
    values = describe([molecule, nacl], potential, cfg)
    assert np.isnan(values).all()  # no cell; then 2 atoms > max_atoms
