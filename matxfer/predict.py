"""Fine-tuned model(s) -> predictions for new structures (CIF, POSCAR, extxyz, pymatgen JSON).

`--model` is a checkpoint file or folder, a registered model with an alias (`name@fold0`, the
newest study's model of fold 0; `name@fold0-<fingerprint>`, one study's), a registered model
with a study's fingerprint (`name@<fingerprint>`: every fold that study registered), or a
registered model name alone: then every `fold<k>` alias is loaded, provided they all point at
one study's models, and the ensemble's mean and standard deviation are reported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from matxfer.checkpoint import CHECKPOINT_FILE, load_checkpoint, trusted_model_config
from matxfer.config import RunConfig, derive
from matxfer.errors import UserError
from matxfer.graphs import GraphSet, GraphSpec, collate, graph_set_from_parts, structure_arrays
from matxfer.model import PropertyModel, TargetScaler
from matxfer.physics.cache import compute, potential_of
from matxfer.physics.potential import frame_of

__all__ = ["CHECKPOINT_FILE", "Predictor", "load_predictor", "predict_files"]


@dataclass
class Predictor:
    model: PropertyModel
    scaler: TargetScaler
    cfg: RunConfig
    task: str


def load_predictor(path: Path, foundation: str | None = None) -> Predictor:
    """A fine-tuned PropertyModel from a matxfer checkpoint file (or a folder holding one):
    loaded weights-only and rebuilt from its stored architecture, so neither the foundation
    weights nor the training data are needed. Always on e3nn, whatever kernels trained it.
    With physics, its descriptors need the very foundation it was trained with: found only by
    a known name or as `foundation` (the user's --foundation), and verified against the
    checkpoint's SHA-256 before it is loaded (checkpoint.trusted_foundation)."""
    model, scaler, cfg, payload = load_checkpoint(path)
    if model.physics != "off":
        trusted = trusted_model_config(payload, cfg.model, foundation)
        cfg = derive(cfg, {"model.source": trusted.source})
    return Predictor(model, scaler, cfg, payload["task"])


def resolve_models(ref: str) -> list[Path]:
    """Local checkpoint, `name@alias`, `name@<fingerprint>` (one study's fold models) or
    `name` (the `fold<k>` aliases, when they all belong to one study) -> checkpoint paths."""
    if Path(ref).exists():
        return [Path(ref)]
    import mlflow
    from mlflow import MlflowClient

    from matxfer.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri())
    name, _, alias = ref.partition("@")
    try:
        aliases = registry_aliases(MlflowClient(), name, alias)
        return [Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{a}")) for a in aliases]
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"--model {ref!r}: not a checkpoint path nor a registered model "
                        f"({str(err).splitlines()[0][:200]})") from None


def registry_aliases(client, name: str, alias: str) -> list[str]:
    """The aliases of registered model `name` that `alias` means: itself; the
    `fold<k>-<alias>` aliases when it is a study's fingerprint; without one, the `fold<k>`
    aliases, refused when their versions come from different studies (fingerprint tags)."""
    known = client.get_registered_model(name).aliases
    if alias and alias not in known:
        study = sorted((a for a in known if re.fullmatch(rf"fold\d+-{re.escape(alias)}", a)),
                       key=_fold_number)
        return study or [alias]  # an unknown alias: mlflow's own message
    if alias:
        return [alias]
    folds = sorted((a for a in known if re.fullmatch(r"fold\d+", a)), key=_fold_number)
    if not folds:
        raise UserError(f"registered model {name!r} has no fold aliases")
    study_of = {a: client.get_model_version(name, known[a]).tags.get("matxfer.fingerprint")
                for a in folds}
    if len(set(study_of.values())) > 1:
        raise UserError(f"registered model {name!r}: its fold aliases belong to different "
                        f"studies ({_studies(known, study_of)}); ensemble one study with "
                        f"--model {name}@<fingerprint>, e.g. {name}@{study_of[folds[0]]}")
    return folds


def _fold_number(alias: str) -> int:
    return int(re.match(r"fold(\d+)", alias).group(1))


