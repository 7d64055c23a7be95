"""The descriptor cache: one file per group of descriptors, keyed by the settings that change
that group's values, shared by every subset a study or trial asks for."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from ase.io import write

from matxfer.config import DataConfig, ModelConfig
from matxfer.physics import cache
from matxfer.physics.config import PhysicsConfig

sys.path.insert(0, str(Path(__file__).parents[1] / "datasets"))
from own_data import crystals  # noqa: E402


@pytest.fixture
def salts(tmp_path):
    path = tmp_path / "salts.extxyz"
    write(path, crystals()[1::3][:4], format="extxyz")  # 4 salts at their own lattice constant
    data = DataConfig(task="salts", source={"path": str(path), "target": "y", "id_key": "id"})
    return data, tmp_path / "salts-0123456789abcdef.pt"  # the graph cache names the data


@pytest.fixture
def computed(monkeypatch):
    """The descriptor lists each computation was asked for."""
    asked: list[list[str]] = []
    real = cache.compute

    def recording(frames, potential, physics, *args, **kwargs):
        asked.append(list(physics.descriptors))
        return real(frames, potential, physics, *args, **kwargs)

    monkeypatch.setattr(cache, "compute", recording)
    return asked


def table(salts, **physics):
    data, graph_file = salts
    cfg = PhysicsConfig(**physics)
    return cache.descriptor_table(data, ModelConfig(physics=cfg), cfg, graph_file, False)


def test_a_subset_or_superset_of_cached_groups_computes_only_the_missing_group(salts,
                                                                               computed):
    first = table(salts, descriptors=["energy_per_atom"])
    both = table(salts, descriptors=["bulk_modulus_eos", "energy_per_atom"])
    assert computed == [["energy_per_atom"], ["bulk_modulus_eos"]]  # whole groups, once each
    again = table(salts, descriptors=["energy_per_atom", "bulk_modulus_eos"])
    assert len(computed) == 2  # both groups from their files, columns in the order asked
    for i, values in first.items():
        assert both[i][1] == values[0] == again[i][0]
        assert both[i][0] == again[i][1] and np.isfinite(both[i][0])
    assert len(list(salts[1].parent.glob("salts-*-physics-*.pt"))) == 2


def test_a_group_is_recomputed_only_when_a_setting_of_its_own_changes(salts, computed):
    table(salts, descriptors=["energy_per_atom", "bulk_modulus_eos"])
    table(salts, descriptors=["energy_per_atom"], eos_strain=0.04, dos_mesh=20)  # not energy's
    assert len(computed) == 1
    table(salts, descriptors=["energy_per_atom", "bulk_modulus_eos"], eos_strain=0.04)
    table(salts, descriptors=["energy_per_atom"], precision="float64")  # every group's
    assert computed[1:] == [["bulk_modulus_eos"], ["energy_per_atom"]]


def test_a_damaged_group_file_is_recomputed(salts, computed):
    table(salts, descriptors=["energy_per_atom"])
    (path,) = salts[1].parent.glob("salts-*-physics-energy-*.pt")
    path.write_bytes(b"not a torch file")
    values = table(salts, descriptors=["energy_per_atom"])
    assert len(computed) == 2 and all(np.isfinite(v).all() for v in values.values())
