"""Zero-shot physics of the pretrained potential, many structures at a time.

- Γ phonons: the Hessian by central differences of forces (the symmetry-inequivalent atoms and
  directions of a crystal moved by ±h, matxfer.physics.symmetry; every coordinate of a
  molecule), mass-weighted, eigenvalues -> cm⁻¹ (imaginary modes as negative numbers);
- bulk modulus: Birch-Murnaghan fit (ASE's EquationOfState) to the energy at 7 volumes;
- elastic tensor: central differences of the stress under ±strain for the 6 Voigt strains
  (clamped ions), Voigt-Reuss-Hill K and G;
- phonon DOS: supercell force constants, DOS on a q-mesh, its last peak (matxfer.physics.phdos);
- exfoliation energy: the layer restacked into a bulk (matxfer.physics.exfoliation).
A structure where a computation fails gets NaN for its descriptors, never an exception.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
from ase.data import atomic_masses
from ase.units import GPa, _amu, _c, _e

from matxfer.physics.config import PhysicsConfig
from matxfer.physics.exfoliation import exfoliation_values
from matxfer.physics.phdos import dos_values, supercell_phonopy
from matxfer.physics.potential import Edges, Frame, Potential
from matxfer.physics.symmetry import central_rows, displacements

# sqrt(eV / (Å² amu)) in cm⁻¹ (≈ 521.47): angular frequency / (2π c)
CM1 = math.sqrt(_e / (1e-20 * _amu)) / (2 * math.pi * _c * 100)
EOS_POINTS = 7
VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def skin(cfg: PhysicsConfig, r_max: float) -> float:
    """Neighbour-list skin covering every copy: the largest strain's stretch of r_max plus
    twice the displacement."""
    stretch = max((1 + cfg.eos_strain) ** (1 / 3) - 1, cfg.strain)
    return r_max * stretch + 2 * cfg.displacement + 0.05


def hessian(forces: Sequence[np.ndarray], h: float) -> np.ndarray:
    """The symmetrised central-difference Hessian [3n,3n] eV/Å² of the copies that
    matxfer.physics.symmetry.displaced makes."""
    rows = central_rows(forces, h)
    return 0.5 * (rows + rows.T)


def frequencies(hess: np.ndarray, numbers: np.ndarray) -> np.ndarray:
    """Γ frequencies [3n] cm⁻¹, ascending, of the mass-weighted Hessian [3n,3n] eV/Å²;
    imaginary modes are returned as negative numbers."""
    inv_sqrt_m = np.repeat(1.0 / np.sqrt(atomic_masses[numbers]), 3)
    dyn = hess * inv_sqrt_m[:, None] * inv_sqrt_m[None, :]
    lam = np.linalg.eigvalsh(0.5 * (dyn + dyn.T))
    return np.sign(lam) * np.sqrt(np.abs(lam)) * CM1


def rigid_modes(frame: Frame) -> int:
    """Zero-frequency modes: 3 translations of a crystal; a molecule also rotates (3 more,
    2 when it is linear)."""
    if frame.periodic:
        return 3
    centred = frame.positions - frame.positions.mean(axis=0)
    linear = len(centred) < 3 or np.linalg.svd(centred, compute_uv=False)[1] < 1e-3
    return min(5 if linear else 6, 3 * len(centred))


def spectrum_moments(freqs: np.ndarray, n_rigid: int) -> dict[str, float]:
    """phonon_max/mean/rms/min of a Γ spectrum [3n] cm⁻¹; the `n_rigid` smallest |ω|
    (translations, rotations: `rigid_modes`) are left out of mean, rms and min."""
    optical = freqs[np.sort(np.argsort(np.abs(freqs))[n_rigid:])]
    if not len(optical):
        return dict.fromkeys(("phonon_max", "phonon_mean", "phonon_rms", "phonon_min"), math.nan)
    return {"phonon_max": float(freqs.max()), "phonon_mean": float(optical.mean()),
            "phonon_rms": float(np.sqrt(np.mean(optical ** 2))),
            "phonon_min": float(optical.min())}


def strain_gradients(delta: float) -> list[np.ndarray]:
    """12 deformation gradients I + ε: per Voigt component j, +delta then -delta
    (engineering strain: a shear ε_yz = ε_zy = delta/2)."""
    out = []
    for i, k in VOIGT:
        for sign in (1.0, -1.0):
            eps = np.zeros((3, 3))
            eps[i, k] = eps[k, i] = sign * delta * (1.0 if i == k else 0.5)
            out.append(np.eye(3) + eps)
    return out


def elastic_tensor(stresses: np.ndarray, delta: float) -> np.ndarray:
    """C [6,6] GPa (Voigt) from the stresses [12,3,3] eV/Å³ of the `strain_gradients` copies."""
    voigt = np.array([[s[i, k] for i, k in VOIGT] for s in stresses])  # [12, 6]
    c = (voigt[0::2] - voigt[1::2]).T / (2 * delta) / GPa  # column j: response to strain j
    return 0.5 * (c + c.T)


def vrh(c: np.ndarray) -> tuple[float, float]:
    """Voigt-Reuss-Hill (K, G) in the units of the elastic tensor c [6,6] (Voigt notation)."""
    k_v = (c[0, 0] + c[1, 1] + c[2, 2] + 2 * (c[0, 1] + c[1, 2] + c[0, 2])) / 9
    g_v = (c[0, 0] + c[1, 1] + c[2, 2] - (c[0, 1] + c[1, 2] + c[0, 2])
           + 3 * (c[3, 3] + c[4, 4] + c[5, 5])) / 15
    s = np.linalg.inv(c)
    k_r = 1 / (s[0, 0] + s[1, 1] + s[2, 2] + 2 * (s[0, 1] + s[1, 2] + s[0, 2]))
    g_r = 15 / (4 * (s[0, 0] + s[1, 1] + s[2, 2]) - 4 * (s[0, 1] + s[1, 2] + s[0, 2])
                + 3 * (s[3, 3] + s[4, 4] + s[5, 5]))
    return float((k_v + k_r) / 2), float((g_v + g_r) / 2)


def eos_gradients(eos_strain: float) -> list[np.ndarray]:
    """Isotropic deformations to volumes V0 (1 + s), s evenly in [-eos_strain, eos_strain]."""
    return [np.eye(3) * (1 + s) ** (1 / 3)
            for s in np.linspace(-eos_strain, eos_strain, EOS_POINTS)]


def bulk_modulus_eos(volumes: np.ndarray, energies: np.ndarray) -> float:
    """B0 in GPa of a Birch-Murnaghan fit; NaN when the fit fails or its minimum lies outside
    the sampled volumes."""
    from ase.eos import EquationOfState

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v0, _, b = EquationOfState(volumes, energies, eos="birchmurnaghan").fit()
    except Exception:  # ASE raises several types when the fit does not converge
        return math.nan
    if not (volumes.min() <= v0 <= volumes.max()) or not np.isfinite(b):
        return math.nan
    return float(b / GPa)


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 else math.nan


Plan = tuple[list[tuple[Frame, Edges]], object]  # copies, how to read them


def supercell(frame: Frame, n: int) -> Frame:
    """The n x n x n supercell of a crystal (atoms in image order, then as in the cell)."""
    shifts = np.array([(i, j, k) for i in range(n) for j in range(n) for k in range(n)])
    offsets = shifts @ frame.cell  # [n³, 3]
    positions = (frame.positions[None, :, :] + offsets[:, None, :]).reshape(-1, 3)
    return Frame(np.tile(frame.numbers, len(shifts)), positions, frame.cell * n, frame.pbc)


def _group_frames(frame: Frame, edges: Edges, group: str, cfg: PhysicsConfig,
                  potential: Potential) -> Plan:
    if group == "energy":
        return [(frame, edges)], None
    if group == "phdos":
        if not frame.periodic or len(frame.numbers) > cfg.max_atoms:
            return [], None
        try:
            phonon, big, copies = supercell_phonopy(frame, cfg)
        except Exception:  # noqa: BLE001 - spglib/phonopy raise many types on odd cells
            return [], None
        big_edges = potential.edges(big, 2 * cfg.displacement + 0.05)
        return [(c, big_edges) for c in copies], phonon
    if group == "phonons":
        if cfg.supercell > 1 and frame.periodic:  # Γ of the supercell: zone-boundary modes too
            frame = supercell(frame, cfg.supercell)
            edges = potential.edges(frame, skin(cfg, potential.r_max))
        if len(frame.numbers) > cfg.max_atoms:
            return [], None
        disp = displacements(frame, cfg.displacement, cfg.symmetry)
        return [(f, edges) for f in disp.frames], disp
    if not frame.periodic:  # volumes and strains need a cell
        return [], None
    grads = eos_gradients(cfg.eos_strain) if group == "eos" else strain_gradients(cfg.strain)
    return [(frame.deformed(g), edges) for g in grads], None


def _group_values(frame: Frame, group: str, cfg: PhysicsConfig, disp,
                  energies, forces, stresses) -> dict[str, float]:
    if group == "energy":
        return {"energy_per_atom": float(energies[0]) / len(frame.numbers)}
    if group == "phdos":
        return dos_values(disp, forces, cfg)
    if group == "phonons":
        return spectrum_moments(frequencies(disp.hessian(forces), disp.frame.numbers),
                                rigid_modes(disp.frame))
    if group == "eos":
        volume = abs(np.linalg.det(frame.cell))
        volumes = np.array([volume * np.linalg.det(g) for g in eos_gradients(cfg.eos_strain)])
        return {"bulk_modulus_eos": bulk_modulus_eos(volumes, np.asarray(energies))}
    k, g = vrh(elastic_tensor(stresses, cfg.strain))
    return {"k_vrh": k, "g_vrh": g, "log10_k_vrh": _log10(k), "log10_g_vrh": _log10(g)}


def describe(frames: Sequence[Frame], potential: Potential, cfg: PhysicsConfig,
             on_done: Callable[[int], None] | None = None, reasons: Counter | None = None
             ) -> np.ndarray:
    """Descriptors [N, len(cfg.descriptors)] (units in DESCRIPTORS) of the frames; NaN where
    a computation fails or does not apply (`reasons` counts why, where a descriptor says).
    The copies of a group of structures go through the potential together; `on_done(k)`
    reports k more structures finished."""
    reasons = Counter() if reasons is None else reasons
    out = np.full((len(frames), len(cfg.descriptors)), np.nan)
    column = {name: j for j, name in enumerate(cfg.descriptors)}
    start = 0
    while start < len(frames):
        stop = _group_end(frames, start, potential.batch_atoms, cfg)
        for i, values in zip(range(start, stop), _describe_group(frames[start:stop], potential,
                                                                 cfg, reasons)):
            for name, value in values.items():
                if name in column:
                    out[i, column[name]] = value
        if on_done:
            on_done(stop - start)
        start = stop
    return out


def _group_end(frames: Sequence[Frame], start: int, batch_atoms: int, cfg: PhysicsConfig
               ) -> int:
    """End of a group of structures whose copies fill about 4 batches of the potential."""
    atoms, stop = 0, start
    cells = cfg.dos_supercell ** 3 if "phdos" in cfg.groups() else 1
    while stop < len(frames) and (stop == start or atoms < 4 * batch_atoms):
        n = len(frames[stop].numbers)
        atoms += n * (1 + 6 * min(n, cfg.max_atoms) * cells + 20)
        stop += 1
    return stop


def _describe_group(frames: Sequence[Frame], potential: Potential, cfg: PhysicsConfig,
                    reasons: Counter) -> list[dict[str, float]]:
    values: list[dict[str, float]] = [{} for _ in frames]
    if "exfoliation" in cfg.groups():  # its own passes: a scan, then a refinement
        layers, why = exfoliation_values(frames, potential, cfg)
        reasons.update(why)
        for v, layer in zip(values, layers):
            v.update(layer)
    edges = []
    for frame in frames:
        if not set(frame.numbers.tolist()) <= set(potential.z_index):
            edges.append(None)  # an element outside the potential: NaN
            continue
        try:
            edges.append(potential.edges(frame, skin(cfg, potential.r_max)))
        except Exception:  # a structure the neighbour list cannot take: NaN
            edges.append(None)
    for group in [g for g in cfg.groups() if g != "exfoliation"]:
        plans = [_group_frames(f, e, group, cfg, potential) if e is not None else ([], None)
                 for f, e in zip(frames, edges)]
        flat = [item for copies, _ in plans for item in copies]
        energies, forces, stresses = potential.evaluate(flat, stress=group == "elastic")
        at = 0
        for i, (copies, disp) in enumerate(plans):
            if not copies:
                continue
            part = slice(at, at + len(copies))
            at += len(copies)
            try:
                values[i].update(_group_values(
                    frames[i], group, cfg, disp, energies[part], forces[part],
                    None if stresses is None else stresses[part]))
            except (np.linalg.LinAlgError, ValueError, ZeroDivisionError, RuntimeError):
                pass  # NaN stays
    return values
