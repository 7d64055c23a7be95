"""The CHGNet family: CHGNet's pretrained weights from the installed `chgnet` wheel.

CHGNet (Deng et al. 2023) passes messages on an atom graph (directed bonds within 6 Å) and a
bond graph (pairs of bonds within 3 Å sharing an atom: angles). Its graphs are built once per
dataset by CHGNet's own converter and cached as matxfer graph extras; a batch is turned back
into CHGNet's CrystalGraph objects and run through CHGNet's own forward, with the atom features
after each atom-convolution layer taken by forward hooks.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from matxfer.backbones.base import Family
from matxfer.backbones.names import chgnet_version
from matxfer.errors import UserError
from matxfer.graphs import GraphSpec, check_elements

Z_TABLE = tuple(range(1, 95))  # CHGNet embeds elements H..Pu (atomic number - 1)
_EXTRAS = ("frac", "lattice", "image", "d2u", "u2d", "bond_graph")


@functools.lru_cache(maxsize=4)
def _converter(atom_cutoff: float, bond_cutoff: float, algorithm: str):
    from chgnet.graph import CrystalGraphConverter

    with contextlib.redirect_stdout(io.StringIO()):
        return CrystalGraphConverter(atom_graph_cutoff=atom_cutoff,
                                     bond_graph_cutoff=bond_cutoff, algorithm=algorithm)


def _pymatgen(structure, mbid: str):
    if hasattr(structure, "get_atomic_numbers"):  # ase.Atoms
        if not all(structure.pbc):
            raise UserError(f"structure {mbid}: CHGNet needs a periodic cell (pbc on all axes)")
        from pymatgen.io.ase import AseAtomsAdaptor

        return AseAtomsAdaptor.get_structure(structure)
    if not hasattr(structure, "lattice"):
        raise UserError(f"structure {mbid}: CHGNet needs a periodic structure, not a molecule")
    return structure


def chgnet_part(structure, mbid: str, atom_cutoff: float, bond_cutoff: float,
                algorithm: str) -> tuple:
    """CHGNet's crystal graph of one structure as a `structure_graph` tuple (species [n] =
    Z - 1, Cartesian positions [n,3] Å, atom graph [2,E], shifts [E,3] Å) plus its extras."""
    structure = _pymatgen(structure, mbid)
    numbers = np.asarray(structure.atomic_numbers)
    check_elements(numbers, mbid, Z_TABLE)
    with torch.no_grad():
        g = _converter(atom_cutoff, bond_cutoff, algorithm)(structure, graph_id=str(mbid))
    lattice = g.lattice.detach().numpy()
    image = g.neighbor_image.numpy()
    extras = {"frac": g.atom_frac_coord.detach().numpy(), "lattice": lattice[None],
              "image": image, "d2u": g.directed2undirected.numpy().astype(np.int64),
              "u2d": g.undirected2directed.numpy().astype(np.int64),
              "bond_graph": g.bond_graph.numpy().reshape(-1, 5).astype(np.int64)}
    edges = g.atom_graph.numpy().reshape(-1, 2).T.astype(np.int64)
    return (numbers.astype(np.int64) - 1, np.asarray(structure.cart_coords), edges,
            image @ lattice, extras)


def crystal_graphs(batch: dict) -> list:
    """The batch (collated GraphSet rows with CHGNet extras) as CHGNet CrystalGraph objects."""
    from chgnet.graph import CrystalGraph

    counts = {k: batch[f"n_{k}"].tolist() for k in _EXTRAS}
    parts = {k: torch.split(batch[f"x_{k}"], counts[k]) for k in _EXTRAS}
    n_atoms = (batch["ptr"][1:] - batch["ptr"][:-1]).tolist()
    numbers = torch.split(batch["node_attrs"].argmax(-1) + 1, n_atoms)
    edges = torch.split(batch["edge_index"].T, counts["d2u"])
    graphs, offset = [], 0
    for i, n in enumerate(n_atoms):
        graphs.append(CrystalGraph(
            atomic_number=numbers[i].int(), atom_frac_coord=parts["frac"][i].float(),
            atom_graph=(edges[i] - offset).int(), atom_graph_cutoff=0.0,
            neighbor_image=parts["image"][i].float(), directed2undirected=parts["d2u"][i],
            undirected2directed=parts["u2d"][i], bond_graph=parts["bond_graph"][i],
            bond_graph_cutoff=0.0, lattice=parts["lattice"][i][0].float()))
        offset += n
    return graphs


def weights_file(version: str) -> Path:
    """The pretrained checkpoint of a CHGNet version inside the installed wheel."""
    import chgnet

    found = sorted((Path(chgnet.__file__).parent / "pretrained" / version).glob("*.pth.tar"))
    if not found:
        raise UserError(f"the installed chgnet has no pretrained weights {version!r}; "
                        "pip install chgnet")
    return found[0]


class ChgnetFamily(Family):
    """Block 0: the atom, bond and angle embeddings and bases; block i + 1: message-passing
    step i (atom convolution i, then the bond and angle updates that feed step i + 1)."""

    name = "chgnet"
    embedding_params = re.compile(r"^(?:atom_embedding|bond_basis_expansion|bond_embedding|"
                                  r"bond_weights_ag|bond_weights_bg|angle_basis_expansion|"
                                  r"angle_embedding)\.")
    layer_params = re.compile(r"^(?:atom_conv_layers|bond_conv_layers|angle_layers)\.(\d+)\.")
    unused_params = re.compile(r"^(?:composition_model|site_wise|readout_norm|mlp|pooling)\.")

    def weights_file(self, source: str) -> Path:
        return weights_file(chgnet_version(source))

    def load(self, source: str, init: str = "pretrained", seed: int = 0,
             dtype: torch.dtype = torch.float32) -> nn.Module:
        if dtype != torch.float32:
            raise UserError(f"model.dtype {dtype} is not supported by the chgnet backbone: "
                            "float32 only")
        from chgnet.model import CHGNet

        version = chgnet_version(source)
        with contextlib.redirect_stdout(io.StringIO()):
            net = CHGNet.load(model_name=version, use_device="cpu", verbose=False)
            if init == "random":
                with torch.random.fork_rng():
                    torch.manual_seed(seed)
                    net = CHGNet(**net.model_args)
        return self.freeze_unused(net)

    def graph_spec(self, net: nn.Module) -> GraphSpec:
        args = net.model_args
        cut, bond, algo = (float(args["atom_graph_cutoff"]), float(args["bond_graph_cutoff"]),
                           str(args.get("graph_converter_algorithm", "fast")))
        return GraphSpec(Z_TABLE, cut, torch.float32, kind=f"chgnet:{cut:g}/{bond:g}/{algo}",
                         part=functools.partial(chgnet_part, atom_cutoff=cut,
                                                bond_cutoff=bond, algorithm=algo))

    def n_layers(self, net: nn.Module) -> int:
        return len(net.atom_conv_layers)

    def layer_widths(self, net: nn.Module) -> list[int]:
        return [int(net.model_args["atom_fea_dim"])] * len(net.atom_conv_layers)

    def layer_features(self, net: nn.Module, batch: dict) -> list[torch.Tensor]:
        feats: list[torch.Tensor] = []
        hooks = [layer.register_forward_hook(lambda _m, _i, out: feats.append(out))
                 for layer in net.atom_conv_layers]
        try:
            net(crystal_graphs(batch), task="e")
        finally:
            for hook in hooks:
                hook.remove()
        return feats

    def embedding_features(self, net: nn.Module, batch: dict) -> torch.Tensor:
        return net.atom_embedding(batch["node_attrs"].argmax(-1))


def chgnet_architecture(net: nn.Module) -> dict:
    """{class, dtype, config}: CHGNet's own constructor arguments (model_args)."""
    return {"class": "CHGNet", "dtype": "float32", "config": dict(net.model_args)}


def build_chgnet(arch: dict) -> nn.Module:
    """A CHGNet of the stored architecture (its weights come from the checkpoint's state)."""
    from chgnet.model import CHGNet

    with contextlib.redirect_stdout(io.StringIO()), torch.random.fork_rng():
        net = CHGNet(**arch["config"])
    return ChgnetFamily().freeze_unused(net)
