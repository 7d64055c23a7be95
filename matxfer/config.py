"""Typed run configuration: one pydantic model validates YAML files and CLI overrides alike.

Every error surfaces at load time as a :class:`UserError` naming the field and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from matxfer.backbones.names import chgnet_version, family_of, unsupported
from matxfer.choices import Pooling
from matxfer.errors import UserError
from matxfer.physics.config import PhysicsConfig
from matxfer.search_space import SearchSpace, trial_updates
from matxfer.tasks import N_MATBENCH_FOLDS, TASKS, TaskSpec
from matxfer.variants import VARIANTS

Init = Literal["pretrained", "random"]
TargetTransform = Literal["auto", "none", "log"]
# a plain folder name: never "." or "..", never hidden, never an option
NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
DATASET_NAME = re.compile(NAME)


class _Strict(BaseModel):
    # frozen: a validated config is never changed; a derived one comes out of `derive`
    model_config = ConfigDict(extra="forbid", frozen=True)


C = TypeVar("C", bound=BaseModel)


SourceFormat = Literal["auto", "extxyz", "ase", "ase-db", "csv", "parquet", "dataframe-json"]
SplitMethod = Literal["kfold", "group-composition", "group-chemsys", "column"]


class SourceConfig(_Strict):
    """A user's own labelled structures (matxfer.datasets.sources reads them)."""

    path: str = Field(description="extxyz or any file ASE reads, an ASE .db, a CSV/Parquet "
                      "table with a structure-file column, or a DataFrame JSON (Matbench layout)")
    format: SourceFormat = Field("auto", description="auto: from the file name")
    target: str = Field(min_length=1, description="info key, key-value pair or column")
    id_key: str | None = Field(None, description="ids from this key/column; default: row "
                               "numbers (row-000001, ...)")
    structure_column: str = Field("structure", description="CSV/Parquet: structure file "
                                  "paths (relative to the table); DataFrame JSON: structures")
    kind: Literal["regression", "classification"] = "regression"
    unit: str = Field("", description="target unit, shown in results and predictions")
    log_target: bool = Field(False, description="fit log(target) (needs every target > 0)")
    skip_bad_rows: bool = Field(False, description="train on the readable rows and list the "
                                "skipped ones; default: a bad row stops with its reason")


class SplitConfig(_Strict):
    """Outer folds of a user dataset; the inner validation split follows the same rule."""

    method: SplitMethod = Field("kfold", description="kfold (stratified for classification), "
                                "group-composition / group-chemsys (no reduced formula / "
                                "chemical system on both sides), column (your fold labels)")
    k: int = Field(5, ge=2, le=10, description="number of folds")
    seed: int = 0
    column: str | None = Field(None, description="method column: the fold-label column/key")

    @model_validator(mode="after")
    def _column_named(self) -> SplitConfig:
        if self.method == "column" and not self.column:
            raise ValueError("split.method 'column' needs split.column (the fold-label key)")
        return self


class DataConfig(_Strict):
    task: str = Field("matbench_jdft2d", description="a Matbench task, or your dataset's name "
                      "(with data.source)")
    source: SourceConfig | None = Field(None, description="your own data; absent: Matbench")
    split: SplitConfig | None = Field(None, description="folds of your own data; Matbench "
                                      "tasks use the official folds")
    fold: int = Field(0, ge=0, le=9, description="outer fold (Matbench: official fold 0-4)")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="validation share of train fold")
    val_seed: int = 0
    max_structures: int | None = Field(None, ge=1, description="deterministic subset, smoke runs")
    data_dir: str | None = Field(None, description="folder with <task>.json.gz; default: auto")
    cache_dir: str | None = Field(None, description="graph cache folder; default: auto")

    @model_validator(mode="after")
    def _known_task(self) -> DataConfig:
        if self.source is None:
            if self.task not in TASKS:
                raise ValueError(f"unknown task {self.task!r}; allowed: {', '.join(TASKS)}, "
                                 "or your dataset's name with data.source")
            if self.split is not None:
                raise ValueError("data.split applies to your own data (data.source); Matbench "
                                 "tasks use the official folds")
        elif self.task.startswith("matbench_") or not DATASET_NAME.fullmatch(self.task):
            raise ValueError(f"data.task {self.task!r} names your dataset: letters, digits, "
                             "'_', '.', '-', starting with a letter or digit, not with "
                             "'matbench_' (Matbench's)")
        if self.fold >= self.n_folds:
            raise ValueError(f"data.fold {self.fold} is out of range; allowed: "
                             f"0-{self.n_folds - 1}")
        return self  # whether the files exist is a preflight check

    @property
    def n_folds(self) -> int:
        return N_MATBENCH_FOLDS if self.source is None else self.outer_split.k

    @property
    def outer_split(self) -> SplitConfig:
        return self.split or SplitConfig()

    @property
    def spec(self) -> TaskSpec:
        """The task: Matbench's registry entry, or the one your data.source describes."""
        if self.source is None:
            return TASKS[self.task]
        s = self.source
        return TaskSpec(self.task, s.target, s.unit, s.kind, 0, s.log_target, custom=True)


