"""A study's identity: a fingerprint of every setting that changes what it computes.

Results are reused (a finished fold skipped, an interrupted study resumed, an MLflow parent
run continued) only under the same fingerprint. By default each distinct study gets its own
folder, `<output_dir>/<task>/<variant>/<fingerprint>/`, so a quickstart and a full study of
the same task live side by side; a pinned `study_dir` holding another study is refused with
the differing settings named.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matxfer import __version__
from matxfer.config import StudyConfig
from matxfer.errors import UserError

STUDY_FILE = "study.json"

# Settings that never change what a study computes: where things go, where the data and
# weights lie (they enter by content hash), how fast or how parallel it runs, how it is
# tracked. Everything else is part of the fingerprint.
NEUTRAL = ("folds", "max_concurrent_trials", "storage_path", "output_dir", "study_dir",
           "tracking", "scheduling_timeout_s", "dashboard", "scaling.use_gpu",
           "scaling.cpus_per_worker", "scaling.gpus_per_worker", "run.data.source.path",
           "run.data.fold", "run.data.data_dir", "run.data.cache_dir", "run.model.source",
           "run.model.kernels", "run.train.threads", "run.train.device", "run.train.compile",
           "run.train.prefetch_batches", "run.model.physics.batch_atoms")

# Sections added after studies were fingerprinted: unset, they leave the fingerprint as it was.
UNSET_IS_ABSENT = ("run.data.source", "run.data.split", "run.model.physics", "search.physics",
                   "search.descriptors", "search.calibration")
# Settings added after studies were fingerprinted: at these defaults they leave it as it was.
DEFAULT_IS_ABSENT = {"run.model.physics.dos_supercell": 2, "run.model.physics.dos_mesh": 12,
                     "run.model.physics.dos_sigma": 0.1, "run.model.physics.dispersion": True,
                     "run.model.physics.calibration": "linear"}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _neutral(key: str) -> bool:
    return any(key == n or key.startswith(n + ".") for n in NEUTRAL)


def study_settings(study: StudyConfig, data_sha256: str, weights_sha256: str) -> dict[str, Any]:
    """The settings that define the study's results, flattened to dotted keys; the data file
    and the model weights enter by content hash (their paths do not matter)."""
    flat = _flatten(study.model_dump(mode="json"))
    if flat.get("run.model.physics.mode") == "off" and not flat.get("search.physics"):
        # descriptors named but not used: the results are those of no physics at all
        flat = {k: v for k, v in flat.items() if not k.startswith("run.model.physics.")}
        flat["run.model.physics"] = None
    settings = {k: v for k, v in flat.items() if not _neutral(k)
                and not (k in UNSET_IS_ABSENT and v is None)
                and not (k in DEFAULT_IS_ABSENT and v == DEFAULT_IS_ABSENT[k])}
    settings["data.sha256"] = data_sha256
    settings["model.weights_sha256"] = weights_sha256
    return dict(sorted(settings.items()))


def fingerprint(settings: dict[str, Any]) -> str:
    """12 hex digits of the SHA-256 of the settings' canonical JSON."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def differing(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for each setting that differs between two studies."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '-')!r} -> {new.get(k, '-')!r}" for k in keys
            if old.get(k, "-") != new.get(k, "-")]


@dataclass(frozen=True)
class StudyIdentity:
    """Who a study is (fingerprint of its settings) and where its results live."""

    task: str
    variant: str
    fingerprint: str
    settings: dict[str, Any]
    folder: Path
    pinned: bool

    def fold_dir(self, fold: int) -> Path:
        return self.folder / f"fold{fold}"

    def run_name(self, fold: int) -> str:
        """Ray experiment name and MLflow parent-run key of one fold's study."""
        return f"{self.task}-{self.variant}-{self.fingerprint}-fold{fold}"


def identify(study: StudyConfig, data_sha256: str, weights_sha256: str) -> StudyIdentity:
    settings = study_settings(study, data_sha256, weights_sha256)
    fp = fingerprint(settings)
    task = study.run.data.task
    folder = (Path(study.study_dir) if study.study_dir
              else Path(study.output_dir) / task / study.name / fp)
    ident = StudyIdentity(task, study.name, fp, settings, folder, study.study_dir is not None)
    return earlier_identity(study, ident) or ident


def earlier_identity(study: StudyConfig, ident: StudyIdentity) -> StudyIdentity | None:
    """The same study as fingerprinted before the data's path left the fingerprint (your own
    data, matxfer 0.1.0), when its study.json is where it would be: it keeps that
    fingerprint and folder, so its finished folds are skipped and interrupted ones resumed."""
    source = study.run.data.source
    if source is None:
        return None
    settings = dict(sorted({**ident.settings, "run.data.source.path": source.path}.items()))
    fp = fingerprint(settings)
    folder = ident.folder if ident.pinned else ident.folder.parent / fp
    try:
        recorded = json.loads((folder / STUDY_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    if recorded != fp:
        return None
    return StudyIdentity(ident.task, ident.variant, fp, settings, folder, ident.pinned)


def folder_conflict(ident: StudyIdentity) -> str | None:
    """Why the study's folder holds another study's work (None when it is free or ours)."""
    record = ident.folder / STUDY_FILE
    if record.is_file():
        try:
            old = json.loads(record.read_text())
        except (OSError, ValueError):
            return f"{str(record)!r} is unreadable; move the folder away or choose another"
        if old.get("fingerprint") == ident.fingerprint:
            return None
        changes = differing(old.get("settings", {}), ident.settings)
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more"
                                           if len(changes) > 6 else "")
        return (f"{str(ident.folder)!r} holds study {old.get('fingerprint')} with other "
                f"settings ({shown}); choose another study_dir or remove that folder")
    if any(ident.folder.glob("fold*/result.json")):
        return (f"{str(ident.folder)!r} holds results written without a fingerprint (an older "
                "matxfer): they cannot be matched to these settings; choose another study_dir")
    return None


def claim_folder(ident: StudyIdentity) -> None:
    """Refuse a folder holding another study; otherwise record our settings in study.json."""
    problem = folder_conflict(ident)
    if problem:
        raise UserError(problem)
    record = ident.folder / STUDY_FILE
    if record.is_file():
        return
    ident.folder.mkdir(parents=True, exist_ok=True)
    body = {"fingerprint": ident.fingerprint, "task": ident.task, "variant": ident.variant,
            "matxfer_version": __version__, "settings": ident.settings}
    fd, tmp = tempfile.mkstemp(dir=ident.folder, prefix=f".{STUDY_FILE}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, record)


def fold_status(ident: StudyIdentity, fold: int, ray_dir: str) -> str:
    """'finished' (skipped on rerun), 'interrupted' (resumed) or 'new'."""
    if (ident.fold_dir(fold) / "result.json").is_file():
        return "finished"
    if "://" not in ray_dir and Path(ray_dir, ident.run_name(fold)).is_dir():
        return "interrupted"
    return "new"
