"""Structure (pymatgen or ASE) -> neighbour graph; a compact on-disk graph cache; batching.

A task's graphs are stored as flat tensors (positions, species, edges, shifts) plus per-structure
offsets, so a cache of 100k structures is a handful of arrays rather than 100k Python objects.
A backbone needing more than the neighbour graph (CHGNet's bond graph) adds named ragged
`extras`, stored the same way. Batches are dicts of tensors: node_attrs, positions, edge_index,
shifts, batch, ptr (what MACE consumes), plus x_<extra> / n_<extra> per extra.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from matxfer.backbones.quiet_mace import import_mace
from matxfer.config import DataConfig
from matxfer.datasets.loading import source_id, stream_rows, usable_graphs
from matxfer.errors import UserError
from matxfer.storage import load_checked, save_checked, sidecar

CACHE_FORMAT = 2  # 2: targets stored as a tensor (weights-only loadable)
_ARRAYS = ("n_atoms", "n_edges", "species", "positions", "edge_index", "shifts", "targets")


@dataclass(frozen=True)
class GraphSpec:
    """How a backbone's graphs are built: its element table, cutoff (Å) and dtype; for a
    family with more than a neighbour graph, `kind` (part of the cache key) and `part`
    (structure, id -> the `structure_graph` tuple plus a dict of ragged extras)."""

    z_table: tuple[int, ...]
    cutoff: float
    dtype: torch.dtype
    kind: str = ""
    part: Callable | None = None

    def graph(self, structure, mbid: str) -> tuple:
        if self.part is not None:
            return self.part(structure, mbid)
        return structure_graph(structure, mbid, self.z_table, self.cutoff)


@dataclass
class GraphSet:
    """All graphs of a task. Species index the model's element table (z_table)."""

    ids: list[str]
    targets: np.ndarray  # [N] float64, task units
    n_atoms: torch.Tensor  # [N] int64
    n_edges: torch.Tensor  # [N] int64
    species: torch.Tensor  # [sum atoms] int64, index into z_table
    positions: torch.Tensor  # [sum atoms, 3] Å, model dtype
    edge_index: torch.Tensor  # [2, sum edges] int64, local (per-structure) atom indices
    shifts: torch.Tensor  # [sum edges, 3] Å, periodic image shift of each edge
    z_table: tuple[int, ...]
    skipped: list = field(default_factory=list)  # (id, reason) of rows left out
    descriptors: np.ndarray | None = None  # [N, d] matxfer.physics descriptors (not cached)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [sum rows, ...]
    extra_counts: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N] int64

    def __post_init__(self) -> None:
        zero = torch.zeros(1, dtype=torch.long)
        self.atom_start = torch.cat([zero, self.n_atoms.cumsum(0)])
        self.edge_start = torch.cat([zero, self.n_edges.cumsum(0)])
        self.extra_start = {k: torch.cat([zero, c.cumsum(0)]) for k, c in self.extra_counts.items()}
        self.index = {mbid: i for i, mbid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def positions_of(self, ids: Sequence[str]) -> list[int]:
        return [self.index[i] for i in ids]

    def species_of(self, rows: Sequence[int]) -> torch.Tensor:
        """[atoms of `rows`] int64: the species (z_table indices) of those structures."""
        spans = [self.species[self.atom_start[r]:self.atom_start[r + 1]] for r in rows]
        return torch.cat(spans) if spans else self.species[:0]

    def take(self, rows: Sequence[int]) -> GraphSet:
        """The graphs of `rows` (positions, at least one), in that order, as their own set."""
        r, atoms, edges = torch.as_tensor(rows), _spans(self.atom_start, rows), \
            _spans(self.edge_start, rows)
        return GraphSet(
            ids=[self.ids[i] for i in rows], targets=self.targets[r.numpy()],
            n_atoms=self.n_atoms[r], n_edges=self.n_edges[r], species=self.species[atoms],
            positions=self.positions[atoms], edge_index=self.edge_index[:, edges],
            shifts=self.shifts[edges], z_table=self.z_table, skipped=list(self.skipped),
            descriptors=None if self.descriptors is None else self.descriptors[r.numpy()],
            extras={k: v[_spans(self.extra_start[k], rows)] for k, v in self.extras.items()},
            extra_counts={k: c[r] for k, c in self.extra_counts.items()})


def _spans(start: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """The flat indices of `rows`' spans of a ragged array with offsets `start`."""
    return torch.cat([torch.arange(start[i], start[i + 1]) for i in rows])


def present_elements(species: torch.Tensor, z_table: Sequence[int]) -> list[int]:
    """Atomic numbers occurring in `species` ([n_atoms] indices into z_table), sorted."""
    return sorted(int(z_table[i]) for i in torch.unique(species).tolist())


def structure_arrays(structure) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple]:
    """(atomic numbers [n], positions [n,3] Å, cell [3,3] Å or None, pbc) of a pymatgen
    Structure (periodic), a pymatgen Molecule or an ase.Atoms (its own pbc)."""
    if hasattr(structure, "get_atomic_numbers"):  # ase.Atoms
        pbc = tuple(bool(p) for p in structure.pbc)
        cell = np.asarray(structure.cell.array, dtype=float) if any(pbc) else None
        return (np.asarray(structure.numbers), np.asarray(structure.positions, dtype=float),
                cell, pbc)
    numbers = np.asarray(structure.atomic_numbers)
    positions = np.asarray(structure.cart_coords, dtype=float)
    if not hasattr(structure, "lattice"):  # pymatgen Molecule
        return numbers, positions, None, (False, False, False)
    return numbers, positions, np.asarray(structure.lattice.matrix, dtype=float), (True,) * 3


class UnknownElements(UserError):
    """A structure holds elements (atomic numbers) the model's element table lacks."""

    def __init__(self, mbid: str, elements: set[int], n_table: int) -> None:
        super().__init__(f"structure {mbid}: element {_symbols(elements)} is not among the "
                         f"model's {n_table} elements")
        self.elements = elements


def _symbols(numbers) -> str:
    from ase.data import chemical_symbols

    return ", ".join(chemical_symbols[z] for z in sorted(numbers))


def check_elements(numbers: np.ndarray, mbid: str, z_table: Sequence[int]) -> None:
    """UnknownElements naming the structure and the elements the model's table lacks."""
    unknown = {int(z) for z in numbers} - {int(z) for z in z_table}
    if unknown:
        raise UnknownElements(mbid, unknown, len(z_table))


def all_unknown_elements(first: UnknownElements, mbid: str, rest: Iterable,
                         z_table: Sequence[int]) -> UserError:
    """The first structure's error, completed by a scan of the remaining (id, structure, _)
    rows (atomic numbers only): every element the model lacks and the structures holding
    them (the first few by id)."""
    table, ids, missing = {int(z) for z in z_table}, [str(mbid)], set(first.elements)
    for other, structure, _ in rest:
        unknown = {int(z) for z in structure_arrays(structure)[0]} - table
        if unknown:
            ids.append(str(other))
            missing |= unknown
    if len(ids) == 1:
        return first
    shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    return UserError(f"{first}; {len(ids)} structures hold elements the model lacks "
                     f"({_symbols(missing)}): {shown}; use a model with these elements, or "
                     "data.source.skip_bad_rows for your own data")


def structure_graph(structure, mbid: str, z_table: Sequence[int], cutoff: float):
    """Neighbour graph of one structure, periodic along the directions its pbc says.

    Returns (species [n], positions [n,3] Å, edge_index [2,E], shifts [E,3] Å).
    Raises UserError naming the structure and element when the model lacks an element.
    """
    import_mace()
    from mace.data.neighborhood import get_neighborhood

    z_index = {z: i for i, z in enumerate(z_table)}
    numbers, positions, cell, pbc = structure_arrays(structure)
    check_elements(numbers, mbid, z_table)
    edge_index, shifts, _, _ = get_neighborhood(positions=positions, cutoff=cutoff, pbc=pbc,
                                                cell=cell)
    species = np.array([z_index[int(z)] for z in numbers], dtype=np.int64)
    return species, positions, edge_index, shifts


def build_graph_set(
    ids: Sequence[str], structures: Sequence, targets: np.ndarray, spec: GraphSpec,
    progress: bool = True, skip_bad: bool = False,
) -> GraphSet:
    """Build the graphs of every structure, with a progress bar (see `graphs_from_rows`)."""
    return graphs_from_rows(zip(ids, structures, targets), spec, progress, skip_bad,
                            total=len(ids))


def graphs_from_rows(
    rows: Iterable[tuple[str, object, float]], spec: GraphSpec, progress: bool = True,
    skip_bad: bool = False, total: int | None = None,
) -> GraphSet:
    """Graphs of (id, structure, target) rows consumed one at a time: only the graphs' arrays
    are kept, never the structures. With `skip_bad`, a structure the model cannot take (an
    unknown element) is left out and listed in `skipped`."""
    parts, ids, targets, skipped = [], [], [], []
    rows = iter(rows)
    bar = tqdm(rows, unit="struct", desc="building graphs", total=total, disable=not progress)
    for mbid, structure, target in bar:
        try:
            parts.append(spec.graph(structure, mbid))
        except UserError as err:
            if not skip_bad:
                bar.leave = False  # the error is the one line left on the terminal
                bar.close()
                if isinstance(err, UnknownElements):
                    raise all_unknown_elements(err, mbid, rows, spec.z_table) from None
                raise
            skipped.append((str(mbid), str(err).split(": ", 1)[-1]))
            continue
        ids.append(mbid)
        targets.append(target)
    if not ids:
        raise UserError(f"no structure can be used: {skipped[0][0]}: {skipped[0][1]}")
    graphs = graph_set_from_parts(ids, parts, np.asarray(targets, dtype=np.float64),
                                  spec.z_table, spec.dtype)
    graphs.skipped = skipped
    return graphs


def graph_set_from_parts(ids: Sequence[str], parts: list, targets: np.ndarray,
                         z_table: Sequence[int], dtype: torch.dtype) -> GraphSet:
    """Concatenate per-structure `structure_graph` outputs (each with an optional 5th item:
    a dict of ragged extras, name -> array [rows, ...]) into one GraphSet."""
    names = sorted(parts[0][4]) if parts and len(parts[0]) > 4 else []
    extras = {k: torch.from_numpy(np.concatenate([np.asarray(p[4][k]) for p in parts]))
              for k in names}
    counts = {k: torch.tensor([len(p[4][k]) for p in parts], dtype=torch.long) for k in names}
    return GraphSet(
        ids=list(ids),
        targets=np.asarray(targets, dtype=np.float64),
        n_atoms=torch.tensor([len(p[0]) for p in parts], dtype=torch.long),
        n_edges=torch.tensor([p[2].shape[1] for p in parts], dtype=torch.long),
        species=torch.from_numpy(np.concatenate([p[0] for p in parts])),
        positions=torch.from_numpy(np.concatenate([p[1] for p in parts])).to(dtype),
        edge_index=torch.from_numpy(np.concatenate([p[2] for p in parts], axis=1)).long(),
        shifts=torch.from_numpy(np.concatenate([p[3] for p in parts])).to(dtype),
        z_table=tuple(int(z) for z in z_table),
        extras={k: v.to(dtype) if v.is_floating_point() else v for k, v in extras.items()},
        extra_counts=counts,
    )


VerifiedCache = tuple[str, str]  # (graph cache file, its sha256), checked by the driver


def cache_key(task: str, spec: GraphSpec, source: str = "") -> str:
    """Stable key of a graph cache: (task, cutoff, dtype, element table, graph kind, data
    source, format); a plain neighbour graph keeps the key it had before kinds existed."""
    fields = {"task": task, "cutoff": round(float(spec.cutoff), 6), "dtype": str(spec.dtype),
              "z_table": [int(z) for z in spec.z_table], "source": source,
              "format": CACHE_FORMAT}
    if spec.kind:
        fields["kind"] = spec.kind
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    if os.environ.get("MATXFER_CACHE"):
        return Path(os.environ["MATXFER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "matxfer" / "graphs"


def save_graph_set(graphs: GraphSet, path: Path) -> None:
    """Write atomically with a checksum: a killed writer leaves no partial file under the
    final name, and a later bit flip is caught on load. Tensors and plain values only (targets
    as a float64 tensor), so the cache loads weights-only like every checked file."""
    payload = {name: getattr(graphs, name) for name in _ARRAYS}
    payload["targets"] = torch.as_tensor(np.asarray(graphs.targets, dtype=np.float64))
    payload.update(ids=[str(i) for i in graphs.ids], z_table=[int(z) for z in graphs.z_table],
                   format=CACHE_FORMAT)
    if graphs.skipped:
        payload["skipped"] = [list(s) for s in graphs.skipped]
    if graphs.extras:
        payload.update(extras=graphs.extras, extra_counts=graphs.extra_counts)
    save_checked(payload, path)


def load_graph_set(path: Path, verified_sha256: str | None = None) -> GraphSet:
    """Memory-mapped: tensor pages are read on demand and shared by every process on the node
    (trials, DDP workers) through the page cache; only ids and offsets live in each process.
    With `verified_sha256` (what the study's driver verified) the file is not hashed again:
    hashing reads every page, which is what memory-mapping avoids."""
    payload = load_checked(path, verified_sha256, mmap=True)
    if payload.get("format") != CACHE_FORMAT:
        raise ValueError(f"graph cache {path} has format {payload.get('format')}")
    arrays = {name: payload[name] for name in _ARRAYS}
    arrays["targets"] = arrays["targets"].numpy()
    return GraphSet(ids=payload["ids"], z_table=tuple(payload["z_table"]), **arrays,
                    skipped=[tuple(s) for s in payload.get("skipped", [])],
                    extras=payload.get("extras", {}),
                    extra_counts=payload.get("extra_counts", {}))


def cache_file(data: DataConfig, spec: GraphSpec) -> Path:
    """Where the graph cache of this dataset and these graphs lives (hashes the data). It
    holds structures -> graphs only: no setting that picks a study's rows is in its key."""
    folder = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    source = source_id(data)
    if data.source is not None:
        source += "|rows=readable"  # a new key: earlier caches held one study's rows
    return folder / f"{data.task}-{cache_key(data.task, spec, source)}.pt"


def task_graphs(
    data: DataConfig, spec: GraphSpec, progress: bool = True,
    verified: VerifiedCache | None = None,
    check: Callable[[GraphSet], None] | None = None,
) -> GraphSet:
    """The graphs of the rows this study uses: the dataset's graph cache (every row with a
    readable structure and target), loaded or built once, narrowed by `usable_graphs` (the
    study's kind, log_target, fold labels, skip_bad_rows). `verified`: (cache file, sha256)
    the study's driver checked; read as it is. `check`: run on newly built graphs before
    they are cached (a UserError there, or from `usable_graphs`, leaves no cache file)."""
    if verified is not None:
        return usable_graphs(data, load_graph_set(Path(verified[0]), verified[1]))
    path = cache_file(data, spec)
    if path.is_file():
        try:
            cached = load_graph_set(path)
        except Exception as err:  # unreadable or corrupted cache: rebuild it below
            warnings.warn(f"rebuilding the graph cache: {err}", stacklevel=2)
            path.unlink(missing_ok=True)
            sidecar(path).unlink(missing_ok=True)
        else:
            return usable_graphs(data, cached)
    skipped: list = []
    skip = data.source is not None and data.source.skip_bad_rows
    graphs = graphs_from_rows(stream_rows(data, skipped), spec, progress, skip,
                              total=data.spec.size or None)
    graphs.skipped = skipped + graphs.skipped
    usable = usable_graphs(data, graphs)
    if check is not None:
        check(usable)
    try:
        save_graph_set(graphs, path)
    except OSError as err:
        raise UserError(f"cannot write graph cache in {str(path.parent)!r}: "
                        f"{err.strerror}") from None
    return usable


def collate(graphs: GraphSet, rows: Sequence[int], device: torch.device | str = "cpu") -> dict:
    """A batch of structures (row positions in `graphs`) as MACE's input dict.

    Keys: node_attrs [n, n_elements] one-hot, positions [n,3], edge_index [2,E] (global),
    shifts [E,3], batch [n], ptr [B+1], y [B] (task units, float64); phys [B,d] (float64,
    NaN where a descriptor failed) when the graphs carry descriptors; per extra, x_<name>
    [sum rows, ...] (the rows' spans, local indices as stored) and n_<name> [B].
    """
    rows_t = torch.as_tensor(rows, dtype=torch.long)
    na, ne = graphs.n_atoms[rows_t], graphs.n_edges[rows_t]
    atom_idx = torch.cat([torch.arange(graphs.atom_start[r], graphs.atom_start[r + 1])
                          for r in rows])
    edge_idx = torch.cat([torch.arange(graphs.edge_start[r], graphs.edge_start[r + 1])
                          for r in rows])
    atom_offset = torch.cat([torch.zeros(1, dtype=torch.long), na.cumsum(0)[:-1]])
    edge_index = graphs.edge_index[:, edge_idx] + atom_offset.repeat_interleave(ne)
    species = graphs.species[atom_idx]
    node_attrs = torch.nn.functional.one_hot(species, len(graphs.z_table))
    batch = {
        "node_attrs": node_attrs.to(graphs.positions.dtype),
        "positions": graphs.positions[atom_idx],
        "edge_index": edge_index,
        "shifts": graphs.shifts[edge_idx],
        "batch": torch.arange(len(rows)).repeat_interleave(na),
        "ptr": torch.cat([torch.zeros(1, dtype=torch.long), na.cumsum(0)]),
        "y": torch.as_tensor(graphs.targets[rows_t.numpy()]),
    }
    if graphs.descriptors is not None:
        batch["phys"] = torch.as_tensor(graphs.descriptors[rows_t.numpy()])
    for name, flat in graphs.extras.items():
        start = graphs.extra_start[name]
        spans = [torch.arange(start[r], start[r + 1]) for r in rows]
        batch[f"x_{name}"] = flat[torch.cat(spans)]
        batch[f"n_{name}"] = graphs.extra_counts[name][rows_t]
    return to_device(batch, device)


def to_device(batch: dict, device: torch.device | str, pin: bool = False) -> dict:
    """Move a batch; with `pin` on CUDA through pinned host memory with non-blocking copies
    (the copy then overlaps the device's work instead of stalling the host)."""
    device = torch.device(device)
    if device.type == "cpu":
        return batch
    if pin and device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


_DONE = object()


def prefetched(batches: Iterator[dict], depth: int) -> Iterator[dict]:
    """Yield from `batches` while a background thread builds up to `depth` of them ahead
    (collation is numpy/torch work that releases the GIL, so it overlaps the training step).
    Same items, same order; an exception in the producer is raised here."""
    if depth <= 0:
        yield from batches
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(_DONE)
        except BaseException as err:  # handed to the consumer
            ready.put(err)

    thread = threading.Thread(target=produce, name="matxfer-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # the consumer stopped early (break, error): let the producer finish
        stop.set()
        thread.join()


def batch_rows(graphs: GraphSet, order: np.ndarray, batch_size: int,
               max_atoms: int | None = None, max_edges: int | None = None) -> list[np.ndarray]:
    """Split `order` (row positions) into consecutive batches of at most `batch_size` structures
    and, when given, at most `max_atoms` atoms and `max_edges` edges (a structure larger than a
    budget gets a batch of its own): a budget bounds memory and evens out the cost of steps."""
    if max_atoms is None and max_edges is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    atoms, edges = graphs.n_atoms[order].tolist(), graphs.n_edges[order].tolist()
    limit_atoms, limit_edges = max_atoms or float("inf"), max_edges or float("inf")
    batches, start, n_atoms, n_edges = [], 0, 0, 0
    for i, (a, e) in enumerate(zip(atoms, edges)):
        if i > start and (i - start == batch_size or n_atoms + a > limit_atoms
                          or n_edges + e > limit_edges):
            batches.append(order[start:i])
            start, n_atoms, n_edges = i, 0, 0
        n_atoms, n_edges = n_atoms + a, n_edges + e
    if start < len(order):
        batches.append(order[start:])
    return batches


def epoch_batches(
    graphs: GraphSet, rows: Sequence[int], batch_size: int, shuffle: bool = False,
    seed: int = 0, rank: int = 0, world_size: int = 1, max_atoms: int | None = None,
    max_edges: int | None = None,
) -> list[np.ndarray]:
    """This rank's batches (row positions) of one pass over `rows` (see `batch_rows` for the
    budgets). Every rank gets the same number of disjoint batches, so DDP ranks step in
    lockstep; every batch is kept, a structure above a budget in a batch of its own.

    Shuffling is seeded (pass seed + epoch for a new order each epoch); under DDP every rank
    draws the same permutation: without budgets each rank takes its stride of structures, as
    DistributedSampler does; with budgets, its stride of whole batches. Either way the
    remainder (fewer than one per rank) waits for another epoch's order.
    """
    order = np.asarray(rows)
    if shuffle:
        order = order[np.random.default_rng(seed).permutation(len(order))]
    budget = max_atoms is not None or max_edges is not None
    if world_size > 1 and not budget:
        per_rank = len(order) // world_size
        order = order[rank : per_rank * world_size : world_size]
    chunks = batch_rows(graphs, order, batch_size, max_atoms, max_edges)
    if world_size > 1 and budget:
        chunks = chunks[rank : len(chunks) // world_size * world_size : world_size]
    return chunks


def iterate_batches(
    graphs: GraphSet, rows: Sequence[int], batch_size: int, shuffle: bool = False,
    seed: int = 0, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
    max_atoms: int | None = None, max_edges: int | None = None, prefetch: int = 0,
) -> Iterator[dict]:
    """Collated batches of `epoch_batches` on `device`; `prefetch` > 0 builds that many ahead
    in a background thread (see `prefetched`)."""
    chunks = epoch_batches(graphs, rows, batch_size, shuffle, seed, rank, world_size,
                           max_atoms, max_edges)
    built = (to_device(collate(graphs, c.tolist()), device, pin=prefetch > 0) for c in chunks)
    return prefetched(built, prefetch)
