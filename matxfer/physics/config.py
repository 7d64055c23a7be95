"""The `run.physics` section and the descriptor catalogue (names, units, meaning).

Kept free of torch and mace so the typed config can import it cheaply.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from matxfer.choices import PhysicsMode


class Descriptor(NamedTuple):
    unit: str
    group: str  # what must be computed: phonons, eos, elastic, energy
    meaning: str


DESCRIPTORS: dict[str, Descriptor] = {
    "phonon_max": Descriptor("cm^-1", "phonons", "largest Γ-point phonon frequency; "
                             "approximates the last phonon-DOS peak"),
    "phonon_mean": Descriptor("cm^-1", "phonons", "mean Γ optical frequency (the 3 acoustic "
                              "modes left out); first moment of the Γ spectrum"),
    "phonon_rms": Descriptor("cm^-1", "phonons", "root-mean-square Γ optical frequency; "
                             "second moment of the Γ spectrum"),
    "phonon_min": Descriptor("cm^-1", "phonons", "smallest Γ optical frequency; negative "
                             "values are imaginary modes (a dynamically unstable structure)"),
    "bulk_modulus_eos": Descriptor("GPa", "eos", "B0 of a Birch-Murnaghan fit to the energy "
                                   "at 7 volumes (±eos_strain); approximates K_VRH"),
    "k_vrh": Descriptor("GPa", "elastic", "Voigt-Reuss-Hill bulk modulus of the clamped-ion "
                        "elastic tensor from ±strain finite differences of the stress"),
    "g_vrh": Descriptor("GPa", "elastic", "Voigt-Reuss-Hill shear modulus of the same tensor"),
    "log10_k_vrh": Descriptor("log10(GPa)", "elastic", "log10 of k_vrh (NaN when k_vrh <= 0); "
                              "matches Matbench's log_kvrh target"),
    "log10_g_vrh": Descriptor("log10(GPa)", "elastic", "log10 of g_vrh (NaN when g_vrh <= 0); "
                              "matches Matbench's log_gvrh target"),
    "energy_per_atom": Descriptor("eV/atom", "energy", "the potential's total energy per atom; "
                                  "approximates the MPtrj DFT (PBE/PBE+U) energy"),
    "phdos_last_peak": Descriptor("cm^-1", "phdos", "highest-frequency peak (a local maximum "
                                  "above 5% of the largest) of the phonon DOS from n x n x n "
                                  "supercell force constants on a q-mesh; is Matbench phonons' "
                                  "target"),
    "phonon_band_max": Descriptor("cm^-1", "phdos", "highest phonon frequency on the DOS "
                                  "q-mesh (whole Brillouin zone, not only Γ)"),
    "exfoliation_energy": Descriptor("meV/atom", "exfoliation", "E(layer) - E(restacked bulk) "
                                     "per atom: the layer found by dimensionality analysis, "
                                     "restacked, the interlayer gap minimised over a few "
                                     "stacking offsets, D3(BJ) dispersion added; approximates "
                                     "jdft2d's exfoliation energy"),
}
GROUPS = ("energy", "phonons", "phdos", "eos", "elastic", "exfoliation")  # computation order



class PhysicsConfig(BaseModel):
    """Zero-shot descriptors of the pretrained potential and how the model uses them."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # derived copies: config.derive

    mode: PhysicsMode = Field("off", description="zero-shot: a linear calibration of the "
                              "descriptors fitted on the training fold, no fine-tuning; "
                              "features: standardised descriptors join the pooled features at "
                              "the head; residual: fine-tune to the target minus the "
                              "calibrated descriptors; off: not used")
    descriptors: list[str] = Field(default_factory=list, description="names from "
                                   "matxfer.physics.config.DESCRIPTORS")
    relax: Literal["none", "positions", "positions+cell"] = Field(
        "none", description="relax with the potential (FIRE) before the descriptors are "
        "computed: atomic positions (cell fixed), or positions and cell (crystals)")
    displacement: float = Field(0.01, gt=0.0, le=0.1, description="finite-difference "
                                "displacement of the Hessian, Å")
    strain: float = Field(0.005, gt=0.0, le=0.05, description="finite strain of the elastic "
                          "tensor (engineering strain)")
    eos_strain: float = Field(0.06, gt=0.0, le=0.2, description="volume range ±fraction of "
                              "the energy-volume fit")
    symmetry: bool = Field(True, description="Γ Hessian of a crystal from its symmetry-"
                           "inequivalent displacements only (phonopy); same Hessian, fewer "
                           "copies through the potential")
    supercell: int = Field(1, ge=1, le=4, description="Γ phonons of the n x n x n supercell "
                           "(adds the zone-boundary modes of the cell; costs about n^6 more)")
    max_atoms: int = Field(64, ge=1, description="structures with more atoms get NaN for the "
                           "phonon descriptors (the Hessian costs 6n forces of n atoms)")
    batch_atoms: int = Field(512, ge=64, description="atoms per forward pass of the potential "
                             "(512 was the fastest on a 2-core CPU)")
    dos_supercell: int = Field(2, ge=1, le=4, description="phonon DOS: force constants of the "
                               "n x n x n supercell (its atoms go through the potential)")
    dos_mesh: int = Field(12, ge=2, le=64, description="phonon DOS: q-points per reciprocal "
                          "axis of the mesh")
    dos_sigma: float = Field(0.1, gt=0.0, le=2.0, description="phonon DOS: Gaussian smearing, "
                             "THz (0.1 THz = 3.34 cm^-1)")
    dispersion: bool = Field(True, description="exfoliation energy: add D3(BJ) dispersion "
                             "(torch-dftd, PBE parameters, as mace_mp(dispersion=True)); "
                             "layers are held by van der Waals forces the potential lacks")
    calibration: Literal["linear", "huber"] = Field(
        "linear", description="how the descriptors are calibrated to the target on the "
        "training fold: least squares, or Huber's robust loss (for heavy-tailed targets)")
    precision: Literal["float32", "float64"] = Field(
        "float32", description="dtype of the potential's forward pass; float32 is ~2.7x "
        "faster on CPU and changed Γ frequencies by < 0.01 cm^-1 on matbench_phonons")

    @model_validator(mode="after")
    def _known_descriptors(self) -> PhysicsConfig:
        unknown = [d for d in self.descriptors if d not in DESCRIPTORS]
        if unknown:
            raise ValueError(f"unknown descriptor {unknown[0]!r}; allowed: "
                             f"{', '.join(DESCRIPTORS)}")
        if len(set(self.descriptors)) != len(self.descriptors):
            raise ValueError(f"descriptors listed twice in {self.descriptors}")
        if self.mode != "off" and not self.descriptors:
            raise ValueError(f"physics.mode {self.mode!r} needs physics.descriptors; allowed: "
                             f"{', '.join(DESCRIPTORS)}")
        return self

    def groups(self) -> list[str]:
        """The computations the chosen descriptors need, in catalogue order."""
        wanted = {DESCRIPTORS[d].group for d in self.descriptors}
        return [g for g in GROUPS if g in wanted]
