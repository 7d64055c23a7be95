"""A small labelled dataset the tests write themselves, in every format matxfer reads:
24 rock-salt crystals of 8 formulas (3 lattice constants each) plus one
molecule, with ids, a target (a smooth function of the lattice constant), a class label and
the user's own fold labels."""

from __future__ import annotations

from pathlib import Path

from ase import Atoms
from ase.build import bulk
from ase.io import write

SALTS = [("NaCl", 5.64), ("KCl", 6.29), ("LiF", 4.03), ("NaF", 4.63), ("MgO", 4.21),
         ("CaO", 4.81), ("KBr", 6.60), ("LiCl", 5.13)]


def crystals() -> list[Atoms]:
    images = []
    for n, (formula, a0) in enumerate(SALTS):
        for j, scale in enumerate((0.98, 1.0, 1.02)):
            atoms = bulk(formula, "rocksalt", a=a0 * scale)
            atoms.info = {"id": f"{formula}-{j}", "y": round(10.0 * a0 * scale, 6),
                          "metal": int(n % 2 == 0), "mine": f"f{(3 * n + j) % 3}"}
            images.append(atoms)
    return images


def molecule() -> Atoms:
    water = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], pbc=False)
    water.info = {"id": "water", "y": 1.0, "metal": 0, "mine": "f0"}
    return water




def source(path, **extra) -> dict:
    """A data section for `path` (target y, ids from 'id', structure files in 'file')."""
    src = {"path": str(path), "target": "y", "id_key": "id", **extra}
    if str(path).endswith((".csv", ".parquet")):
        src.setdefault("structure_column", "file")
    return src


def write_formats(folder: Path) -> dict[str, Path]:
    """{format: path} of the same rows (the crystals) in each format."""
    import pandas as pd
    from ase.db import connect
    from matminer.utils.io import store_dataframe_as_json
    from pymatgen.io.ase import AseAtomsAdaptor

    images = crystals()
    files = {"extxyz": folder / "salts.extxyz", "ase-db": folder / "salts.db",
             "csv": folder / "salts.csv", "parquet": folder / "salts.parquet",
             "dataframe-json": folder / "salts.json"}
    write(files["extxyz"], images, format="extxyz")
    with connect(files["ase-db"]) as db:
        for atoms in images:
            info = dict(atoms.info)  # 'id' is the database's own row number
            db.write(atoms, name=info.pop("id"), **info)
    rows = write_cifs(folder, images)
    pd.DataFrame(rows).to_csv(files["csv"], index=False)
    pd.DataFrame(rows).to_parquet(files["parquet"])
    frame = pd.DataFrame({"structure": [AseAtomsAdaptor.get_structure(a) for a in images],
                          "y": [a.info["y"] for a in images],
                          "id": [a.info["id"] for a in images]})
    store_dataframe_as_json(frame, str(files["dataframe-json"]))
    return files


def write_cifs(folder: Path, images: list[Atoms]) -> list[dict]:
    """Each image as folder/cifs/<id>.cif; the table rows: its info plus 'file'."""
    (folder / "cifs").mkdir()
    rows = []
    for atoms in images:
        name = f"cifs/{atoms.info['id']}.cif"
        write(folder / name, atoms, format="cif")
        rows.append({**atoms.info, "file": name})
    return rows
