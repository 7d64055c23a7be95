"""`matxfer analyze drift`: how far a fine-tuned model moved from its starting weights."""

from __future__ import annotations

from pathlib import Path

import torch

from matxfer.analysis.drift import (
    element_drift,
    element_rows,
    group_drift,
    linear_cka,
    module_group,
)
from matxfer.analysis.features import pooled_features
from matxfer.analysis.figures import drift_bars
from matxfer.checkpoint import CHECKPOINT_FILE, load_checkpoint, starting_model
from matxfer.config import RunConfig, derive
from matxfer.datasets.loading import fold_split
from matxfer.datasets.matbench import subset_ids
from matxfer.datasets.sources import source_format
from matxfer.errors import UserError
from matxfer.graphs import GraphSet, task_graphs
from matxfer.model import PropertyModel
from matxfer.storage import SIDECAR
from matxfer.strategies import block_of


def mace_element_rows(model: PropertyModel):
    """rows_of(name, tensor) -> [n_elements, -1] for MACE's per-element weights, else None:
    symmetric contractions (element axis first), the one-hot embedding (element-major flat) and
    the skip tensor product with the one-hot node attributes (element axis = input 2)."""
    n = len(model.graph_spec().z_table)

    def rows_of(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        rows = element_rows(tensor, n)
        if rows is not None:
            return rows
        if name.endswith("node_embedding.linear.weight"):
            return tensor.reshape(n, -1)
        if name.endswith("skip_tp.weight"):
            module = model.get_submodule(name.removesuffix(".weight"))
            views = [v.transpose(0, 1).reshape(n, -1) for v in module.weight_views(tensor)]
            return torch.cat(views, dim=1)
        return None

    return rows_of


def checkpoint_from_run(run_id: str, tracking_uri: str | None, into: Path) -> Path:
    """Download the run's checkpoint: `best_model/` of a fold's parent run or
    `best_checkpoint/` of a trial's child run."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from matxfer.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    try:
        names = {a.path for a in client.list_artifacts(run_id)}
    except MlflowException as err:
        raise UserError(f"--run {run_id!r}: {err.message.splitlines()[0]}") from None
    folder = next((f for f in ("best_model", "best_checkpoint") if f in names), None)
    if folder is None:
        raise UserError(f"--run {run_id!r} holds no best_model/ or best_checkpoint/ artifact")
    stored = {a.path for a in client.list_artifacts(run_id, folder)}
    for name in (CHECKPOINT_FILE + SIDECAR, CHECKPOINT_FILE):  # the checksum travels along
        if f"{folder}/{name}" in stored:
            path = Path(client.download_artifacts(run_id, f"{folder}/{name}", str(into)))
    return path


def trained_species(graphs: GraphSet, cfg: RunConfig) -> list[int]:
    """Species (z_table indices) of the structures the run trained on: its fold's training
    split (validation and test structures excluded; max_structures applied)."""
    split = fold_split(cfg.data, graphs)
    species = graphs.species_of(graphs.positions_of(split.train))
    return sorted(int(s) for s in torch.unique(species))


def received_data(cfg: RunConfig, data: str | None) -> RunConfig:
    """`cfg` reading your data from `data` (--data) when given. Without it, a checkpoint's own
    data path is read only in formats that hold no objects: a DataFrame JSON's reader imports
    and instantiates the classes it names (MontyDecoder), so that file must be named by you."""
    source = cfg.data.source
    if source is None:
        if data is not None:
            raise UserError("--data applies to a checkpoint of your own data; this one was "
                            f"trained on Matbench's {cfg.data.task}")
        return cfg
    if data is not None:
        return derive(cfg, {"data.source.path": data})
    if source_format(source) == "dataframe-json":
        raise UserError(f"the checkpoint's data {Path(source.path).name!r} is a DataFrame JSON, "
                        "whose reader instantiates the objects it names; pass your copy of "
                        "that file with --data PATH")
    return cfg


def analyze_drift(checkpoint: Path, max_structures: int = 500, batch_size: int = 64,
                  foundation: str | None = None, data: str | None = None) -> dict:
    """Drift per module group, per-element drift over the task's elements, and per-layer CKA of
    pooled features before/after fine-tuning on (a seeded subset of) the fold's training set.
    θ0 is never loaded from a file the checkpoint names: the random twin comes from its stored
    architecture, pretrained weights from a known name or `foundation` (the user's
    --foundation), verified against the checkpoint's SHA-256 first."""
    tuned, _, cfg, payload = load_checkpoint(checkpoint)  # weights-only, self-contained
    cfg = received_data(cfg, data)
    start = starting_model(payload, cfg.model, foundation)  # the same seeded start + head
    names = [n for n, p in start.named_parameters() if p.requires_grad]
    state, state0 = tuned.state_dict(), start.state_dict()
    z_table = start.graph_spec().z_table
    graphs = task_graphs(cfg.data, start.graph_spec(), progress=False)
    present = trained_species(graphs, cfg)
    split = fold_split(cfg.data, graphs)
    train_ids = split.train + split.val  # the outer fold's training part
    keep = subset_ids(train_ids, max_structures) or set(train_ids)
    rows = graphs.positions_of([i for i in train_ids if i in keep])
    before = pooled_features(start, graphs, rows, batch_size)
    after = pooled_features(tuned, graphs, rows, batch_size)
    groups = group_drift(state, state0, names)
    frozen = sorted({module_group(n) for n in names
                     if (block_of(n) is not None and block_of(n) < cfg.strategy.freeze_blocks)})
    per_element = element_drift(state, state0, names, mace_element_rows(start), present)
    result = {
        "task": cfg.data.task, "fold": cfg.data.fold, "init": cfg.model.init,
        "l2sp": cfg.regularizers.l2sp, "bss": cfg.regularizers.bss,
        "drift": groups, "element_drift": per_element,
        "frozen_groups": frozen,  # strategy.freeze_blocks: unchanged by construction
        "elements_present": [int(z_table[i]) for i in present],
        "cka": {layer: linear_cka(before[layer], after[layer]) for layer in before},
        "cka_structures": len(rows),
    }
    title = f"{cfg.data.task} fold {cfg.data.fold} ({cfg.model.init})"
    return {"result": result, "png": drift_bars(groups, per_element, title)}


def drift_outputs(result: dict) -> dict:
    return {"drift.json": result["result"], "drift.png": result["png"]}


def describe(result: dict) -> str:
    """A short text summary for the terminal."""
    r = result["result"]
    lines = [f"{r['task']} fold {r['fold']} ({r['init']}): relative drift ‖θ−θ0‖/‖θ0‖"]
    for group, value in r["drift"].items():
        extra = r["element_drift"].get(group)
        extra_text = f"   elements in task: {extra:.4g}" if extra is not None else ""
        if group in r.get("frozen_groups", []):
            extra_text = "   frozen: unchanged by construction"
        lines.append(f"  {group:16s} {value:.4g}{extra_text}")
    lines.append("  linear CKA before/after: " + ", ".join(
        f"{k} {v:.3f}" for k, v in r["cka"].items()))
    return "\n".join(lines)