class ModelConfig(_Strict):
    source: str = Field("small", description="'small' (MACE-MP-0 small), a name mace's "
                        "mace_mp downloads, a MACE model file, or chgnet / chgnet-<version>")
    init: Init = "pretrained"
    pooling: Pooling = "mean"
    head_hidden: list[int] = Field(default_factory=lambda: [256, 128])
    dtype: Literal["float32", "float64"] = "float32"
    target_transform: TargetTransform = "auto"
    init_seed: int = 0
    restrict_elements: bool = Field(
        False, description="run the backbone on the task's elements only: the same weights "
        "and results (matxfer.backbones.mace_elements); not faster on CPU in make bench, so off")
    kernels: Literal["e3nn", "cueq"] = Field(
        "e3nn", description="'cueq': compute with cuequivariance kernels (MACE only: "
        "matxfer.backbones.mace_cueq, the extra matxfer[cueq]); same weights and results")
    physics: PhysicsConfig | None = Field(
        None, description="zero-shot descriptors of the pretrained potential and how the "
        "model uses them (matxfer.physics)")

    @model_validator(mode="after")
    def _one_compute_path(self) -> ModelConfig:
        if self.kernels == "cueq" and self.restrict_elements:
            raise ValueError("model.kernels 'cueq' and model.restrict_elements cannot be "
                             "combined; choose one")
        if family_of(self.source) == "chgnet":
            chgnet_version(self.source)
        options = [name for name, used in (
            ("model.kernels 'cueq'", self.kernels == "cueq"),
            ("model.restrict_elements", self.restrict_elements),
            ("model.dtype 'float64'", self.dtype == "float64"),
            ("model.physics", self.physics is not None and self.physics.mode != "off")) if used]
        refusal = unsupported(self.source, options)
        if refusal:
            raise ValueError(refusal)
        return self  # whether cuequivariance is installed is a preflight check


class RegularizerConfig(_Strict):
    l2sp: float = Field(0.0, ge=0.0, description="L2-SP strength lambda")
    bss: float = Field(0.0, ge=0.0, description="BSS strength eta")
    bss_k: int = Field(1, ge=1, description="number of smallest singular values shrunk")


class TrainConfig(_Strict):
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(16, ge=2, description="structures per step (>= 2 for BSS)")
    max_batch_atoms: int | None = Field(
        None, ge=1, description="also close a batch before it exceeds this many atoms")
    max_batch_edges: int | None = Field(
        None, ge=1, description="also close a batch before it exceeds this many edges")
    lr: float = Field(1e-3, gt=0.0, description="head learning rate")
    backbone_lr: float | None = Field(3e-4, gt=0.0, description="default: lr")
    head_weight_decay: float = Field(1e-2, ge=0.0)
    backbone_weight_decay: float = Field(0.0, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0)
    grad_clip: float | None = Field(10.0, gt=0.0)
    patience: int | None = Field(None, ge=1, description="early-stopping patience in epochs")
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch intra-op threads")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: Literal["off", "inductor", "aot_eager", "eager"] = Field(
        "off", description="torch.compile the training step with this backend (inductor: "
        "generated kernels; aot_eager/eager: tracing checks, no speed-up); same results")
    prefetch_batches: int = Field(
        0, ge=0, description="batches built ahead in a background thread (on CUDA into pinned "
        "memory, copied non-blocking); same batches, same order; 0: built in the loop")


class StrategyConfig(_Strict):
    """Fine-tuning strategy besides the regularisers (see strategies.py); defaults: plain."""

    lp_epochs: int = Field(0, ge=0, description="LP-FT: head-only epochs on frozen features "
                                                "before fine-tuning (0: off)")
    lr_decay: float = Field(1.0, gt=0.0, le=1.0, description="block lr = backbone_lr x "
                                                             "decay^(depth from the top)")
    freeze_blocks: int = Field(0, ge=0, description="freeze the first k backbone blocks "
                                                    "(embedding, interaction 0, ...)")


