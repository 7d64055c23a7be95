"""Seconds of the phonon DOS descriptors of the first 12 matbench_phonons structures per
`physics.batch_atoms` (one thread): on a CPU, larger batches cost more per atom.

    .venv/bin/python benchmarks/physics_batch_size.py
"""

import gzip
import json
import time
import warnings
from pathlib import Path

import torch
from pymatgen.core import Structure

from matxfer.config import ModelConfig
from matxfer.physics.cache import potential_of
from matxfer.physics.config import PhysicsConfig
from matxfer.physics.descriptors import describe
from matxfer.physics.potential import frame_of

DATA = Path(__file__).parents[1].parent / "shared/data/matbench/matbench_phonons.json.gz"

if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = json.load(gzip.open(DATA))["data"][:12]
    frames = [frame_of(Structure.from_dict(r[0])) for r in rows]
    for batch_atoms in (64, 128, 256, 512):
        cfg = PhysicsConfig(descriptors=["phdos_last_peak"], batch_atoms=batch_atoms)
        potential = potential_of(ModelConfig(), cfg)
        describe(frames[:1], potential, cfg)  # warm-up
        started = time.perf_counter()
        describe(frames, potential, cfg)
        print(f"batch_atoms {batch_atoms}: {time.perf_counter() - started:.1f} s", flush=True)
