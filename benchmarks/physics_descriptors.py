"""Cost of the zero-shot phonon descriptors (matxfer.physics) on matbench_phonons.

On the same structures, in one process:
- per-call loop: ASE's MACECalculator in float64, one `get_forces` per displaced copy (6n of
  them), the way the issue's independent measurement did it;
- MACE's own Hessian: `MACECalculator.get_hessian` (autograd), one structure per call;
- matxfer batched finite differences (every copy of many structures in a few large batches),
  float64 and float32 (the default).
Then the batched float32 path on `--all` structures (default: the whole task) for seconds per
1,000 structures. The largest Γ frequency of each path is compared with the loop's.

    .venv/bin/python benchmarks/physics_descriptors.py --loop 20 --all 1265
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from matxfer.config import DataConfig
from matxfer.datasets.loading import stream_rows
from matxfer.model import load_backbone
from matxfer.physics.config import PhysicsConfig
from matxfer.physics.descriptors import describe, frequencies, hessian
from matxfer.physics.potential import Potential, frame_of
from matxfer.physics.symmetry import displaced

RESULTS = Path(__file__).parent / "results" / "physics_descriptors.json"


def loop_max_frequency(atoms, calc, h: float) -> float:
    """The per-call reference: forces of each displaced copy, one calculator call each."""
    frame = frame_of(atoms)
    forces = []
    for copy in displaced(frame, h):
        moved = atoms.copy()
        moved.positions = copy.positions
        moved.calc = calc
        forces.append(moved.get_forces())
    return float(frequencies(hessian(forces, h), frame.numbers).max())


def mace_hessian_max_frequency(atoms, calc) -> float:
    hess = calc.get_hessian(atoms).reshape(3 * len(atoms), 3 * len(atoms))
    return float(frequencies(0.5 * (hess + hess.T), atoms.numbers).max())


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", type=int, default=20, help="structures for the comparison")
    parser.add_argument("--all", type=int, default=1265, help="structures for the full run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from mace.calculators import MACECalculator
    from pymatgen.io.ase import AseAtomsAdaptor

    structures = [s for _, s, _ in stream_rows(DataConfig(task="matbench_phonons"), [])]
    atoms = [AseAtomsAdaptor.get_atoms(s) for s in structures[:args.loop]]
    frames = [frame_of(s) for s in structures[:args.all]]
    cfg = PhysicsConfig(descriptors=["phonon_max"])
    f64 = load_backbone("small", dtype=torch.float64)
    calc = MACECalculator(models=f64, device="cpu", default_dtype="float64")
    rows = {}
    ref, rows["per-call loop (ASE, float64)"] = timed(
        lambda: [loop_max_frequency(a, calc, cfg.displacement) for a in atoms])
    mace_h, rows["MACE get_hessian (autograd, float64)"] = timed(
        lambda: [mace_hessian_max_frequency(a, calc) for a in atoms])
    values = {"MACE get_hessian (autograd, float64)": mace_h}
    for name, dtype in (("matxfer batched (float64)", torch.float64),
                        ("matxfer batched (float32)", torch.float32)):
        pot = Potential(f64, cfg.batch_atoms, dtype)
        out, rows[name] = timed(lambda p=pot: describe(frames[:args.loop], p, cfg)[:, 0])
        values[name] = list(out)
    pot = Potential(f64, cfg.batch_atoms, torch.float32)
    full, full_seconds = timed(lambda: describe(frames, pot, cfg))
    base = rows["per-call loop (ASE, float64)"]
    report = {
        "command": "benchmarks/physics_descriptors.py " + f"--loop {args.loop} --all {args.all}",
        "structures": args.loop, "atoms": int(sum(len(a) for a in atoms)),
        "seconds": rows, "speedup_vs_loop": {k: base / v for k, v in rows.items()},
        "max_abs_diff_cm1_vs_loop": {k: float(np.nanmax(np.abs(np.array(v) - ref)))
                                     for k, v in values.items()},
        "all_structures": len(frames), "all_seconds": full_seconds,
        "seconds_per_1000": 1000 * full_seconds / len(frames),
        "all_nan": int(np.isnan(full).sum()),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.loop} structures ({report['atoms']} atoms), phonon_max:")
    for name, seconds in rows.items():
        diff = report["max_abs_diff_cm1_vs_loop"].get(name, 0.0)
        print(f"  {name:40s} {seconds:8.1f} s  x{base / seconds:6.1f}  max |Δ| {diff:.3f} cm^-1")
    print(f"all {len(frames)} structures, batched float32: {full_seconds:.0f} s "
          f"({report['seconds_per_1000']:.0f} s per 1,000)")


if __name__ == "__main__":
    main()