class RunConfig(_Strict):
    """Everything that defines one fine-tune of one task and fold."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    regularizers: RegularizerConfig = Field(default_factory=RegularizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)

    @model_validator(mode="after")
    def _compile_on_the_e3nn_path(self) -> RunConfig:
        if self.train.compile != "off" and (self.model.kernels != "e3nn"
                                            or self.model.restrict_elements):
            raise ValueError(f"train.compile {self.train.compile!r} needs model.kernels 'e3nn' "
                             "and model.restrict_elements false")
        if self.train.compile != "off":
            refusal = unsupported(self.model.source, ["train.compile"])
            if refusal:
                raise ValueError(refusal)
        return self

    @model_validator(mode="after")
    def _lp_ft_without_physics_in_the_head(self) -> RunConfig:
        physics = self.model.physics
        if self.strategy.lp_epochs > 0 and physics is not None and physics.mode in (
                "features", "residual"):
            raise ValueError(
                f"strategy.lp_epochs {self.strategy.lp_epochs} (LP-FT) cannot be combined with "
                f"model.physics.mode {physics.mode!r}: the linear probe fits the head on pooled "
                "features alone; allowed: lp_epochs 0, or physics mode off or zero-shot")
        return self

    @model_validator(mode="after")
    def _no_decay_toward_zero_under_l2sp(self) -> RunConfig:
        if self.regularizers.l2sp > 0 and self.train.backbone_weight_decay > 0:
            raise ValueError(
                "train.backbone_weight_decay must be 0 while regularizers.l2sp > 0 "
                "(decay toward zero moves the L2-SP pull point away from the pretrained weights)"
            )
        return self


def derive(config: C, updates: Mapping[str, Any]) -> C:
    """A new config of `config`'s type: its values with the dotted `updates`, validated as a
    whole (every cross-field rule runs again); `config` itself is never changed. A derived
    config that breaks a rule raises UserError, one line."""
    tree = config.model_dump()
    for dotted, value in updates.items():
        _set_dotted(tree, dotted, value)
    try:
        return type(config).model_validate(tree)
    except ValidationError as err:
        raise UserError(f"invalid config: {format_validation_error(err)}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"config key {key!r} is not a section")
    node[leaf] = value


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: 'field.path: message (got value)'."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown config key"
        got = "" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"
        if isinstance(e.get("input"), dict):
            got = ""
        parts.append(f"{loc}: {msg}{got}" if loc else f"{msg}{got}")  # a rule across fields
    return "; ".join(parts)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; malformed files raise UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        tree = yaml.safe_load(path.read_text())
    except (UnicodeDecodeError, IsADirectoryError):
        raise UserError(f"config file {str(path)!r} is not a text file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {str(path)!r} is not valid YAML{where}") from None
    if tree is None:  # an empty file would silently start a full default run
        raise UserError(f"config file {str(path)!r} is empty; it must hold a mapping of "
                        "settings (see tune_configs/)")
    if not isinstance(tree, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping, got {type(tree).__name__}")
    return tree


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Build a RunConfig from an optional YAML file plus dotted overrides ('train.epochs': 2)."""
    tree = read_yaml(path) if path else {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise UserError(f"invalid config: {format_validation_error(err)}") from None


class ScalingSettings(_Strict):
    """Ray Train workers per trial: one per GPU with NCCL, or gloo CPU workers."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, gt=0.0)


class AshaSettings(_Strict):
    enabled: bool = True
    grace_period: int = Field(1, ge=1, description="epochs before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0)


class TrackingSettings(_Strict):
    """MLflow: uri None -> MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir."""

    enabled: bool = True
    uri: str | None = None
    experiment: str | None = Field(None, description="default: the task name")
    register_model: bool = Field(True, description="register each fold's model as matxfer-<task>")


class StudyConfig(_Strict):
    """A hyperparameter study per fold of one task: the run template plus the search."""

    name: str = Field("main", pattern=rf"^{NAME}$", description="variant name (a folder)")
    run: RunConfig = Field(default_factory=RunConfig)
    folds: list[int] | None = Field(None, description="default: every fold (Matbench 0-4, "
                                    "your data: 0 to split.k - 1)")
    search: SearchSpace = Field(default_factory=SearchSpace)
    num_samples: int = Field(16, ge=1, description="trials per fold")
    max_concurrent_trials: int = Field(1, ge=1)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    asha: AshaSettings = Field(default_factory=AshaSettings)
    seed: int = 0
    storage_path: str = Field("runs/ray", description="Ray results: local folder, NFS or s3://")
    output_dir: str = Field("runs/studies", description="results: <output_dir>/<task>/"
                            "<variant>/<fingerprint>/, one folder per distinct study")
    study_dir: str | None = Field(
        None, description="pin this study's result folder (instead of the fingerprint "
        "folder under output_dir); a study with other settings there is refused")
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    dashboard: bool = Field(
        False, description="start Ray's dashboard with a local Ray instance (always for DDP "
        "trials: Ray Train needs it); a cluster keeps its own")
    scheduling_timeout_s: float = Field(
        300.0, ge=30.0, description="stop with the reason (exit 2) when no trial's workers "
        "could be placed and no result arrived for this long, seconds")

    _requested_samples: int | None = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _resolved(cls, data: Any, handler) -> StudyConfig:
        """Defaults that depend on other settings come out of validation too: every fold
        when `folds` is absent, searched physics choices dropped when no trial uses physics,
        `num_samples` set to the trials a space of choices holds (each grid combination
        once); the requested count is kept for the plan."""
        study = handler(data)
        fills: dict[str, Any] = {}
        if study.folds is None:
            fills["folds"] = list(range(study.run.data.n_folds))
        search = study.search
        if not study._physics_used() and (search.descriptors or search.calibration):
            # a task config's physics choices under a variant without physics: no trial
            # would differ, so they are not searched (nor fingerprinted)
            search = search.model_copy(update={"descriptors": None, "calibration": None})
            fills["search"] = search.model_dump()
        cap = search.trial_cap()  # a grid runs each combination once: no more, no fewer
        if cap is not None and study.num_samples != cap:
            fills["num_samples"] = cap
        if not fills:
            return study
        resolved = handler({**study.model_dump(), **fills})
        if "num_samples" in fills:
            resolved._requested_samples = study.num_samples_requested
        return resolved

    @property
    def num_samples_requested(self) -> int:
        """num_samples as the config asked, before the cap of `_resolved`."""
        return self._requested_samples or self.num_samples

    def trial_config(self, fold: int, params: dict[str, Any]) -> RunConfig:
        """The run template with this fold and one proposal of the search, by validation."""
        return derive(self.run, {"data.fold": fold, **trial_updates(self.search, params)})

    @model_validator(mode="after")
    def _valid_folds(self) -> StudyConfig:
        k = self.run.data.n_folds
        if self.folds is None:  # filled by _resolved, which validates again
            return self
        bad = [f for f in self.folds if f not in range(k)]
        if bad or not self.folds or len(set(self.folds)) != len(self.folds):
            raise ValueError(f"folds must be distinct values in 0-{k - 1}, got {self.folds}")
        return self

    @model_validator(mode="after")
    def _physics_searchable(self) -> StudyConfig:
        physics = self.run.model.physics
        if not self._physics_used():  # unused choices are dropped by _resolved
            return self
        if family_of(self.run.model.source) != "mace":
            raise ValueError(unsupported(self.run.model.source, ["model.physics"]))
        if not (physics.descriptors or self.search.descriptors):
            raise ValueError("search.physics needs run.model.physics.descriptors or "
                             "search.descriptors; allowed: names from "
                             "matxfer.physics.config.DESCRIPTORS")
        return self

    def _physics_used(self) -> bool:
        """Whether some trial uses the physics descriptors (a mode, or a searched one)."""
        physics = self.run.model.physics
        return physics is not None and (physics.mode != "off" or bool(self.search.physics))

    def physics_to_compute(self) -> PhysicsConfig | None:
        """The physics settings whose descriptors the study's trials may read (the template's
        and every searched choice's), computed once by the driver; None when no trial uses
        physics."""
        physics, search = self.run.model.physics, self.search
        if not self._physics_used():
            return None
        names = list(dict.fromkeys([*physics.descriptors, *search.all_descriptors()]))
        return derive(physics, {"descriptors": names})

    @model_validator(mode="after")
    def _every_trial_valid(self) -> StudyConfig:
        for params in self.search.corners():
            try:
                self.trial_config(self.run.data.fold, params)
            except UserError as err:
                where = ", ".join(f"{k}={v}" for k, v in params.items() if not k.endswith("_on"))
                raise ValueError(f"search: a trial at {where} is not a valid run: "
                                 f"{str(err).removeprefix('invalid config: ')}") from None
        return self


def load_study_config(path: str | Path, overrides: dict[str, Any] | None = None,
                      variant: str = "main") -> StudyConfig:
    """A StudyConfig from YAML, a variant preset, then dotted overrides (CLI flags)."""
    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    tree = read_yaml(path)
    for dotted, value in VARIANTS[variant].items():
        _set_dotted(tree, dotted, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    try:
        study = StudyConfig.model_validate(tree)
    except ValidationError as err:
        raise UserError(f"invalid study config: {format_validation_error(err)}") from None
    return study


def load_run_section(path: str | Path) -> RunConfig:
    """The run section of a study YAML (one with `run:`), or a run YAML as it is."""
    if "run" in read_yaml(path):
        return load_study_config(path).run
    return load_config(path)