def _studies(known: dict, study_of: dict) -> str:
    """'<fp>: fold0 fold1 (registered folds 0-4); ...' per study the fold aliases point at."""
    parts = []
    for study in dict.fromkeys(study_of.values()):
        held = " ".join(a for a, s in study_of.items() if s == study)
        own = sorted(_fold_number(a) for a in known if study and a.endswith(f"-{study}"))
        parts.append(f"{study or 'untagged'}: {held}" +
                     (f" (its folds: {', '.join(map(str, own))})" if own else ""))
    return "; ".join(parts)


class BadStructure(ValueError):
    """A structure file that cannot be predicted; the message says why (no type name shown)."""


FORMATS = "CIF (.cif), POSCAR/CONTCAR/.vasp, extxyz (.extxyz, .xyz), pymatgen JSON (.json)"


def structure_format(path: Path) -> str | None:
    """The format a file's name says (pymatgen's naming rules), None when it says none."""
    suffix, name = path.suffix.lower(), path.name.upper()
    if suffix == ".json":
        return "pymatgen JSON"
    if suffix in (".extxyz", ".xyz"):
        return "extxyz"
    if suffix == ".cif":
        return "CIF"
    if suffix == ".vasp" or "POSCAR" in name or "CONTCAR" in name:
        return "POSCAR"
    return None


def read_structure(path: Path):
    """The structure of a file, read as training reads it: extxyz/.xyz as an ase.Atoms with
    its own pbc (a molecule stays a molecule, as in matxfer.datasets.sources), CIF,
    POSCAR/CONTCAR/.vasp and pymatgen JSON as pymatgen objects; BadStructure naming what is
    wrong with the file otherwise."""
    import warnings

    if not path.exists():
        raise BadStructure("does not exist")
    if path.is_dir():
        raise BadStructure("is a folder, not a structure file")
    kind = structure_format(path)
    if kind is None:
        raise BadStructure(f"unrecognised file type; allowed: {FORMATS}")
    try:
        with warnings.catch_warnings():  # pymatgen warns about harmless CIF omissions
            warnings.simplefilter("ignore")
            return _read_structure(path, kind)
    except Exception as err:
        raise BadStructure(f"cannot be read as {kind}: {one_line(err)}") from None


def _read_structure(path: Path, kind: str):
    from pymatgen.core import Structure

    if kind == "pymatgen JSON":
        tree = json.loads(path.read_text())
        if _encoded_objects(tree.get("properties")) or any(
                _encoded_objects(site.get("properties")) for site in tree.get("sites", [])):
            # pymatgen decodes properties with MontyDecoder, which imports what they name
            raise BadStructure("its properties hold encoded objects (@module); only plain "
                               "values are read")
        return Structure.from_dict(tree)
    if kind == "extxyz":
        from ase.io import read

        return read(path, format="extxyz")
    return Structure.from_file(path)


def _encoded_objects(value) -> bool:
    """Whether a JSON value holds a dict naming a module (MontyDecoder's @module)."""
    if isinstance(value, dict):
        return "@module" in value or any(_encoded_objects(v) for v in value.values())
    if isinstance(value, list):
        return any(_encoded_objects(v) for v in value)
    return False


MIN_DISTANCE = 0.5  # Å: closer atoms are a broken file, not a material
MAX_ATOMS = 2000
MAX_CELL_LENGTH = 500.0  # Å


def check_structure(structure) -> None:
    """Refuse what no fine-tuned model can predict sensibly: empty or degenerate cells,
    overlapping atoms, huge cells or molecules (BadStructure with the reason); periodic only
    along the directions the structure's pbc says (graphs.structure_arrays)."""
    from ase.neighborlist import primitive_neighbor_list

    numbers, positions, cell, pbc = structure_arrays(structure)
    n = len(numbers)
    if n == 0:
        raise BadStructure("no atoms")
    if n > MAX_ATOMS:
        raise BadStructure(f"{n} atoms; at most {MAX_ATOMS} are allowed")
    cell = np.zeros((3, 3)) if cell is None else cell
    lengths = np.linalg.norm(cell, axis=1)[list(pbc)]
    volume = abs(np.linalg.det(cell))
    if len(lengths) and (min(lengths) < 1e-3 or (all(pbc) and volume < 1e-3)):
        raise BadStructure(f"degenerate cell (volume {volume:.3g} Å³)")
    extent = max([*lengths, *np.ptp(positions, axis=0)])
    if extent > MAX_CELL_LENGTH:
        what = "cell vector" if len(lengths) and max(lengths) == extent else "extent"
        raise BadStructure(f"{what} of {extent:.4g} Å; at most {MAX_CELL_LENGTH} Å")
    distances = primitive_neighbor_list("d", pbc, cell, positions, MIN_DISTANCE)
    if len(distances):
        raise BadStructure(f"atoms {distances.min():.3g} Å apart (overlapping; minimum "
                           f"{MIN_DISTANCE} Å)")


