"""The pretrained MACE as a batched calculator: energies, forces and stresses of many frames.

Descriptors need many near-copies of each structure (displaced atoms, strained cells). They
share one neighbour list, built once per structure with a skin beyond the model's cutoff: MACE's
radial envelope is exactly zero past r_max, so the extra edges change nothing, and the copies
go through the model together in a few large batches instead of one call each.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from matxfer.backbones.quiet_mace import import_mace


@dataclass
class Frame:
    """One structure: atomic numbers [n], positions [n,3] Å, cell [3,3] Å (rows are lattice
    vectors; zeros when not periodic) and periodicity per direction."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: tuple[bool, bool, bool]

    @property
    def periodic(self) -> bool:
        return all(self.pbc)

    def deformed(self, gradient: np.ndarray) -> Frame:
        """The frame under the deformation gradient [3,3] (x -> gradient @ x): atoms and cell
        move together, fractional coordinates stay."""
        return Frame(self.numbers, self.positions @ gradient.T, self.cell @ gradient.T, self.pbc)


@dataclass
class Edges:
    """A neighbour list: edge_index [2,E] (sender, receiver) and unit_shifts [E,3] (lattice
    translations of each edge's receiver image)."""

    index: np.ndarray
    unit_shifts: np.ndarray


def frame_of(structure) -> Frame:
    """Frame of a pymatgen Structure/Molecule or an ase.Atoms (its own pbc)."""
    from matxfer.graphs import structure_arrays

    numbers, positions, cell, pbc = structure_arrays(structure)
    cell = np.zeros((3, 3)) if cell is None else cell
    return Frame(np.asarray(numbers, dtype=np.int64), positions, np.asarray(cell, float), pbc)


class Potential:
    """Energies [eV], forces [eV/Å] and stresses [eV/Å^3, ASE sign: (1/V) dE/dstrain] of
    frames, evaluated in `dtype` in batches of at most `batch_atoms` atoms."""

    def __init__(self, backbone: nn.Module, batch_atoms: int = 512,
                 dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.model = copy.deepcopy(backbone).to(dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.z_index = {int(z): i for i, z in enumerate(backbone.atomic_numbers)}
        self.r_max = float(backbone.r_max)
        self.batch_atoms = batch_atoms

    def edges(self, frame: Frame, skin: float) -> Edges:
        """Neighbours within r_max + skin (copies moved by less than skin/2 stay exact)."""
        import_mace()
        from mace.data.neighborhood import get_neighborhood

        cell = frame.cell if any(frame.pbc) else None
        index, _, unit_shifts, _ = get_neighborhood(
            positions=frame.positions, cutoff=self.r_max + skin, pbc=frame.pbc, cell=cell)
        return Edges(index, unit_shifts)

    def evaluate(self, items: Sequence[tuple[Frame, Edges]], stress: bool = False, *,
                 forces: bool = True
                 ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray | None]:
        """(energies [B], forces: B arrays [n_b,3] (none when `forces` is False: energies
        alone skip the backward pass), stresses [B,3,3] or None) of the frames."""
        energies, all_forces, stresses = [], [], []
        for chunk in self._chunks(items):
            e, f, s = self._forward(chunk, stress, forces)
            energies.append(e)
            all_forces.extend(f)
            stresses.append(s)
        return (np.concatenate(energies) if energies else np.zeros(0), all_forces,
                np.concatenate(stresses) if stress and stresses else None)

    def _chunks(self, items: Sequence[tuple[Frame, Edges]]):
        chunk, atoms = [], 0
        for item in items:
            n = len(item[0].numbers)
            if chunk and atoms + n > self.batch_atoms:
                yield chunk
                chunk, atoms = [], 0
            chunk.append(item)
            atoms += n
        if chunk:
            yield chunk

    def _forward(self, chunk, stress: bool, forces: bool = True):
        batch = self._collate(chunk)
        grad = forces or stress
        with torch.set_grad_enabled(grad):
            out = self.model(batch, training=False, compute_force=forces,
                             compute_stress=stress)
        ptr = batch["ptr"].tolist()
        f = out["forces"].detach().double().numpy() if forces else None
        forces = [f[ptr[i]:ptr[i + 1]] for i in range(len(chunk))] if forces else []
        s = out["stress"].detach().double().numpy() if stress else None
        return out["energy"].detach().double().numpy(), forces, s

    def _collate(self, chunk) -> dict[str, torch.Tensor]:
        unknown = {int(z) for frame, _ in chunk for z in frame.numbers} - set(self.z_index)
        if unknown:
            raise ValueError(f"elements {sorted(unknown)} are outside the potential")
        n_atoms = [len(frame.numbers) for frame, _ in chunk]
        offsets = np.cumsum([0, *n_atoms])
        species = np.concatenate([[self.z_index[int(z)] for z in f.numbers] for f, _ in chunk])
        batch_of_atom = np.repeat(np.arange(len(chunk)), n_atoms)
        edge_index = np.concatenate([e.index + offsets[i] for i, (_, e) in enumerate(chunk)], 1)
        unit_shifts = np.concatenate([e.unit_shifts for _, e in chunk])
        cells = np.stack([f.cell for f, _ in chunk])
        shifts = np.einsum("ei,eij->ej", unit_shifts, cells[batch_of_atom[edge_index[0]]])
        t = lambda a, dt=self.dtype: torch.as_tensor(np.ascontiguousarray(a), dtype=dt)  # noqa: E731
        return {
            "node_attrs": torch.nn.functional.one_hot(t(species, torch.long),
                                                      len(self.z_index)).to(self.dtype),
            "positions": t(np.concatenate([f.positions for f, _ in chunk])),
            "edge_index": t(edge_index, torch.long), "unit_shifts": t(unit_shifts),
            "shifts": t(shifts), "cell": t(cells.reshape(-1, 3)),
            "batch": t(batch_of_atom, torch.long), "ptr": t(offsets, torch.long),
        }
