"""What a backbone gives the rest of matxfer: one interface, implemented per family.

A backbone is the family's own nn.Module (MACE's ScaleShiftMACE, CHGNet's CHGNet), so its state
dict, checkpoints and parameter names are the family's; a Family is the stateless knowledge
about it that matxfer needs:

- graphs: the GraphSpec (element table, cutoff, dtype, graph kind) its inputs are built with;
- features: per-layer invariant node features [n_atoms, d_l], from the family's own forward;
- blocks: ordered names, bottom to top (freezing, layer-wise LR decay, weight drift and the MI
  layers use this one definition), and the block of every parameter (None: unused by the
  property model, e.g. the energy readout, which is frozen);
- loading: pretrained weights by name or file, the random twin (same architecture, fresh
  weights), the weights file whose SHA-256 identifies it in checkpoints and fingerprints.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from matxfer.graphs import GraphSpec


class Family(ABC):
    """The interface; see the module docstring. `name` is 'mace' or 'chgnet'. A family names
    its parameters' blocks with three patterns: `embedding_params` (block 0),
    `layer_params` (group 1: the message-passing layer i, block i + 1) and `unused_params`
    (the energy head: no block, frozen)."""

    name: str
    embedding_params: re.Pattern
    layer_params: re.Pattern
    unused_params: re.Pattern

    @abstractmethod
    def weights_file(self, source: str) -> Path:
        """The file holding the pretrained weights of `source` (UserError if there is none)."""

    @abstractmethod
    def load(self, source: str, init: str = "pretrained", seed: int = 0,
             dtype: torch.dtype = torch.float32) -> nn.Module:
        """The backbone; init 'random' gives the same architecture freshly initialised (seeded).
        Parameters the property model does not use are frozen."""

    @abstractmethod
    def graph_spec(self, net: nn.Module) -> GraphSpec:
        """How this backbone's input graphs are built and cached."""

    @abstractmethod
    def n_layers(self, net: nn.Module) -> int:
        """Number of message-passing layers."""

    def block_names(self, net: nn.Module) -> list[str]:
        """Blocks bottom to top: 'embedding', then one name per message-passing layer."""
        return ["embedding"] + [f"interaction_{i}" for i in range(self.n_layers(net))]

    def block_index(self, name: str) -> int | None:
        """Block (index into block_names) of a parameter name; None for unused parameters.
        A name in no block raises ValueError (an unknown layout must not be filed silently)."""
        if self.embedding_params.match(name):
            return 0
        layer = self.layer_params.match(name)
        if layer:
            return int(layer.group(1)) + 1
        if self.unused_params.match(name):
            return None
        raise ValueError(f"backbone parameter {name!r} belongs to no block of the backbone")

    def freeze_unused(self, net: nn.Module) -> nn.Module:
        """Freeze the parameters in no block (the energy head gets no gradient from ours)."""
        for name, p in net.named_parameters():
            if self.block_index(name) is None:
                p.requires_grad_(False)
        return net

    @abstractmethod
    def layer_widths(self, net: nn.Module) -> list[int]:
        """Width d_l of the invariant node features after each message-passing layer."""

    @abstractmethod
    def layer_features(self, net: nn.Module, batch: dict) -> list[torch.Tensor]:
        """Per message-passing layer, invariant node features [n_atoms, d_l] of a batch."""

    def embedding_features(self, net: nn.Module, batch: dict) -> torch.Tensor:
        """Invariant node features of the element embedding [n_atoms, d_0] (MI's layer 0)."""
        raise NotImplementedError

    def element_table(self, net: nn.Module) -> tuple[int, ...]:
        """Atomic numbers the backbone knows (its GraphSpec's z_table)."""
        return self.graph_spec(net).z_table

    def n_parameters(self, net: nn.Module) -> int:
        """Parameters the property model trains (the energy readout excluded)."""
        return sum(p.numel() for n, p in net.named_parameters()
                   if self.block_index(n) is not None)
