"""`matxfer predict` reads a structure file as training reads it and builds the same graph:
a molecule stays a molecule (pbc as the file says), with or without a cell."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.io import write

from matxfer.config import SourceConfig
from matxfer.datasets.sources import usable_rows
from matxfer.graphs import GraphSpec
from matxfer.predict import prepare

SPEC = GraphSpec(tuple(range(1, 90)), 6.0, torch.float32)


def benzene(vacuum: float | None) -> Atoms:
    atoms = molecule("C6H6")
    atoms.info.update(id="benzene", y=1.5)
    if vacuum is not None:
        atoms.center(vacuum=vacuum)  # a cell around it, pbc stays False
    assert not any(atoms.pbc)
    return atoms


def edge_set(edge_index, shifts) -> set:
    return {(int(i), int(j), *np.round(np.asarray(s, float), 4)) for (i, j), s in
            zip(np.asarray(edge_index).T, np.asarray(shifts))}


def training_graph(path: Path):
    """The graph training builds of the (one) structure in an extxyz dataset."""
    (row,) = list(usable_rows(SourceConfig(path=str(path), target="y", id_key="id"), []))
    return SPEC.graph(row.structure, row.id)


@pytest.mark.parametrize("vacuum", [3.0, None], ids=["in-a-cell", "without-a-cell"])
def test_a_molecule_gets_the_graph_at_predict_that_it_got_in_training(vacuum, tmp_path):
    path = tmp_path / "benzene.extxyz"
    write(path, benzene(vacuum), format="extxyz")
    _, _, edges, shifts = training_graph(path)
    graphs, errors = prepare([path], SPEC)
    assert errors == []
    assert int(graphs.n_edges[0]) == edges.shape[1]
    assert edge_set(graphs.edge_index, graphs.shifts) == edge_set(edges, shifts)
    assert graphs.formulas == ["HC"]  # pymatgen's reduced formula, as for crystals


def test_a_periodic_extxyz_stays_periodic(tmp_path):
    from ase.build import bulk

    atoms = bulk("NaCl", "rocksalt", a=5.64)
    atoms.info.update(id="nacl", y=0.0)
    path = tmp_path / "nacl.extxyz"
    write(path, atoms, format="extxyz")
    _, _, edges, shifts = training_graph(path)
    graphs, errors = prepare([path], SPEC)
    assert errors == [] and graphs.formulas == ["NaCl"]
    assert edge_set(graphs.edge_index, graphs.shifts) == edge_set(edges, shifts)
    assert np.abs(graphs.shifts.numpy()).max() > 0  # periodic images are neighbours


def test_a_cell_less_molecule_predicts_with_a_checkpoint(tmp_path):
    from matxfer.checkpoint import CHECKPOINT_FILE, build_payload
    from matxfer.config import load_config
    from matxfer.model import TargetScaler, build_model
    from matxfer.predict import predict_files
    from matxfer.storage import save_checked
    from matxfer.tasks import get_task

    cfg = load_config(overrides={"data.task": "matbench_jdft2d", "model.head_hidden": [8]})
    model = build_model(cfg.model)
    scaler = TargetScaler.from_state({"log": False, "classification": False, "mean": 0.0,
                                      "std": 1.0})
    save_checked(build_payload(model, cfg, get_task("matbench_jdft2d"), scaler,
                               model.graph_spec().z_table), tmp_path / "m" / CHECKPOINT_FILE)
    path = tmp_path / "benzene.xyz"
    write(path, benzene(None), format="extxyz")
    table = predict_files(str(tmp_path / "m"), [str(path)])
    assert table["error"].tolist() == [""] and np.isfinite(table["prediction"]).all()


@pytest.mark.parametrize("atoms, needle", [
    (Atoms("H2", positions=[[0, 0, 0], [0.1, 0, 0]]), "overlapping"),
    (Atoms("H2", positions=[[0, 0, 0], [600.0, 0, 0]]), "at most 500"),
], ids=["overlapping", "huge"])
def test_unusable_molecules_are_refused_with_their_reason(atoms, needle, tmp_path):
    path = tmp_path / "m.extxyz"
    write(path, atoms, format="extxyz")
    graphs, errors = prepare([path], SPEC)
    assert graphs is None and needle in errors[0]["error"], errors


class Marker:
    """What a site property may name (`@module`/`@class`): pymatgen's Site.from_dict would
    import the module and call from_dict, here creating the marker file."""

    @classmethod
    def from_dict(cls, d: dict):
        Path(d["marker"]).touch()
        return cls()


def test_a_pymatgen_json_with_encoded_objects_in_its_site_properties_is_not_decoded(tmp_path):
    import json

    from pymatgen.core import Lattice, Structure

    marker = tmp_path / "DECODED"
    nacl = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    tree = nacl.as_dict()
    tree["sites"][0]["properties"] = {"tag": {"@module": __name__, "@class": "Marker",
                                              "marker": str(marker)}}
    path = tmp_path / "nacl.json"
    path.write_text(json.dumps(tree))
    graphs, errors = prepare([path], SPEC)
    assert graphs is None and not marker.exists()
    assert "encoded objects" in errors[0]["error"], errors
    tree["sites"][0]["properties"] = {"magmom": 0.5}  # plain values are read as before
    path.write_text(json.dumps(tree))
    assert prepare([path], SPEC)[1] == []
