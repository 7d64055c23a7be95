"""Ready-made comparison variants: the paper's baselines (and the other backbones) are config
changes, not code. Each maps dotted config keys to the values it sets (`--variant NAME`)."""

from __future__ import annotations

from typing import Any

_PLAIN = {"search.l2sp": None, "search.bss": None,
          "run.regularizers.l2sp": 0.0, "run.regularizers.bss": 0.0}
_CHGNET = {"run.model.source": "chgnet", "run.model.kernels": "e3nn", "run.model.dtype": "float32",
           "run.model.restrict_elements": False, "run.model.physics.mode": "off",
           "run.train.compile": "off", "search.physics": None}
VARIANTS: dict[str, dict[str, Any]] = {
    "main": {},  # L2-SP + BSS searched
    "no-reg": {"name": "no-reg", **_PLAIN},  # plain full fine-tuning
    "random-init": {"name": "random-init", "run.model.init": "random", **_PLAIN},
    "lp-ft": {"name": "lp-ft", **_PLAIN, "run.strategy.lp_epochs": 20},
    "llrd": {"name": "llrd", **_PLAIN,
             "search.lr_decay": {"low": 0.2, "high": 1.0, "allow_off": False}},
    "freeze": {"name": "freeze", **_PLAIN, "search.freeze_blocks": [1, 2]},
    # plain fine-tuning, the readout pooling picked by validation (a per-task pilot)
    "pooling": {"name": "pooling", **_PLAIN, "search.pooling": ["mean", "max"]},
    # physics of the pretrained potential (run.model.physics.descriptors from the config):
    # its calibrated descriptors alone, as head features, or as the baseline of a residual
    "zero-shot": {"name": "zero-shot", **_PLAIN, "run.model.physics.mode": "zero-shot"},
    "phys-features": {"name": "phys-features", **_PLAIN, "run.model.physics.mode": "features"},
    "phys-residual": {"name": "phys-residual", **_PLAIN, "run.model.physics.mode": "residual"},
    # the mode too (zero-shot or residual) with the config's descriptor sets and calibrations,
    # all picked per fold by validation
    "phys-select": {"name": "phys-select", **_PLAIN, "run.model.physics.mode": "zero-shot",
                    "search.physics": ["zero-shot", "residual"]},
    # the second backbone family (matxfer.backbones.chgnet), pretrained and its random twin;
    # options only MACE has are set to what CHGNet runs with
    "chgnet": {"name": "chgnet", **_CHGNET},
    "chgnet-random": {"name": "chgnet-random", **_CHGNET, "run.model.init": "random", **_PLAIN},
}
