"""A MACE backbone's architecture as JSON-able values, and the backbone rebuilt from them.

A checkpoint stores MACE's own `extract_config_mace_model` (encoded: Irreps, classes and
activation functions by name) so it loads without the foundation weights and without running
code the file chooses (classes are looked up in mace.modules only).
"""

from __future__ import annotations

import copy
import functools
import json
import warnings
from typing import Any

import numpy as np
import torch

from matxfer.backbones.quiet_mace import import_mace

MACE_MODELS = ("ScaleShiftMACE", "MACE")


def _gates() -> dict[str, Any]:
    """Activation functions a MACE readout may hold, by the name stored in a checkpoint."""
    f = torch.nn.functional
    return {"silu": f.silu, "tanh": torch.tanh, "abs": torch.abs, "relu": f.relu,
            "gelu": f.gelu, "sigmoid": torch.sigmoid, "softplus": f.softplus}


def encode(value: Any) -> Any:
    """mace's architecture config -> JSON-able values (the inverse is `decode`)."""
    import_mace()
    from e3nn import o3

    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.name}
    if isinstance(value, o3.Irreps):
        return {"__irreps__": str(value)}
    if isinstance(value, type):
        return {"__class__": value.__name__}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    names = [n for n, fn in _gates().items() if fn is value]
    if names:
        return {"__function__": names[0]}
    raise ValueError(f"cannot store a {type(value).__name__} ({value!r:.60}) in a checkpoint")


def decode(value: Any) -> Any:
    """JSON-able values -> mace's architecture config (Irreps, MACE classes, functions)."""
    import_mace()
    from e3nn import o3

    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return torch.tensor(value["__tensor__"], dtype=_torch_dtype(value["dtype"]))
    if "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=np.dtype(str(value["dtype"])))
    if "__irreps__" in value:
        return o3.Irreps(value["__irreps__"])
    if "__class__" in value:
        return mace_class(value["__class__"])
    if "__function__" in value:
        gates = _gates()
        if value["__function__"] not in gates:
            raise ValueError(f"unknown activation {value['__function__']!r}")
        return gates[value["__function__"]]
    return {k: decode(v) for k, v in value.items()}


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def mace_class(name: str) -> type:
    """A MACE model or block class by name, looked up in mace.modules only (never imported by
    a path the file chooses)."""
    import_mace()
    import mace.modules
    import mace.modules.blocks

    for where in (mace.modules, mace.modules.blocks):
        cls = getattr(where, str(name), None)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            return cls
    raise ValueError(f"{name!r} is not a class of mace.modules")


def architecture(backbone: torch.nn.Module) -> dict:
    """{class, dtype, config}: what rebuilds `backbone` with `build_backbone`."""
    import_mace()
    from mace.tools.scripts_utils import extract_config_mace_model

    name = next((c.__name__ for c in type(backbone).__mro__ if c.__name__ in MACE_MODELS), None)
    config = extract_config_mace_model(backbone)
    if name is None or "error" in config:
        raise ValueError(f"cannot describe a {type(backbone).__name__} backbone")
    dtype = next(backbone.parameters()).dtype
    return {"class": name, "dtype": str(dtype).removeprefix("torch."), "config": encode(config)}


def build_backbone(arch: dict) -> torch.nn.Module:
    """A MACE backbone of the stored architecture (float64 build, like mace's own models, then
    the stored dtype); its weights come from the checkpoint's state. Constructing MACE takes
    seconds (e3nn's code generation): a process builds each architecture once and copies it
    (a study evaluates one checkpoint per fold; predict loads one per fold). Never a copy of
    a pickled foundation model: constants e3nn computes at construction may differ in the last
    digits between the mace that pickled it and this one, and a study's test predictions must
    be what `matxfer predict` gives for the same checkpoint."""
    return copy.deepcopy(_built_backbone(json.dumps(arch, sort_keys=True)))


def prebuild(arch: dict) -> None:
    """Build `arch` now so that its next build_backbone in this process is a copy (a study's
    driver does it on a thread while the trials run, before the test-fold evaluation)."""
    _built_backbone(json.dumps(arch, sort_keys=True))


def random_backbone(arch: dict, seed: int) -> torch.nn.Module:
    """The seeded random twin of a stored architecture, built as `MaceFamily.load` builds it
    from a model file (under the default dtype, after `torch.manual_seed(seed)`): θ0 of a
    random-init checkpoint without any file (the caller freezes and casts it)."""
    if arch.get("class") not in MACE_MODELS:
        raise ValueError(f"backbone class {arch.get('class')!r} is not one of {MACE_MODELS}")
    cls, config = mace_class(arch["class"]), decode(arch["config"])
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        return cls(**config)


@functools.lru_cache(maxsize=2)
def _built_backbone(arch_json: str) -> torch.nn.Module:
    arch = json.loads(arch_json)
    if arch.get("class") not in MACE_MODELS:
        raise ValueError(f"backbone class {arch.get('class')!r} is not one of {MACE_MODELS}")
    cls, config = mace_class(arch["class"]), decode(arch["config"])
    dtype = _torch_dtype(arch["dtype"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:  # quietly: mace and TorchScript warn on stderr while building (predict prints CSV)
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backbone = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    for p in backbone.readouts.parameters():  # as Family.load: no gradient to the readouts
        p.requires_grad_(False)
    return backbone.to(dtype)


