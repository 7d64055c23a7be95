"""Zero-shot physics of MACE-MP-0 small: Γ phonons, elastic constants, equation of state,
checked against symmetry, invariances, hand values and known moduli of simple crystals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.data import atomic_masses

from matxfer.physics.config import PhysicsConfig
from matxfer.physics.descriptors import describe as describe_frames
from matxfer.physics.descriptors import (
    frequencies,
    hessian,
    rigid_modes,
    skin,
    spectrum_moments,
    vrh,
)
from matxfer.physics.potential import Frame, Potential, frame_of
from matxfer.physics.symmetry import all_coordinates, by_symmetry, central_rows, displaced


@pytest.fixture(scope="module")
def potential(backbone):
    return Potential(backbone, batch_atoms=512, dtype=torch.float64)


def gamma_forces(atoms, potential, h=0.01):
    frame = frame_of(atoms)
    edges = potential.edges(frame, skin(PhysicsConfig(), potential.r_max))
    return potential.evaluate([(f, edges) for f in displaced(frame, h)])[1]


def gamma_hessian(atoms, potential, h=0.01):
    return hessian(gamma_forces(atoms, potential, h), h), frame_of(atoms)


def describe(atoms_list, potential, *names, **settings):
    cfg = PhysicsConfig(descriptors=list(names), **settings)
    return describe_frames([frame_of(a) for a in atoms_list], potential, cfg)


def test_potential_matches_mace_calculator_in_float64(backbone, potential):
    from mace.calculators import MACECalculator

    atoms = bulk("NaCl", "rocksalt", a=5.64) * (2, 1, 1)
    atoms.rattle(0.05, seed=1)
    atoms.cell[0, 1] += 0.1
    calc = MACECalculator(models=potential.model, device="cpu", default_dtype="float64")
    atoms.calc = calc
    frame = frame_of(atoms)
    energy, forces, stress = potential.evaluate([(frame, potential.edges(frame, 0.3))], True)
    assert energy[0] == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
    np.testing.assert_allclose(forces[0], atoms.get_forces(), atol=1e-6)
    voigt = atoms.get_stress(voigt=False)
    np.testing.assert_allclose(stress[0], voigt, atol=1e-7)


def test_hessian_is_symmetric_and_its_rows_sum_to_zero(potential):
    atoms = bulk("MgO", "rocksalt", a=4.21) * (1, 1, 2)
    atoms.rattle(0.03, seed=0)
    rows = central_rows(gamma_forces(atoms, potential), 0.01)  # as measured, unsymmetrised
    assert np.abs(rows - rows.T).max() < 1e-3 * np.abs(rows).max()
    hess = hessian(gamma_forces(atoms, potential), 0.01)
    # translation invariance of the potential: moving every atom together costs nothing
    n = len(atoms)
    block_sums = hess.reshape(n, 3, n, 3).sum(axis=2)  # [n, 3, 3]
    assert np.abs(block_sums).max() < 1e-3 * np.abs(hess).max()


def test_frequencies_do_not_change_under_a_rigid_translation(potential):
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.02, seed=3)
    moved = atoms.copy()
    moved.translate([0.37, -1.1, 2.4])
    f0 = frequencies(gamma_hessian(atoms, potential)[0], atoms.numbers)
    f1 = frequencies(gamma_hessian(moved, potential)[0], moved.numbers)
    np.testing.assert_allclose(f0, f1, atol=0.05)


def test_primitive_gamma_modes_appear_in_the_conventional_cell_and_rotated_cell(potential):
    primitive = bulk("Si", "diamond", a=5.43)
    conventional = bulk("Si", "diamond", a=5.43, cubic=True)  # 8 atoms: Γ of the primitive
    f_prim = frequencies(gamma_hessian(primitive, potential)[0], primitive.numbers)
    f_conv = frequencies(gamma_hessian(conventional, potential)[0], conventional.numbers)
    for f in f_prim:  # zone folding: every primitive Γ mode is a Γ mode of the supercell
        assert np.abs(f_conv - f).min() < 1.0, (f, f_conv)
    rotated = primitive.copy()
    rotated.rotate(33, "z", rotate_cell=True)
    f_rot = frequencies(gamma_hessian(rotated, potential)[0], rotated.numbers)
    np.testing.assert_allclose(f_rot, f_prim, atol=0.5)


def test_relaxed_cubic_crystal_has_three_acoustic_modes_near_zero(potential):
    # diamond Si: forces vanish by symmetry, so the structure is relaxed in its positions
    atoms = bulk("Si", "diamond", a=5.43)
    freqs = frequencies(gamma_hessian(atoms, potential)[0], atoms.numbers)
    assert np.abs(freqs[np.argsort(np.abs(freqs))[:3]]).max() < 1.0
    optical = np.sort(np.abs(freqs))[3:]
    assert optical.min() > 300  # the Γ optical triplet of Si (experiment: 520 cm^-1)
    np.testing.assert_allclose(optical, optical.mean(), rtol=1e-3)  # triply degenerate


def test_frequencies_of_a_hand_made_two_mass_chain():
    # two atoms, one spring k along x: ω = sqrt(k (1/m1 + 1/m2)); other directions free
    k, numbers = 2.0, np.array([1, 8])
    hess = np.zeros((6, 6))
    hess[0, 0] = hess[3, 3] = k
    hess[0, 3] = hess[3, 0] = -k
    m1, m2 = atomic_masses[numbers]
    expected = np.sqrt(k * (1 / m1 + 1 / m2)) * 521.4709
    assert frequencies(hess, numbers).max() == pytest.approx(expected, rel=1e-5)


def test_spectrum_moments_leave_out_rigid_modes_and_need_optical_ones():
    freqs = np.array([-0.1, 0.0, 0.2, 100.0, 200.0, 300.0])
    m = spectrum_moments(freqs, n_rigid=3)
    assert m["phonon_max"] == 300.0 and m["phonon_mean"] == 200.0
    assert m["phonon_min"] == 100.0
    assert m["phonon_rms"] == pytest.approx(np.sqrt((100**2 + 200**2 + 300**2) / 3))
    assert np.isnan(spectrum_moments(freqs[:3], n_rigid=3)["phonon_max"])  # one atom


def test_rigid_modes_of_crystals_and_molecules():
    cell = np.eye(3) * 5
    line = np.array([[0.0, 0, 0], [1.1, 0, 0], [2.2, 0, 0]])
    bent = np.array([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    assert rigid_modes(Frame(np.ones(3, int), bent, cell, (True,) * 3)) == 3
    assert rigid_modes(Frame(np.ones(3, int), line, cell, (False,) * 3)) == 5
    assert rigid_modes(Frame(np.ones(3, int), bent, cell, (False,) * 3)) == 6


def test_vrh_of_an_isotropic_tensor_is_its_lame_moduli():
    lam, mu = 60.0, 30.0
    c = np.zeros((6, 6))
    c[:3, :3] = lam
    c[np.arange(3), np.arange(3)] = lam + 2 * mu
    c[np.arange(3, 6), np.arange(3, 6)] = mu
    k, g = vrh(c)
    assert k == pytest.approx(lam + 2 * mu / 3) and g == pytest.approx(mu)


# Experimental bulk moduli at room temperature, GPa: Si 98.8, Cu 137 (Kittel, Introduction to
# Solid State Physics, 8th ed., ch. 3, table 3); NaCl 24.0 (Kittel, ch. 3, table 7); MgO 160
# (Anderson & Andreatch, J. Am. Ceram. Soc. 49, 404 (1966)). MACE-MP-0 is known to be soft
# (Deng et al., npj Comput. Mater. 11, 9 (2025): systematic PES softening of universal
# potentials), so the tolerance is 35%: it catches unit, sign and strain-convention errors
# (a factor 2 in the shear convention or 160 in eV/Å³ -> GPa), not the model's softening.
CRYSTALS = {"Si": (bulk("Si", "diamond", a=5.431), 98.8),
            "Cu": (bulk("Cu", "fcc", a=3.615), 137.0),
            "NaCl": (bulk("NaCl", "rocksalt", a=5.640), 24.0),
            "MgO": (bulk("MgO", "rocksalt", a=4.212), 160.0)}


def test_bulk_moduli_of_simple_crystals_are_near_their_measured_values(potential):
    atoms = [a for a, _ in CRYSTALS.values()]
    values = describe(atoms, potential, "bulk_modulus_eos", "k_vrh", "g_vrh")
    for (name, (_, reference)), (b_eos, k, g) in zip(CRYSTALS.items(), values):
        assert b_eos == pytest.approx(reference, rel=0.35), name
        assert k == pytest.approx(reference, rel=0.35), name
        assert 0 < g < 2 * k, name
    order = np.argsort(values[:, 1])
    assert [list(CRYSTALS)[i] for i in order[:2]] == ["NaCl", "Si"]  # softest two


def test_batched_descriptors_equal_one_structure_at_a_time(potential):
    atoms = [bulk("NaCl", "rocksalt", a=5.6), bulk("Si", "diamond", a=5.43),
             bulk("Cu", "fcc", a=3.6) * (2, 1, 1)]
    atoms[2].rattle(0.02, seed=2)
    names = ("phonon_max", "phonon_mean", "bulk_modulus_eos", "k_vrh", "energy_per_atom")
    together = describe(atoms, potential, *names)
    alone = np.concatenate([describe([a], potential, *names) for a in atoms])
    # float64 forces and stresses differ by round-off (~1e-15 relative) when a batch reorders
    # sums; finite differences over h = 0.01 amplify that 100x, so the Hessian and elastic
    # descriptors agree to far better than 1e-9. The EOS modulus is a least-squares fit
    # (scipy's curve_fit, MINPACK xtol = 1.49e-8): it stops anywhere within ~xtol of the
    # optimum, so two fits of round-off-different energies may differ by a few xtol (2.7e-8
    # seen on an AVX-512 EPYC); 1e-6 bounds that with margin.
    rtol = np.array([1e-6 if n == "bulk_modulus_eos" else 1e-9 for n in names])
    np.testing.assert_array_less(np.abs(together - alone), rtol * np.abs(alone) + 1e-9)
    assert np.isfinite(together).all()


def test_failures_give_nan_not_exceptions(potential):
    one_atom = bulk("Cu", "fcc", a=3.6)  # no optical modes
    molecule = frame_of(bulk("NaCl", "rocksalt", a=5.6))
    molecule = Frame(molecule.numbers, molecule.positions, np.zeros((3, 3)), (False,) * 3)
    cfg = PhysicsConfig(descriptors=["phonon_max", "k_vrh", "energy_per_atom"])
    values = describe_frames([frame_of(one_atom), molecule], potential, cfg)
    assert np.isnan(values[0, 0]) and np.isfinite(values[0, 1:]).all()
    assert np.isfinite(values[1, 0]) and np.isnan(values[1, 1])  # no cell: no strain


def test_float32_descriptors_agree_with_float64(backbone, potential):
    atoms = [bulk("MgO", "rocksalt", a=4.21), bulk("Si", "diamond", a=5.43)]
    names = ("phonon_max", "k_vrh", "bulk_modulus_eos")
    f64 = describe(atoms, potential, *names)
    f32 = describe(atoms, Potential(backbone, dtype=torch.float32), *names)
    np.testing.assert_allclose(f32, f64, rtol=2e-3)


def test_symmetry_reduced_hessian_equals_the_full_one(potential):
    from ase.spacegroup import crystal

    perovskite = crystal(["Sr", "Ti", "O"], [(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)],
                         spacegroup=221, cellpar=[3.9, 3.9, 3.9, 90, 90, 90])
    for atoms in (perovskite, bulk("Si", "diamond", a=5.43, cubic=True)):
        frame = frame_of(atoms)
        edges = potential.edges(frame, 0.1)
        full, reduced = all_coordinates(frame, 0.01), by_symmetry(frame, 0.01)
        assert len(reduced.frames) < len(full.frames) / 4  # 2 or 4 copies instead of 30 or 48
        hessians = [d.hessian(potential.evaluate([(f, edges) for f in d.frames])[1])
                    for d in (full, reduced)]
        # the same Hessian up to the O(h²) anharmonic error of different displacement directions
        np.testing.assert_allclose(hessians[1], hessians[0], atol=1e-3 * np.abs(hessians[0]).max())
        freqs = [frequencies(h, frame.numbers) for h in hessians]
        np.testing.assert_allclose(freqs[1], freqs[0], atol=1.0)  # cm^-1


def test_relaxation_returns_a_rattled_crystal_to_zero_forces(potential):
    from matxfer.physics.relax import FMAX, relaxed

    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.05, seed=4)
    frame = frame_of(atoms)
    cfg = PhysicsConfig(descriptors=["phonon_max"], relax="positions")
    before = potential.evaluate([(frame, potential.edges(frame, 0.0))])[1][0]
    moved = relaxed(frame, potential, cfg)
    after = potential.evaluate([(moved, potential.edges(moved, 0.0))])[1][0]
    assert np.abs(before).max() > 10 * FMAX and np.abs(after).max() < FMAX
    np.testing.assert_array_equal(moved.cell, frame.cell)  # positions only


def test_cell_relaxation_finds_the_equation_of_state_minimum(potential):
    from matxfer.physics.relax import relaxed

    atoms = bulk("Cu", "fcc", a=3.615 * 1.03)  # 9% too large a volume
    frame = frame_of(atoms)
    cfg = PhysicsConfig(descriptors=["bulk_modulus_eos"], relax="positions+cell")
    moved = relaxed(frame, potential, cfg)
    stress = potential.evaluate([(moved, potential.edges(moved, 0.0))], stress=True)[2][0]
    assert np.abs(stress).max() * 160.2 < 0.5  # GPa: the cell is relaxed
    volume = abs(np.linalg.det(moved.cell))
    assert volume < 0.97 * abs(np.linalg.det(frame.cell))  # it shrank toward equilibrium


def test_supercell_gamma_contains_the_cell_gamma_and_zone_boundary_modes(potential):
    from matxfer.physics.descriptors import supercell

    atoms = bulk("NaCl", "rocksalt", a=5.64)
    cell = describe([atoms], potential, "phonon_max", "phonon_min")
    big = describe([atoms], potential, "phonon_max", "phonon_min", supercell=2)
    assert big[0, 0] >= cell[0, 0] - 1.0  # the Γ modes are still there
    assert big[0, 1] < cell[0, 1]  # zone-boundary acoustic branches: lower optical-free modes
    frame = supercell(frame_of(atoms), 2)
    assert len(frame.numbers) == 16
    np.testing.assert_allclose(abs(np.linalg.det(frame.cell)), 8 * atoms.get_volume())


@pytest.mark.parametrize("relax", ["positions", "positions+cell"])
def test_compute_relaxes_before_the_descriptors_when_asked(relax, potential):
    from matxfer.physics.cache import compute

    atoms = bulk("Cu", "fcc", a=3.615 * 1.03) * (2, 1, 1)
    atoms.rattle(0.05, seed=5)
    frames = [frame_of(atoms)]
    plain = compute(frames, potential, PhysicsConfig(descriptors=["energy_per_atom"]), False)
    relaxed_ = compute(frames, potential,
                       PhysicsConfig(descriptors=["energy_per_atom"], relax=relax), False)
    assert relaxed_[0, 0] < plain[0, 0] - 1e-4  # eV/atom: the relaxed structure is lower
