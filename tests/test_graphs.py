import dataclasses

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from matxfer.config import DataConfig
from matxfer.errors import UserError
from matxfer.graphs import (
    GraphSet,
    GraphSpec,
    batch_rows,
    build_graph_set,
    collate,
    epoch_batches,
    iterate_batches,
    load_graph_set,
    prefetched,
    save_graph_set,
    structure_graph,
    task_graphs,
)


def cscl():
    return Structure(Lattice.cubic(3.0), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_unknown_element_names_the_structure_and_the_element(backbone):
    z_table = [int(z) for z in backbone.atomic_numbers]
    po = Structure(Lattice.cubic(3.35), ["Po"], [[0, 0, 0]])  # Z=84 is not in MACE-MP-0
    with pytest.raises(UserError, match="structure mb-test-7: element Po is not among"):
        structure_graph(po, "mb-test-7", z_table, 6.0)


def test_graph_edges_are_the_neighbours_within_the_cutoff():
    species, positions, edge_index, shifts = structure_graph(cscl(), "x", [17, 55], 2.9)
    assert species.tolist() == [1, 0]
    # CsCl type, a = 3 A: each ion has 8 unlike neighbours at 2.598 A, then 6 like ones at 3 A
    assert edge_index.shape[1] == 16
    lengths = np.linalg.norm(positions[edge_index[1]] - positions[edge_index[0]] + shifts, axis=1)
    assert np.allclose(lengths, 3.0 * np.sqrt(3) / 2)


def test_collate_offsets_edges_per_structure():
    gs = build_graph_set(["a", "b"], [cscl(), cscl()], np.array([1.0, 2.0]),
                         GraphSpec((17, 55), 2.9, torch.float64), progress=False)
    batch = collate(gs, [1, 0])
    assert batch["node_attrs"].shape == (4, 2)
    assert batch["ptr"].tolist() == [0, 2, 4]
    assert batch["batch"].tolist() == [0, 0, 1, 1]
    assert batch["edge_index"][:, 16:].min() >= 2  # second structure's edges point at its atoms
    assert batch["y"].tolist() == [2.0, 1.0]


def test_cache_round_trip_is_exact(tmp_path, jdft2d_graphs):
    path = tmp_path / "g.pt"
    save_graph_set(jdft2d_graphs, path)
    again = load_graph_set(path)
    assert again.ids == jdft2d_graphs.ids
    for name in ("positions", "edge_index", "shifts", "species", "n_atoms"):
        assert torch.equal(getattr(again, name), getattr(jdft2d_graphs, name))


def jdft2d_in(cache_dir) -> DataConfig:
    return DataConfig(task="matbench_jdft2d", cache_dir=str(cache_dir))


def test_cache_is_built_once_and_reused(tmp_path, backbone, monkeypatch):
    z = tuple(int(x) for x in backbone.atomic_numbers)
    first = task_graphs(jdft2d_in(tmp_path), GraphSpec(z, 6.0, torch.float32), progress=False)
    files = list(tmp_path.glob("matbench_jdft2d-*.pt"))
    assert len(files) == 1

    def no_loading(*args, **kwargs):
        raise AssertionError("a cached task must not be loaded again")

    monkeypatch.setattr("matxfer.datasets.matbench.load_task", no_loading)
    second = task_graphs(jdft2d_in(tmp_path), GraphSpec(z, 6.0, torch.float32), progress=False)
    assert torch.equal(first.positions, second.positions)
    # another dtype or cutoff is another cache entry
    with pytest.raises(AssertionError, match="must not be loaded"):
        task_graphs(jdft2d_in(tmp_path), GraphSpec(z, 5.0, torch.float32), progress=False)


def test_a_killed_write_leaves_no_cache_file(tmp_path, jdft2d_graphs, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("torch.save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_graph_set(jdft2d_graphs, tmp_path / "g.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_cache_is_rebuilt(tmp_path, backbone):
    spec = GraphSpec(tuple(int(x) for x in backbone.atomic_numbers), 6.0, torch.float32)
    task_graphs(jdft2d_in(tmp_path), spec, progress=False)
    path = next(tmp_path.glob("*.pt"))
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    graphs = task_graphs(jdft2d_in(tmp_path), spec, progress=False)
    assert len(graphs) == 636


def test_ranks_get_disjoint_equal_shares(jdft2d_graphs):
    rows = list(range(50))
    shares = [epoch_batches(jdft2d_graphs, rows, 4, shuffle=True, seed=1, rank=rank,
                            world_size=3) for rank in range(3)]
    assert len({len(b) for b in shares}) == 1  # the same number of steps on every rank
    taken = [[int(r) for b in batches for r in b] for batches in shares]
    assert [len(t) for t in taken] == [16, 16, 16]  # 50 // 3 structures each
    every = sum(taken, [])
    assert len(set(every)) == len(every) == 48 and set(every) <= set(rows)  # disjoint


def _sized(atoms: list[int], edges: list[int]) -> GraphSet:
    """A GraphSet with only the sizes filled in (what batch_rows reads)."""
    n = len(atoms)
    return GraphSet(ids=[str(i) for i in range(n)], targets=np.zeros(n),
                    n_atoms=torch.tensor(atoms), n_edges=torch.tensor(edges),
                    species=torch.zeros(0, dtype=torch.long), positions=torch.zeros(0, 3),
                    edge_index=torch.zeros(2, 0, dtype=torch.long), shifts=torch.zeros(0, 3),
                    z_table=(1,))


def test_batch_budgets_by_hand():
    graphs = _sized([2, 3, 4, 10, 1, 1], [10, 10, 50, 5, 5, 5])
    order = np.arange(6)
    split = lambda **kw: [b.tolist() for b in batch_rows(graphs, order, **kw)]  # noqa: E731
    assert split(batch_size=4) == [[0, 1, 2, 3], [4, 5]]
    assert split(batch_size=4, max_atoms=6) == [[0, 1], [2], [3], [4, 5]]  # 10 alone: too big
    assert split(batch_size=4, max_edges=60) == [[0, 1], [2, 3, 4], [5]]
    assert split(batch_size=2, max_atoms=100, max_edges=100) == [[0, 1], [2, 3], [4, 5]]


def test_budget_batches_split_whole_batches_evenly_over_ranks(jdft2d_graphs):
    rows = list(range(50))
    numbered = dataclasses.replace(jdft2d_graphs, targets=np.arange(len(jdft2d_graphs)))
    per_rank = []
    for rank in range(3):
        batches = list(iterate_batches(numbered, rows, 16, shuffle=True, seed=1, rank=rank,
                                       world_size=3, max_edges=2000))
        assert all(int(b["edge_index"].shape[1]) <= 2000 or b["ptr"].numel() == 2
                   for b in batches)
        per_rank.append(batches)
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) > 1
    seen = [int(y) for b in sum(per_rank, []) for y in b["y"]]  # y is the row here
    assert len(seen) == len(set(seen)) and set(seen) <= set(rows)  # disjoint structures


def test_a_worker_reads_the_cache_its_driver_verified_without_hashing_anything(
        backbone, jdft2d_graphs, monkeypatch):
    """Trials get (cache file, sha256) from the study's driver: neither the cache nor the data
    file is hashed again (that read every page of a memory-mapped cache in every worker);
    a cache changed since the check is refused."""
    from matxfer import storage
    from matxfer.datasets import matbench
    from matxfer.graphs import cache_file
    from matxfer.model import graph_spec

    args = (DataConfig(task="matbench_jdft2d"),
            dataclasses.replace(graph_spec(backbone), dtype=torch.float32))
    path = cache_file(*args)
    verified = (str(path), storage.recorded_sha256(path))
    hashed = []
    monkeypatch.setattr(storage, "sha256_file", lambda p: hashed.append(p) or "")
    monkeypatch.setattr(matbench, "data_source_id", lambda *a: hashed.append(a) or "")
    graphs = task_graphs(*args, progress=False, verified=verified)
    assert len(graphs) == len(jdft2d_graphs) == 636 and hashed == []
    assert torch.equal(graphs.positions, jdft2d_graphs.positions)
    with pytest.raises(storage.CorruptFile, match="changed since it was verified"):
        task_graphs(*args, progress=False, verified=(str(path), "0" * 64))


def test_a_structure_above_the_budget_trains_in_a_batch_of_its_own(jdft2d_graphs):
    """Every structure of a single-rank epoch is in some batch, the oversize ones alone (a
    one-structure batch used to be dropped from shuffled epochs: never trained on)."""
    rows = list(range(60))
    budget = int(jdft2d_graphs.n_atoms[rows].max()) - 1  # the largest structure exceeds it
    batches = epoch_batches(jdft2d_graphs, rows, 8, shuffle=True, seed=5, max_atoms=budget)
    assert sorted(int(r) for b in batches for r in b) == rows
    oversize = [r for r in rows if int(jdft2d_graphs.n_atoms[r]) > budget]
    assert oversize and all([r] in [b.tolist() for b in batches] for r in oversize)


def test_prefetched_batches_are_the_same_batches_in_the_same_order(jdft2d_graphs):
    def batches(prefetch: int) -> list[dict]:
        return list(iterate_batches(jdft2d_graphs, list(range(40)), 8, shuffle=True, seed=3,
                                    prefetch=prefetch))

    plain, ahead = batches(0), batches(2)
    assert len(plain) == len(ahead) == 5
    for a, b in zip(plain, ahead):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prefetch_hands_over_producer_errors_and_stops_when_left_early():
    def numbers():
        yield from range(3)
        raise RuntimeError("bad structure 3")

    seen = []
    with pytest.raises(RuntimeError, match="bad structure 3"):
        for x in prefetched(numbers(), 2):
            seen.append(x)
    assert seen == [0, 1, 2]
    produced = []

    def endless():
        for i in range(10_000):
            produced.append(i)
            yield i

    for x in prefetched(endless(), 2):
        if x == 1:
            break
    assert len(produced) < 10  # the producer stopped soon after the consumer left
