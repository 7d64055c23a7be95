"""What the checks need to know of a backbone (weights file, size, blocks, how its graphs are
built), without building a PropertyModel. A MACE model's facts are kept beside the graph
caches, keyed by the SHA-256 of its file: a later plan of the same model neither loads it nor
imports mace (seconds of a study's start-up). They are written only after a run's checks
passed and its data was read (`keep_facts`): a refused command writes nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from matxfer import __version__
from matxfer.graphs import GraphSpec, default_cache_dir
from matxfer.model import block_names, family_of_net, graph_spec, load_backbone, weights_file
from matxfer.storage import atomic_write
from matxfer.tracking import file_sha256

FACTS_FORMAT = 1  # the stored facts' layout; with the matxfer version, part of their check


@dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know of the backbone, without building a PropertyModel."""

    path: Path
    sha256: str
    n_params: int
    n_bytes: int  # float32 training copy, bytes
    n_blocks: int  # model.block_names: freezing, LR decay, drift, layers
    graph: GraphSpec  # element table, cutoff, dtype, kind: how its graphs are built
    family: str  # matxfer.backbones: mace or chgnet


@lru_cache(maxsize=4)
def model_facts(source: str, dtype: str = "float32", cache_dir: str | None = None
                ) -> ModelFacts:
    """Weights file, parameter count, blocks and graph settings of a model.source: stored
    ones for this file's SHA-256 (under `cache_dir`, default the graph cache folder), else
    from the loaded model (`keep_facts` stores them once the run may go ahead)."""
    path = weights_file(source)
    sha = file_sha256(str(path))
    where = facts_file(cache_dir, sha, dtype)
    facts = read_facts(where, path, sha)
    if facts is None:
        backbone = load_backbone(source, dtype=getattr(torch, dtype))
        n_params = sum(p.numel() for p in backbone.parameters())
        facts = ModelFacts(path, sha, n_params, 4 * n_params, len(block_names(backbone)),
                           graph_spec(backbone), family_of_net(backbone).name)
    return facts


def keep_facts(facts: ModelFacts, cache_dir: str | None = None) -> None:
    """Store a model's facts for later plans (unless these very facts are stored already)."""
    where = facts_file(cache_dir, facts.sha256, str(facts.graph.dtype).removeprefix("torch."))
    if read_facts(where, facts.path, facts.sha256) != facts:
        write_facts(where, facts)


def facts_file(cache_dir: str | None, sha256: str, dtype: str) -> Path:
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    return folder / f"model-{sha256[:24]}-{dtype}.json"


def read_facts(where: Path, path: Path, sha256: str) -> ModelFacts | None:
    """Stored facts of this file, or None (none stored, another layout or matxfer version,
    unreadable: the model is loaded instead)."""
    try:
        stored = json.loads(where.read_text())
        if (stored.get("format"), stored.get("matxfer"), stored.get("sha256")) != (
                FACTS_FORMAT, __version__, sha256):
            return None
        graph = GraphSpec(tuple(int(z) for z in stored["z_table"]), float(stored["cutoff"]),
                          getattr(torch, stored["graph_dtype"]))
        return ModelFacts(path, sha256, int(stored["n_params"]), 4 * int(stored["n_params"]),
                          int(stored["n_blocks"]), graph, str(stored["family"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_facts(where: Path, facts: ModelFacts) -> None:
    """Store the facts of a plain neighbour-graph model (MACE); a family whose graphs need
    its own code (CHGNet's `part`) is loaded each time. Atomic; a failure only costs time."""
    graph = facts.graph
    if graph.kind or graph.part is not None:
        return
    record = {"format": FACTS_FORMAT, "matxfer": __version__, "sha256": facts.sha256,
              "n_params": facts.n_params, "n_blocks": facts.n_blocks,
              "z_table": list(graph.z_table), "cutoff": graph.cutoff,
              "graph_dtype": str(graph.dtype).removeprefix("torch."), "family": facts.family}
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(where, lambda fh: fh.write(json.dumps(record).encode()))
    except OSError:
        pass  # not stored: the next plan loads the model again
