"""Cost of the descriptors that compute the target itself (issue 33), against the probes' way.

In one process, on the same structures, with the same torch threads:
- phonon DOS (matbench_phonons): `../shared/probes/phdos_probe.py`'s way (phonopy's displaced
  2x2x2 supercells, one ASE MACECalculator call each, float32) vs matxfer's batched path
  (`phdos_last_peak`, `phonon_band_max`: every displaced supercell of many structures through
  the potential in 512-atom batches, one neighbour list per structure);
- exfoliation energy (matbench_jdft2d): `../shared/probes/exfoliation_probe.py`'s way (15 gaps,
  one offset, MACE + D3(BJ) as an ASE SumCalculator, float64, one call per gap) vs matxfer's
  batched path (dimensionality analysis, several offsets, scan and refinement, D3 batched).
Seconds per 1,000 structures and the ratio; the DOS values of both ways are compared too.

    .venv/bin/python benchmarks/physics_targets.py --phonons 24 --jdft2d 24
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from matxfer.config import ModelConfig
from matxfer.physics.cache import potential_of
from matxfer.physics.config import PhysicsConfig
from matxfer.physics.descriptors import describe
from matxfer.physics.phdos import THZ_TO_CM1, last_peak
from matxfer.physics.potential import frame_of

RESULTS = Path(__file__).parent / "results" / "physics_targets.json"
DATA = Path(__file__).parents[1].parent / "shared" / "data" / "matbench"


def rows(task: str, n: int):
    from pymatgen.core import Structure

    data = json.load(gzip.open(DATA / f"matbench_{task}.json.gz"))["data"][:n]
    return [Structure.from_dict(s) for s, _ in data], np.array([y for _, y in data])


def mace_file() -> str:
    from matxfer.model import weights_file

    return str(weights_file("small"))


def probe_dos(structures, calc) -> np.ndarray:
    """The probe's loop: phonopy supercells, one calculator call per displaced supercell."""
    from ase import Atoms
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    out = []
    for s in structures:
        unit = PhonopyAtoms(symbols=[sp.symbol for sp in s.species], cell=s.lattice.matrix,
                            scaled_positions=s.frac_coords)
        ph = Phonopy(unit, supercell_matrix=np.eye(3, dtype=int) * 2, log_level=0)
        ph.generate_displacements(distance=0.01)
        forces = []
        for cell in ph.supercells_with_displacements:
            atoms = Atoms(cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions,
                          pbc=True)
            atoms.calc = calc
            forces.append(atoms.get_forces())
        ph.forces = np.array(forces)
        ph.produce_force_constants()
        ph.symmetrize_force_constants()
        ph.run_mesh([12] * 3, is_gamma_center=True)
        band_max = ph.mesh.frequencies.max() * THZ_TO_CM1
        ph.run_total_dos(sigma=0.1)
        dos = ph.total_dos
        out.append((last_peak(dos.frequency_points, dos.dos) * THZ_TO_CM1, band_max))
    return np.array(out)


def probe_exfoliation(structures, calc) -> np.ndarray:
    """The probe's loop: largest-gap axis, 15 gaps, AA offset, one call per gap (meV/atom)."""
    from pymatgen.io.ase import AseAtomsAdaptor

    out = []
    for s in structures:
        lat = s.lattice.matrix
        best = None
        for k in range(3):
            nrm = np.cross(lat[(k + 1) % 3], lat[(k + 2) % 3])
            nrm /= np.linalg.norm(nrm)
            nrm = -nrm if np.dot(nrm, lat[k]) < 0 else nrm
            f = np.sort(s.frac_coords[:, k] % 1.0)
            gaps = np.diff(np.concatenate([f, [f[0] + 1]]))
            j = int(np.argmax(gaps))
            gap = gaps[j] * np.dot(lat[k], nrm)
            if best is None or gap > best[0]:
                best = (gap, k, nrm, f[(j + 1) % len(f)])
        _, k, nrm, start = best
        fc = s.frac_coords.copy()
        fc[:, k] = (fc[:, k] - start) % 1.0
        cart = fc @ lat
        thick = np.ptp(cart @ nrm)
        atoms = AseAtomsAdaptor.get_atoms(s)
        atoms.calc = calc
        e_mono = atoms.get_potential_energy() / len(atoms)
        energies = []
        for g in np.arange(1.8, 6.01, 0.3):
            cell = lat.copy()
            cell[k] = lat[k] * (thick + g) / np.dot(lat[k], nrm)
            bulk = atoms.copy()
            bulk.set_cell(cell, scale_atoms=False)
            bulk.set_positions(cart)
            bulk.calc = calc
            energies.append(bulk.get_potential_energy() / len(bulk))
        out.append(1000 * (e_mono - min(energies)))
    return np.array(out)


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def compare(name: str, probe, batched, n: int) -> dict:
    (p_values, p_s), (b_values, b_s) = probe, batched
    return {"structures": n, "probe_s": round(p_s, 2), "matxfer_s": round(b_s, 2),
            "probe_s_per_1000": round(1000 * p_s / n, 1),
            "matxfer_s_per_1000": round(1000 * b_s / n, 1),
            "speedup": round(p_s / b_s, 2), "what": name,
            "probe_values": np.asarray(p_values).round(3).tolist(),
            "matxfer_values": np.asarray(b_values).round(3).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phonons", type=int, default=24, help="matbench_phonons rows")
    parser.add_argument("--jdft2d", type=int, default=24, help="matbench_jdft2d rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from mace.calculators import mace_mp

    report = {"command": "python benchmarks/physics_targets.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "hardware": f"{platform.machine()}, {args.threads} torch threads, "
                    f"{torch.get_num_threads()} used, torch {torch.__version__}"}
    if args.phonons:
        structures, _ = rows("phonons", args.phonons)
        calc = mace_mp(model=mace_file(), default_dtype="float32", device="cpu")
        cfg = PhysicsConfig(descriptors=["phdos_last_peak", "phonon_band_max"])
        pot = potential_of(ModelConfig(), cfg)
        frames = [frame_of(s) for s in structures]
        describe(frames[:1], pot, cfg)  # warm-up of both ways on one structure
        probe_dos(structures[:1], calc)
        report["phonon_dos"] = compare(
            "phdos_last_peak, phonon_band_max (cm^-1), float32",
            timed(lambda: probe_dos(structures, calc)),
            timed(lambda: describe(frames, pot, cfg)), len(structures))
    if args.jdft2d:
        structures, _ = rows("jdft2d", args.jdft2d)
        calc = mace_mp(model=mace_file(), default_dtype="float64", dispersion=True,
                       device="cpu")
        cfg = PhysicsConfig(descriptors=["exfoliation_energy"])
        pot = potential_of(ModelConfig(), cfg)
        frames = [frame_of(s) for s in structures]
        describe(frames[:1], pot, cfg)
        report["exfoliation"] = compare(
            f"exfoliation_energy (meV/atom); matxfer in {cfg.precision}",
            timed(lambda: probe_exfoliation(structures, calc)),
            timed(lambda: describe(frames, pot, cfg)[:, 0]), len(structures))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for key in ("phonon_dos", "exfoliation"):
        if key in report:
            r = report[key]
            print(f"{key}: probe {r['probe_s_per_1000']} s/1000, matxfer "
                  f"{r['matxfer_s_per_1000']} s/1000, {r['speedup']}x")


if __name__ == "__main__":
    main()