def reduced_formula(structure) -> str:
    """The reduced formula of a pymatgen structure or an ase.Atoms."""
    from pymatgen.core import Composition

    if hasattr(structure, "composition"):
        return structure.composition.reduced_formula
    return Composition(structure.get_chemical_formula()).reduced_formula


def prepare(files: list[Path], spec: GraphSpec) -> tuple[GraphSet | None, list]:
    """Graphs of every readable file; per-file errors are collected, not raised."""
    rows, errors = [], []
    for path in files:
        try:
            structure = read_structure(path)
            check_structure(structure)
            rows.append((path, structure, spec.graph(structure, path.name)))
        except Exception as err:
            errors.append({"file": str(path), "formula": "", "error": one_line(err)})
    if not rows:
        return None, errors
    graphs = graph_set_from_parts([str(r[0]) for r in rows], [r[2] for r in rows],
                                  np.zeros(len(rows)), spec.z_table, spec.dtype)
    graphs.formulas = [reduced_formula(r[1]) for r in rows]
    graphs.structures = [r[1] for r in rows]
    return graphs, errors


def one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    plain = isinstance(err, (UserError, BadStructure))
    return (first if plain else f"{type(err).__name__}: {first}")[:300]


def physics_descriptors(predictor: Predictor, structures: list, known: dict) -> np.ndarray | None:
    """Descriptors [N, d] of the structures under the predictor's physics settings (None when
    it uses none); `known` keeps them per settings, shared by an ensemble's members."""
    physics = predictor.cfg.model.physics
    if physics is None or physics.mode == "off":
        return None
    key = (predictor.cfg.model.source, physics.model_dump_json())
    if key not in known:
        known[key] = compute([frame_of(s) for s in structures],
                             potential_of(predictor.cfg.model, physics), physics, progress=False)
    return known[key]


@torch.no_grad()
def predict_graphs(predictor: Predictor, graphs: GraphSet, batch_size: int = 32) -> np.ndarray:
    """Predictions [N] in task units; graphs.descriptors must hold the predictor's physics
    descriptors when it uses them (physics_descriptors)."""
    out = []
    for start in range(0, len(graphs), batch_size):
        batch = collate(graphs, list(range(start, min(len(graphs), start + batch_size))))
        pred, _ = predictor.model(batch)
        out.append(predictor.scaler.decode(pred.double()))
    return torch.cat(out).numpy()


def predict_files(model_ref: str, files: list[str], batch_size: int = 32,
                  foundation: str | None = None) -> pd.DataFrame:
    """One row per file: file, formula, prediction, std (ensembles), error, unit.
    `foundation`: the user's foundation weights file for physics models (load_predictor)."""
    predictors = [load_predictor(p, foundation) for p in resolve_models(model_ref)]
    specs = {p.model.graph_spec() for p in predictors}
    if len(specs) > 1:
        raise UserError(f"--model {model_ref!r}: an ensemble's members use different backbones "
                        f"({', '.join(sorted({p.model.family.name for p in predictors}))}); "
                        "predict with each separately")
    graphs, errors = prepare([Path(f) for f in files], specs.pop())
    table = pd.DataFrame(errors, columns=["file", "formula", "error"])
    if graphs is not None:
        known: dict = {}
        preds = []
        for p in predictors:
            graphs.descriptors = physics_descriptors(p, graphs.structures, known)
            preds.append(predict_graphs(p, graphs, batch_size))
        preds = np.stack(preds)
        good = pd.DataFrame({"file": graphs.ids, "formula": graphs.formulas,
                             "prediction": preds.mean(0), "error": ""})
        if len(predictors) > 1:
            good["std"] = preds.std(0)
        table = pd.concat([good, table], ignore_index=True)
    table["unit"] = predictors[0].cfg.data.spec.unit  # the task's, or your data's unit
    table.attrs["task"] = predictors[0].task
    return table
