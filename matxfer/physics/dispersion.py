"""D3(BJ) dispersion energies of many periodic frames at once, with torch-dftd's parameters.

The same energy as `mace_mp(dispersion=True)`'s `TorchDFTD3Calculator` (Becke-Johnson damping,
PBE parameters, pair and coordination-number cutoff 40 Bohr, no three-body term), computed
without its per-frame pymatgen neighbour list and per-image torch pass. With BJ damping a pair
image's energy is -(s6 C6 / (r^6 + R^6) + s8 C8 / (r^8 + R^8)) / 2, where R depends on the two
elements only and C6, C8 on the two atoms' coordination numbers only: so each frame's lattice
sum is reduced with numpy to per-atom-pair sums of 1/(r^6 + R^6), 1/(r^8 + R^8) and per-atom
coordination numbers, and torch-dftd's own `_getc6` interpolates C6 once per atom pair of all
frames together (not once per image, which is where the calculator spends its time).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from ase.units import Bohr

from matxfer.physics.potential import Frame

CUTOFF = 40.0 * Bohr  # Å, pairs and coordination numbers, as mace_mp(dispersion=True)


class Dispersion:
    """D3(BJ)/PBE energies [eV] of periodic frames, float64, from torch-dftd's tables."""

    def __init__(self) -> None:
        from torch_dftd.functions.dftd3 import d3_autoang, d3_autoev, d3_k1
        from torch_dftd.torch_dftd3_calculator import TorchDFTD3Calculator

        calc = TorchDFTD3Calculator(damping="bj", xc="pbe", cutoff=CUTOFF, dtype=torch.float64)
        module, p = calc.dftd_module, calc.params
        self.c6ab = module.c6ab
        self.rcov = module.rcov.numpy()  # Bohr, as torch-dftd's coordination numbers use
        self.r2r4 = module.r2r4.numpy()
        self.cnthr = module.cnthr / Bohr  # Bohr, compared as torch-dftd does
        self.s6, self.s8, self.a1, self.a2 = p["s6"], p["s18"], p["rs6"], p["rs18"]
        self.autoang, self.autoev, self.k1 = d3_autoang, d3_autoev, d3_k1

    def energies(self, frames: Sequence[Frame]) -> np.ndarray:
        """D3(BJ) energy [eV] of each periodic frame (elements Z <= 94)."""
        from torch_dftd.functions.dftd3 import _getc6

        if not len(frames):
            return np.zeros(0)
        terms = [self._lattice_sums(f) for f in frames]
        z = [f.numbers for f in frames]
        zi = np.concatenate([np.repeat(n, len(n)) for n in z])
        zj = np.concatenate([np.tile(n, len(n)) for n in z])
        ci = np.concatenate([np.repeat(t[2], len(t[2])) for t in terms])
        cj = np.concatenate([np.tile(t[2], len(t[2])) for t in terms])
        t = torch.as_tensor
        c6 = _getc6(t(zi), t(zj), t(ci), t(cj), c6ab=self.c6ab).numpy()
        c8 = 3 * c6 * self.r2r4[zi] * self.r2r4[zj]
        s6 = np.concatenate([a.ravel() for a, _, _ in terms])
        s8 = np.concatenate([b.ravel() for _, b, _ in terms])
        pair = -0.5 * (self.s6 * c6 * s6 + self.s8 * c8 * s8)
        frame_of_pair = np.repeat(np.arange(len(frames)), [len(n) ** 2 for n in z])
        return np.bincount(frame_of_pair, pair, len(frames)) * self.autoev

    def _lattice_sums(self, frame: Frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """([n,n] sum over images of 1/(r^6 + R^6), [n,n] of 1/(r^8 + R^8), Bohr units; [n]
        coordination numbers) of a frame's pair images within the cutoff."""
        numbers = frame.numbers
        r = image_distances(frame, CUTOFF) / self.autoang  # [n, n, S] Bohr, inf beyond
        q = self.r2r4[numbers]
        damp = self.a1 * np.sqrt(3 * q[:, None] * q[None, :]) + self.a2  # [n, n]
        with np.errstate(divide="ignore", over="ignore"):
            s6 = (1 / (r**6 + damp[..., None] ** 6)).sum(-1)
            s8 = (1 / (r**8 + damp[..., None] ** 8)).sum(-1)
            rco = self.rcov[numbers][:, None] + self.rcov[numbers][None, :]
            count = 1 / (1 + np.exp(-self.k1 * (rco[..., None] / r - 1)))
        cn = np.where(r <= self.cnthr, count, 0.0).sum((1, 2))
        return s6, s8, cn


def image_distances(frame: Frame, cutoff: float) -> np.ndarray:
    """[n, n, S] distances Å from atom i to the lattice images of atom j, inf where beyond
    `cutoff` or zero (an atom and itself); S covers every image within the cutoff."""
    cell = frame.cell
    volume = abs(np.linalg.det(cell))
    frac = frame.positions @ np.linalg.inv(cell)
    spread = np.ceil(frac.max(0) - frac.min(0))  # atoms need not lie in the cell
    reach = [int(math.ceil(cutoff * np.linalg.norm(np.cross(cell[(k + 1) % 3],
                                                            cell[(k + 2) % 3])) / volume)
                 + spread[k]) for k in range(3)]
    grid = np.stack(np.meshgrid(*[np.arange(-m, m + 1) for m in reach], indexing="ij"), -1)
    shifts = grid.reshape(-1, 3) @ cell  # [S, 3]
    delta = frame.positions[None, :, :] - frame.positions[:, None, :]  # r_j - r_i
    r = np.linalg.norm(delta[:, :, None, :] + shifts[None, None], axis=-1)
    return np.where((r <= cutoff) & (r > 1e-8), r, np.inf)
