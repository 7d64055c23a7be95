"""Backbone names and what each family supports: imported by the config, so no torch here.

`model.source` is a MACE name (`small`, found offline in ../shared; or any name mace's own
`mace_mp` downloads), a path to a MACE model file, or `chgnet` / `chgnet-<version>` (CHGNet's
pretrained weights from the installed `chgnet` wheel).
"""

from __future__ import annotations

CHGNET_VERSIONS = ("0.3.0", "0.2.0")
FAMILIES = ("mace", "chgnet")

# option (as the config names it) -> what the option needs, per family that lacks it
UNSUPPORTED = {
    "chgnet": {
        "model.kernels 'cueq'": "cuequivariance kernels exist for MACE only",
        "model.restrict_elements": "element restriction gathers MACE's per-element tables",
        "model.dtype 'float64'": "CHGNet's graph batching is float32 only",
        "model.physics": "the physics descriptors use the MACE potential",
        "train.compile": "the compile path rebuilds MACE without TorchScript",
    },
}


def family_of(source: str) -> str:
    """'chgnet' for chgnet / chgnet-<version>, else 'mace' (a name or a file)."""
    return "chgnet" if source == "chgnet" or source.startswith("chgnet-") else "mace"


def chgnet_version(source: str) -> str:
    """The CHGNet weights version a source names ('chgnet' alone: the newest)."""
    version = CHGNET_VERSIONS[0] if source == "chgnet" else source.removeprefix("chgnet-")
    if version not in CHGNET_VERSIONS:
        allowed = ", ".join(["chgnet"] + [f"chgnet-{v}" for v in CHGNET_VERSIONS])
        raise ValueError(f"model.source {source!r} is not a CHGNet version; allowed: {allowed}")
    return version


def unsupported(source: str, options: list[str]) -> str | None:
    """A one-line refusal for the first of `options` the source's family lacks, or None."""
    family = family_of(source)
    for option in options:
        why = UNSUPPORTED.get(family, {}).get(option)
        if why:
            return f"{option} is not supported by the {family} backbone ({source}): {why}"
    return None
