"""Write the example dataset from the offline Matbench phonons file: 200 structures (a seeded
pick of rows) as one extended-XYZ file and as a folder of CIF files with a CSV of labels.

    .venv/bin/python examples/make_example.py   # needs ../shared (or MATMINER_DATA)

Provenance: matbench_phonons v0.1 (Petretto et al., Sci. Data 5, 180065 (2018); Dunn et al.,
npj Comput. Mater. 6, 138 (2020)), target "last phdos peak" (cm^-1), via matminer's loader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.io import write
from pymatgen.io.ase import AseAtomsAdaptor

from matxfer.datasets.matbench import load_task

HERE = Path(__file__).parent / "phonons200"
N, SEED = 200, 0


def main() -> None:
    frame = load_task("matbench_phonons")
    rows = np.sort(np.random.default_rng(SEED).permutation(len(frame))[:N])
    (HERE / "cifs").mkdir(parents=True, exist_ok=True)
    images, lines = [], ["id,cif,last_phdos_peak"]
    for mbid, (structure, target) in frame.iloc[rows].iterrows():
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.info = {"id": mbid, "last_phdos_peak": float(target)}
        images.append(atoms)
        write(HERE / "cifs" / f"{mbid}.cif", atoms, format="cif")
        lines.append(f"{mbid},cifs/{mbid}.cif,{float(target)!r}")
    write(HERE / "phonons200.extxyz", images, format="extxyz")
    (HERE / "labels.csv").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(images)} structures to {HERE}")


if __name__ == "__main__":
    main()
