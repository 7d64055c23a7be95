"""The small labelled dataset of `own_data`, written once per session in every format."""

from __future__ import annotations

from pathlib import Path

import pytest
from ase.io import write
from own_data import crystals


@pytest.fixture(scope="session")
def dataset_files(tmp_path_factory) -> dict[str, Path]:
    """{format: path} of the same rows (the crystals) in each format."""
    import pandas as pd
    from ase.db import connect
    from matminer.utils.io import store_dataframe_as_json
    from pymatgen.io.ase import AseAtomsAdaptor

    folder = tmp_path_factory.mktemp("own_data")
    images = crystals()
    files = {"extxyz": folder / "salts.extxyz", "ase-db": folder / "salts.db",
             "csv": folder / "salts.csv", "parquet": folder / "salts.parquet",
             "dataframe-json": folder / "salts.json"}
    write(files["extxyz"], images, format="extxyz")
    with connect(files["ase-db"]) as db:
        for atoms in images:
            info = dict(atoms.info)  # 'id' is the database's own row number
            db.write(atoms, name=info.pop("id"), **info)
    (folder / "cifs").mkdir()
    rows = []
    for atoms in images:
        name = f"cifs/{atoms.info['id']}.cif"
        write(folder / name, atoms, format="cif")
        rows.append({**atoms.info, "file": name})
    pd.DataFrame(rows).to_csv(files["csv"], index=False)
    pd.DataFrame(rows).to_parquet(files["parquet"])
    frame = pd.DataFrame({"structure": [AseAtomsAdaptor.get_structure(a) for a in images],
                          "y": [a.info["y"] for a in images],
                          "id": [a.info["id"] for a in images]})
    store_dataframe_as_json(frame, str(files["dataframe-json"]))
    return files
