"""Which Family a model.source or a backbone module belongs to."""

from __future__ import annotations

import torch
from torch import nn

from matxfer.backbones.base import Family
from matxfer.backbones.chgnet import ChgnetFamily, build_chgnet, chgnet_architecture
from matxfer.backbones.mace import MaceFamily
from matxfer.backbones.mace_arch import architecture as mace_architecture
from matxfer.backbones.mace_arch import build_backbone as build_mace
from matxfer.backbones.mace_arch import prebuild as prebuild_mace
from matxfer.backbones.mace_arch import random_backbone as random_mace
from matxfer.backbones.names import family_of

_FAMILIES: dict[str, Family] = {"mace": MaceFamily(), "chgnet": ChgnetFamily()}


def family(source: str) -> Family:
    """The family of a model.source (a MACE name or file, or chgnet[-<version>])."""
    return _FAMILIES[family_of(source)]


def family_of_net(net: nn.Module) -> Family:
    """The family of a loaded backbone module."""
    return _FAMILIES["chgnet" if type(net).__name__ == "CHGNet" else "mace"]


def block_index(name: str) -> int | None:
    """Block of a backbone parameter name in whichever family names it so (the families'
    parameter names are disjoint); None for parameters the property model does not use."""
    for fam in _FAMILIES.values():
        try:
            return fam.block_index(name)
        except ValueError:
            continue
    raise ValueError(f"backbone parameter {name!r} belongs to no block of the backbone")


def load_backbone(source: str, init: str = "pretrained", seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    """The backbone of `source`; init 'random': its random twin (see Family.load)."""
    return family(source).load(source, init, seed, dtype)


def weights_file(source: str):
    """The file whose SHA-256 identifies the pretrained weights of `source`."""
    return family(source).weights_file(source)


def architecture(net: nn.Module) -> dict:
    """{class, dtype, config}: what rebuilds `net` with `build_backbone` (checkpoints)."""
    if family_of_net(net).name == "chgnet":
        return chgnet_architecture(net)
    return mace_architecture(net)


def build_backbone(arch: dict) -> nn.Module:
    """The backbone of a stored architecture; weights come from the checkpoint's state."""
    if arch.get("class") == "CHGNet":
        return build_chgnet(arch)
    return build_mace(arch)


def random_backbone(arch: dict, seed: int, dtype: torch.dtype) -> nn.Module:
    """The seeded random twin of a stored architecture, as `load_backbone(source, 'random',
    seed, dtype)` builds it from the weights file: a checkpoint's θ0 without any file."""
    if arch.get("class") == "CHGNet":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return build_chgnet(arch)
    return _FAMILIES["mace"].freeze_unused(random_mace(arch, seed)).to(dtype)


def prebuild(arch: dict) -> None:
    """Build a stored architecture ahead of its checkpoint's load: MACE's construction takes
    seconds (e3nn's code generation) and is kept per process; CHGNet's takes milliseconds."""
    if arch.get("class") != "CHGNet":
        prebuild_mace(arch)
