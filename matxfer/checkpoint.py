"""Self-contained checkpoints that load without the foundation weights and without running code.

Format 2, a dict of tensors and JSON-able values (`storage.save_checked`; read weights-only):
`format_version`, `matxfer_version`, `task` and `task_spec`; `backbone` (class, dtype and the
family's constructor arguments: matxfer.backbones.mace_arch, chgnet_architecture), `head`
(pooling, hidden sizes), `model_state`, `z_table`, `scaler`; `foundation` (init, source, seed,
SHA-256 of the starting weights: None for init=random); `config` (the RunConfig without
machine paths). Older files have no `format_version`: they are refused with the command that
converts a trusted one once.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from pydantic import ValidationError

from matxfer import __version__
from matxfer.backbones.mace import mace_names
from matxfer.backbones.names import family_of
from matxfer.backbones.quiet_mace import import_mace
from matxfer.backbones.registry import architecture, build_backbone, random_backbone
from matxfer.config import DataConfig, ModelConfig, RunConfig, derive, format_validation_error
from matxfer.errors import UserError
from matxfer.model import (
    PropertyModel,
    TargetScaler,
    build_model,
    load_backbone,
    model_on,
    weights_file,
)
from matxfer.storage import (
    CorruptFile,
    UnsafeFile,
    load_checked,
    plain,
    save_checked,
    sha256_file,
    verify,
)
from matxfer.tasks import TaskSpec, get_task

FORMAT_VERSION = 2
CHECKPOINT_FILE = "checkpoint.pt"
PATH_KEYS = ("data_dir", "cache_dir")
OPTIONAL_SUFFIX = "_zeroed"


def model_architecture(model: PropertyModel, cfg: ModelConfig) -> dict:
    """The backbone's architecture; a compile-ready twin (mace.tools.compile) cannot describe
    itself, so its source model is described instead (same state dict names and shapes)."""
    try:
        return architecture(model.backbone)
    except (TypeError, AttributeError, ValueError):
        return _source_architecture(cfg.source, cfg.init, cfg.init_seed, cfg.dtype)


@functools.lru_cache(maxsize=4)
def _source_architecture(source: str, init: str, seed: int, dtype: str) -> dict:
    return architecture(load_backbone(source, init, seed, getattr(torch, dtype)))


@functools.lru_cache(maxsize=8)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def portable_source(source: str) -> str:
    """'small' stays; a model file path becomes its file name (no machine-specific folders)."""
    return source if source == "small" else Path(source).name


def foundation_record(cfg: ModelConfig) -> dict:
    """What the fine-tune started from: init, source, seed, SHA-256 of the weights file."""
    sha = None
    if cfg.init == "pretrained":
        path = weights_file(cfg.source).resolve()
        stat = path.stat()
        sha = _cached_sha256(str(path), stat.st_size, stat.st_mtime_ns)
    record = {"init": cfg.init, "source": portable_source(cfg.source), "seed": cfg.init_seed,
              "sha256": sha}
    if Path(cfg.source).is_file():  # a model file: where it was (the name alone is portable)
        record["path"] = str(Path(cfg.source).resolve())
    return record


def backbone_facts(model: PropertyModel, cfg: ModelConfig) -> dict:
    """What a result records of its backbone: its source (portable), family and the number of
    parameters the property model trains (the energy readout excluded)."""
    return {"backbone": portable_source(cfg.source), "family": model.family.name,
            "backbone_params": model.family.n_parameters(model.backbone)}


def trusted_foundation(payload: dict, source: str, explicit: str | None = None) -> Path:
    """The foundation weights file of a received checkpoint, found only where the user trusts:
    `explicit` (a path the user passed on the command line), else the known name `source`
    through the trusted lookup (MATXFER_MODEL, ../shared/models, mace's cache; CHGNet's
    wheel). A model file the checkpoint names is never used. The file's SHA-256 must be the
    one the checkpoint records, checked before anything loads (unpickles) it."""
    recorded = (payload.get("foundation") or {}).get("sha256")
    if not isinstance(recorded, str) or not recorded:
        raise UserError("the checkpoint records no sha256 of its foundation weights, so none "
                        "can be checked against it; refusing to load foundation weights for it")
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise UserError(f"--foundation {explicit!r} is not a file")
    elif family_of(source) == "mace" and source not in mace_names():
        raise UserError(f"the checkpoint started from the model file {Path(source).name!r}; "
                        f"pass that file with --foundation PATH (sha256 {recorded[:12]}…): "
                        "files a checkpoint names are never loaded")
    else:
        path = weights_file(source).resolve()
    stat = path.stat()
    here = _cached_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if here != recorded:
        raise UserError(f"the foundation weights {str(path)!r} (sha256 {here[:12]}…) are not "
                        f"the ones the checkpoint started from (sha256 {recorded[:12]}…); "
                        "pass that file with --foundation PATH")
    return path


def trusted_model_config(payload: dict, cfg: ModelConfig, explicit: str | None = None,
                         ) -> ModelConfig:
    """`cfg` with model.source the verified foundation file (`trusted_foundation`); CHGNet
    loads its verified wheel weights by version name."""
    path = trusted_foundation(payload, cfg.source, explicit)
    if family_of(cfg.source) == "chgnet":
        return cfg
    return derive(cfg, {"source": str(path)})


def starting_model(payload: dict, cfg: ModelConfig, explicit: str | None = None,
                   ) -> PropertyModel:
    """θ0 of a received checkpoint with the seeded head build_model gives: init=random, the
    seeded random twin of its stored architecture (no file read); pretrained, the trusted,
    verified foundation weights (`trusted_foundation`)."""
    if cfg.init == "random":
        backbone = random_backbone(payload["backbone"], cfg.init_seed, getattr(torch, cfg.dtype))
        return model_on(backbone, cfg)
    return build_model(trusted_model_config(payload, cfg, explicit))


def portable_config(cfg: RunConfig) -> dict:
    """The run config without paths of this machine."""
    tree = cfg.model_dump()
    for key in PATH_KEYS:
        tree["data"].pop(key, None)
    tree["model"]["source"] = portable_source(cfg.model.source)
    return tree


def head_hidden(model: PropertyModel) -> list[int]:
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    return [m.out_features for m in linears[:-1]]


def head_record(model: PropertyModel) -> dict:
    """Pooling and hidden widths of the head; with physics, its mode and descriptor count."""
    head = {"pooling": model.pooling, "hidden": head_hidden(model)}
    if model.physics != "off":
        head.update(physics=model.physics, n_physics=len(model.phys_mean))
    return head


def build_payload(model: PropertyModel, cfg: RunConfig, spec: TaskSpec, scaler: TargetScaler,
                  z_table, state: dict | None = None) -> dict:
    """A format-2 checkpoint of `model` (weights `state`, default the model's own)."""
    return {
        "format_version": FORMAT_VERSION, "matxfer_version": __version__,
        "task": spec.name,
        "task_spec": {"name": spec.name, "target": spec.target, "unit": spec.unit,
                      "kind": spec.kind, "metric": spec.metric},
        "config": portable_config(cfg), "foundation": foundation_record(cfg.model),
        "backbone": model_architecture(model, cfg.model),
        "head": head_record(model),
        "z_table": [int(z) for z in z_table], "scaler": plain(scaler.state()),
        "model_state": state if state is not None else model.state_dict(),
    }


def checkpoint_file(path: str | Path) -> Path:
    path = Path(path)
    return path / CHECKPOINT_FILE if path.is_dir() else path


def _reason(err: Exception, path: Path) -> str:
    return str(err).removeprefix(str(path) + " ")


def read_payload(path: Path) -> dict:
    """The payload of a format-2 checkpoint, loaded weights-only; anything else is refused
    with one line (UserError)."""
    try:
        payload = load_checked(path)
    except FileNotFoundError:
        raise UserError(f"{str(path)!r} does not exist") from None
    except CorruptFile as err:
        raise UserError(f"refusing {str(path)!r}: {_reason(err, path)}") from None
    except UnsafeFile as err:
        raise UserError(f"refusing {str(path)!r}: {_reason(err, path)}; if it is an old "
                        "matxfer checkpoint from a source you trust, convert it with "
                        "`matxfer checkpoint convert OLD NEW`") from None
    if not isinstance(payload, dict) or "model_state" not in payload:
        raise UserError(f"{str(path)!r} is not a matxfer checkpoint")
    version = payload.get("format_version")
    if version is None:
        raise UserError(f"{str(path)!r} is an old-format matxfer checkpoint (before format "
                        f"{FORMAT_VERSION}); convert it once with `matxfer checkpoint convert "
                        f"{path} NEW` (needs the foundation weights; only for files you trust)")
    if version != FORMAT_VERSION:
        raise UserError(f"{str(path)!r} has checkpoint format {version!r}; this matxfer "
                        f"{__version__} reads format {FORMAT_VERSION}")
    return payload


def model_from_payload(payload: dict) -> PropertyModel:
    """The fine-tuned PropertyModel, rebuilt from the stored architecture and weights (eval)."""
    backbone = build_backbone(payload["backbone"])
    head = payload["head"]
    with torch.random.fork_rng():
        model = PropertyModel(backbone, head["pooling"], list(head["hidden"]),
                              head.get("physics", "off"), head.get("n_physics", 0))
    missing, unexpected = model.load_state_dict(payload["model_state"], strict=False)
    # flags newer mace versions add to symmetric contractions; a pickled foundation model from
    # an older mace lacks them and its forward never reads them: the fresh defaults stand
    missing = [k for k in missing if not k.endswith(OPTIONAL_SUFFIX)]
    if missing or unexpected:
        raise ValueError(f"stored weights do not fit the stored architecture (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def config_from_payload(payload: dict, local: DataConfig | None = None,
                        own: bool = False) -> RunConfig:
    """The stored RunConfig on the e3nn path; `local` gives this machine's data/cache folders.
    `own`: a checkpoint this study wrote itself, so model.source may be the model file where
    its training found it (foundation.path); a received checkpoint's paths are never used."""
    tree = copy.deepcopy(payload["config"])
    tree["model"]["kernels"] = "e3nn"  # e3nn weights whatever kernels trained them
    for key in PATH_KEYS:
        tree["data"][key] = getattr(local, key) if local is not None else None
    recorded = (payload.get("foundation") or {}).get("path")
    if own and recorded and not Path(tree["model"]["source"]).exists() and \
            Path(recorded).is_file():
        tree["model"]["source"] = recorded
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ValueError(format_validation_error(err)) from None


def load_checkpoint(path: str | Path, local: DataConfig | None = None, own: bool = False,
                    ) -> tuple[PropertyModel, TargetScaler, RunConfig, dict]:
    """(model, scaler, run config, payload) of a checkpoint file or folder; no foundation
    weights needed. `local`: data_dir/cache_dir to put back into the config; `own`: see
    config_from_payload."""
    path = checkpoint_file(path)
    payload = read_payload(path)
    try:
        cfg = config_from_payload(payload, local, own)
        model = model_from_payload(payload)
        scaler = TargetScaler.from_state(dict(payload["scaler"]))
    except Exception as err:  # missing keys, a mismatched state, an unknown class
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise UserError(f"{str(path)!r} is not a valid matxfer checkpoint "
                        f"({type(err).__name__}: {first})") from None
    return model, scaler, cfg, payload


def convert_foundation(cfg: ModelConfig, old_path: Path, explicit: str | None) -> ModelConfig:
    """The foundation an old checkpoint (no SHA-256 recorded) is rebuilt on: the file the user
    passes (`--foundation`), else its model.source as a known name; a file it names, never."""
    if explicit is not None:
        if not Path(explicit).is_file():
            raise UserError(f"--foundation {explicit!r} is not a file")
        return derive(cfg, {"source": str(Path(explicit))})
    if family_of(cfg.source) == "mace" and cfg.source not in mace_names():
        raise UserError(f"{str(old_path)!r} started from the model file "
                        f"{Path(cfg.source).name!r}; pass that file with --foundation PATH "
                        "(only the file you name is unpickled)")
    return cfg


def convert_checkpoint(old_path: str | Path, new_path: str | Path,
                       foundation: str | None = None) -> Path:
    """Rewrite an old-format checkpoint (trusted: it is unpickled) in the current format, as
    `new_path` (a .pt file, else a folder getting checkpoint.pt). The foundation weights must
    be present: they give the architecture and its SHA-256 (`foundation`: the file the user
    names; else the old config's model.source must be a known name)."""
    old_path, new_path = checkpoint_file(old_path), Path(new_path)
    if new_path.is_dir() or new_path.suffix != ".pt":  # a folder, as `matxfer train` writes
        new_path = new_path / CHECKPOINT_FILE
    if not old_path.is_file():
        raise UserError(f"{str(old_path)!r} does not exist")
    try:
        verify(old_path)
        # the one trusted, code-running load: the caller vouches for this old file
        import_mace()
        old = torch.load(old_path, map_location="cpu", weights_only=False)
        if isinstance(old, dict) and old.get("format_version") is not None:
            raise UserError(f"{str(old_path)!r} is already in format "
                            f"{old['format_version']}; nothing to convert")
        cfg = config_from_payload(old)
    except CorruptFile as err:
        raise UserError(f"refusing {str(old_path)!r}: {_reason(err, old_path)}") from None
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{str(old_path)!r} is not an old matxfer checkpoint "
                        f"({type(err).__name__}: {str(err)[:200]})") from None
    cfg = derive(cfg, {"model.source": convert_foundation(cfg.model, old_path, foundation).source})
    model = build_model(cfg.model)  # needs the foundation weights (architecture, SHA-256)
    try:
        model.load_state_dict(old["model_state"])
        spec, scaler = get_task(old["task"]), TargetScaler.from_state(dict(old["scaler"]))
    except (KeyError, RuntimeError, TypeError) as err:
        raise UserError(f"{str(old_path)!r}: its weights do not fit its config "
                        f"({type(err).__name__})") from None
    z_table = old.get("z_table") or list(model.graph_spec().z_table)
    payload = build_payload(model, cfg, spec, scaler, z_table)
    payload["converted_from"] = {"matxfer_version": old.get("matxfer_version")}
    if "history" in old:
        payload["history"] = plain(old["history"])
    save_checked(payload, new_path)
    return new_path
