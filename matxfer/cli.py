"""Command line: argument parsing only; one function call per subcommand."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from matxfer.config import VARIANTS
from matxfer.errors import StudyInterrupted, UserError


def _names(text: str) -> list[str]:
    """'a,b' -> ['a', 'b']"""
    return [name.strip() for name in text.split(",") if name.strip()]


# CLI flag -> dotted config path; every override goes through the same pydantic model.
TRAIN_FLAGS = {
    "task": ("data.task", str), "fold": ("data.fold", int),
    "max_structures": ("data.max_structures", int), "val_fraction": ("data.val_fraction", float),
    "data_dir": ("data.data_dir", str), "cache_dir": ("data.cache_dir", str),
    "model": ("model.source", str), "init": ("model.init", str),
    "pooling": ("model.pooling", str), "dtype": ("model.dtype", str),
    "target_transform": ("model.target_transform", str),
    "l2sp": ("regularizers.l2sp", float), "bss": ("regularizers.bss", float),
    "bss_k": ("regularizers.bss_k", int),
    "epochs": ("train.epochs", int), "batch_size": ("train.batch_size", int),
    "lr": ("train.lr", float), "backbone_lr": ("train.backbone_lr", float),
    "patience": ("train.patience", int), "seed": ("train.seed", int),
    "threads": ("train.threads", int), "device": ("train.device", str),
    "lp_epochs": ("strategy.lp_epochs", int), "lr_decay": ("strategy.lr_decay", float),
    "freeze_blocks": ("strategy.freeze_blocks", int),
    "compile": ("train.compile", str), "kernels": ("model.kernels", str),
    "physics": ("model.physics.mode", str), "descriptors": ("model.physics.descriptors", _names),
    "calibration": ("model.physics.calibration", str),
}

# `data check FILE`: the data section, from flags (names as in the YAML)
SOURCE_FLAGS = {"name": "task", "target": "source.target", "id_key": "source.id_key",
                "kind": "source.kind", "unit": "source.unit", "format": "source.format",
                "structure_column": "source.structure_column", "split": "split.method",
                "k": "split.k", "split_column": "split.column"}

TUNE_FLAGS = {
    "pooling": ("run.model.pooling", str),
    "num_samples": ("num_samples", int), "max_concurrent_trials": ("max_concurrent_trials", int),
    "num_workers": ("scaling.num_workers", int), "epochs": ("run.train.epochs", int),
    "max_structures": ("run.data.max_structures", int), "storage_path": ("storage_path", str),
    "output_dir": ("output_dir", str), "study_dir": ("study_dir", str),
    "compile": ("run.train.compile", str), "kernels": ("run.model.kernels", str),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2, no usage dump
        raise UserError(message)


FOUNDATION_HELP = ("the foundation model file the checkpoint started from, when it was not a "
                   "known name; checked against the checkpoint's sha256 before it is loaded")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="matxfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="fine-tune one task and fold")
    train.add_argument("--config", help="YAML run config (see tune_configs/)")
    for flag, (_, kind) in TRAIN_FLAGS.items():
        train.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind, default=None)
    train.add_argument("--out", required=True, help="output folder")
    train.add_argument("--overwrite", action="store_true", help="replace an existing result")
    train.add_argument("--quiet", action="store_true", help="no progress output")

    tune = sub.add_parser("tune", help="hyperparameter study per fold (Ray Tune + Optuna)")
    tune.add_argument("config", help="study YAML (tune_configs/<task>.yaml)")
    tune.add_argument("--variant", default="main",
                      help=" | ".join(VARIANTS) + " (see README: variants)")
    tune.add_argument("--folds", type=int, nargs="+", help="subset of the folds to run")
    for flag, (_, kind) in TUNE_FLAGS.items():
        tune.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind, default=None)
    tune.add_argument("--cpu", action="store_true",
                      help="gloo CPU workers even if the YAML asks for GPUs (locally at most "
                      "this machine's cores per worker)")
    tune.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    tune.add_argument("--dashboard", action="store_true", default=None,
                      help="start Ray's dashboard with the local Ray instance "
                      "(http://127.0.0.1:8265; always on for DDP trials)")
    tune.add_argument("--check", action="store_true",
                      help="check everything that can be checked without training, print the "
                      "plan, exit 0 when the study could start (2 otherwise)")

    pred = sub.add_parser("predict", help="predict new structures with fine-tuned model(s)")
    pred.add_argument("--model", required=True,
                      help="checkpoint file/folder, registered name@alias, or name (ensemble)")
    pred.add_argument("files", nargs="+", help="CIF, POSCAR, extxyz or pymatgen JSON files")
    pred.add_argument("--out", help="CSV file (default: standard output)")
    pred.add_argument("--batch-size", type=int, default=32)
    pred.add_argument("--foundation", metavar="PATH", help=FOUNDATION_HELP)

    add_analysis_parsers(sub)

    data = sub.add_parser("data", help="check your data; inspect Matbench tasks")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    folds = data_sub.add_parser("folds", help="official fold sizes (or ids with --json)")
    folds.add_argument("--task", required=True)
    folds.add_argument("--fold", type=int)
    folds.add_argument("--json", action="store_true", help="print the fold ids as JSON")
    data_sub.add_parser("tasks", help="list the Matbench structure tasks")
    check = data_sub.add_parser("check", help="a dataset card before any compute: counts, "
                                "elements, targets, duplicates, folds, cost")
    check.add_argument("source", help="a study or run YAML, or a data file (then --target)")
    for flag in SOURCE_FLAGS:
        check.add_argument("--" + flag.replace("_", "-"), dest=flag)
    check.add_argument("--skip-bad-rows", action="store_true", default=None)
    ckpt = sub.add_parser("checkpoint", help="matxfer checkpoint files")
    ckpt_sub = ckpt.add_subparsers(dest="checkpoint_command", required=True, parser_class=_Parser)
    convert = ckpt_sub.add_parser("convert", help="rewrite an old-format checkpoint in the "
                                  "current, safely loadable format (unpickles OLD: only files "
                                  "you trust; needs the foundation weights)")
    convert.add_argument("old", help="old checkpoint file or run folder")
    convert.add_argument("new", help="new .pt file, or a folder (gets checkpoint.pt)")
    convert.add_argument("--foundation", metavar="PATH", help="the foundation model file OLD "
                         "started from (else its model.source must be a known name)")
    return parser


def add_analysis_parsers(sub) -> None:
    analyze = sub.add_parser("analyze", help="what transferred: layer-wise MI, weight drift")
    kinds = analyze.add_subparsers(dest="analysis", required=True, parser_class=_Parser)
    mi = kinds.add_parser("mi", help="TransRate of pretrained and random-twin features per layer")
    mi.add_argument("--tasks", nargs="+", default=[], help="Matbench tasks")
    mi.add_argument("--data", nargs="+", default=[], metavar="CONFIG",
                    help="your own data: study or run YAMLs with a data.source section")
    mi.add_argument("--model", default="small", help="model.source: 'small', a mace name or "
                    "file, or chgnet[-<version>]")
    mi.add_argument("--pooling", default="mean", choices=["mean", "sum", "max", "mean+max"])
    mi.add_argument("--bins", type=int, default=10, help="quantile bins of regression targets")
    mi.add_argument("--eps2", type=float, default=1e-4, help="distortion ε²")
    mi.add_argument("--max-structures", type=int, help="seeded subset per task (default all)")
    mi.add_argument("--batch-size", type=int, default=64)
    mi.add_argument("--out", default="runs/analysis/mi", help="output folder")
    drift = kinds.add_parser("drift", help="weight drift and feature CKA of a fine-tuned model")
    source = drift.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="MLflow run id (fold parent run or trial child run)")
    source.add_argument("--checkpoint", help="matxfer checkpoint file or folder")
    drift.add_argument("--max-structures", type=int, default=500,
                       help="training-fold structures for CKA")
    drift.add_argument("--out", help="output folder (default runs/analysis/drift-<name>)")
    drift.add_argument("--foundation", metavar="PATH", help=FOUNDATION_HELP)
    drift.add_argument("--data", metavar="PATH", help="your data file the checkpoint was "
                       "trained on (instead of the path it records)")
    report = sub.add_parser("report", help="Table 1 and Figure 1 panels from MLflow runs")
    source = report.add_mutually_exclusive_group(required=True)
    source.add_argument("--experiment", nargs="+", help="MLflow experiment(s)")
    source.add_argument("--results", help="a study output_dir instead of MLflow: reads "
                        "<task>/<variant>/<fingerprint>/fold<k>/result.json (and older "
                        "<task>/<variant>/fold<k>/)")
    report.add_argument("--tasks", nargs="+", help="rows of the table (default: tasks found)")
    report.add_argument("--fingerprint", nargs="+", help="the study shown for a task and "
                        "variant that holds several (a fingerprint or its first digits; "
                        "default: the most complete, then newest)")
    report.add_argument("--out", default="runs/report", help="output folder")
    for parser in (mi, drift, report):
        parser.add_argument("--tracking-uri", help="MLflow URI ('off': no logging; default: "
                            "MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
        parser.add_argument("--experiment-name" if parser is not report else "--log-experiment",
                            dest="log_experiment", default="matxfer-analysis",
                            help="MLflow experiment the analysis run is logged to")


def cmd_analyze(args: argparse.Namespace) -> int:
    from matxfer.analysis import commands

    print(commands.run_mi(args) if args.analysis == "mi" else commands.run_drift(args))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from matxfer.analysis import commands

    print(commands.run_report(args))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from matxfer.config import load_config
    from matxfer.model_facts import keep_facts
    from matxfer.preflight import preflight_run
    from matxfer.run import run_finetune

    overrides = {path: getattr(args, flag) for flag, (path, _) in TRAIN_FLAGS.items()}
    cfg = load_config(args.config, overrides)
    facts = preflight_run(cfg)  # files, packages, devices: every problem at once, first
    record = run_finetune(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    keep_facts(facts, cfg.data.cache_dir)
    print(json.dumps(record, indent=2))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from matxfer.config import derive, load_study_config
    from matxfer.records import format_summary
    from matxfer.tune import attached_address, check_study, local_ray, run_study

    overrides = {path: getattr(args, flag) for flag, (path, _) in TUNE_FLAGS.items()}
    overrides["folds"] = args.folds
    overrides["dashboard"] = args.dashboard
    if args.cpu:
        overrides["scaling.use_gpu"] = False
    study = load_study_config(args.config, overrides, args.variant)
    cores = float(os.cpu_count() or 1)
    if args.cpu and not attached_address(args.address) and study.scaling.cpus_per_worker > cores:
        # a GPU config's loader CPUs, fitted to this machine (a derived, validated config)
        study = derive(study, {"scaling.cpus_per_worker": cores})
    if args.check:
        print(check_study(study, address=args.address))
        return 0
    with local_ray():
        table = run_study(study, address=args.address)
    print(format_summary(table, study))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from matxfer.predict import predict_files
    from matxfer.preflight import preflight_predict

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {args.batch_size}")
    preflight_predict(args.model)
    table = predict_files(args.model, args.files, args.batch_size, args.foundation)
    bad, good = table[table["error"] != ""], table[table["error"] == ""]
    if good.empty:  # one line: every file and why
        reasons = "; ".join(f"{row.file}: {row.error}" for row in bad.itertuples())
        raise UserError(f"nothing could be predicted from {len(table)} file(s): {reasons}")
    for row in bad.itertuples():
        print(f"matxfer: skipped {row.file}: {row.error}", file=sys.stderr)
    if args.out:
        table.to_csv(args.out, index=False)
    else:
        print(table.to_csv(index=False), end="")
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from matxfer.checkpoint import convert_checkpoint

    print(f"wrote {convert_checkpoint(args.old, args.new, args.foundation)}")
    return 0


def data_section(args: argparse.Namespace):
    """(DataConfig, ModelConfig) of `data check`: from a study/run YAML, or a file + flags."""
    from pathlib import Path

    from pydantic import ValidationError

    from matxfer.config import DataConfig, ModelConfig, format_validation_error, load_run_section

    path = Path(args.source)
    if path.suffix in (".yaml", ".yml"):
        run = load_run_section(path)
        return run.data, run.model
    tree: dict = {"task": args.name or re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem),
                  "source": {"path": str(path)}}
    for flag, dotted in SOURCE_FLAGS.items():
        value = getattr(args, flag)
        if value is not None and flag != "name":
            section, key = dotted.split(".")
            tree.setdefault(section, {})[key] = int(value) if flag == "k" else value
    if args.skip_bad_rows:
        tree["source"]["skip_bad_rows"] = True
    if "target" not in tree["source"]:
        raise UserError(f"data check {args.source!r}: a data file needs --target (the label's "
                        "key or column)")
    try:
        return DataConfig.model_validate(tree), ModelConfig()
    except ValidationError as err:
        raise UserError(f"invalid data flags: {format_validation_error(err)}") from None


def cmd_data(args: argparse.Namespace) -> int:
    from matxfer.datasets.matbench import N_FOLDS, official_fold
    from matxfer.tasks import TASKS, get_task

    if args.data_command == "check":
        from matxfer.datasets.card import check_dataset

        data, model = data_section(args)
        print(check_dataset(data, model).text())
        return 0
    if args.data_command == "tasks":
        for t in TASKS.values():
            print(f"{t.name:24s} {t.kind:14s} {t.size:7d}  {t.target} [{t.unit}]")
        return 0
    get_task(args.task)
    folds = [args.fold] if args.fold is not None else list(range(N_FOLDS))
    splits = {f"fold_{f}": dict(zip(("train", "test"), official_fold(args.task, f)))
              for f in folds}
    if args.json:
        print(json.dumps(splits))
    else:
        for name, s in splits.items():
            print(f"{args.task} {name}: train {len(s['train'])}  test {len(s['test'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import logging

    # MLflow announces creating/upgrading a SQLite store on stderr; errors stay one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    try:
        args = build_parser().parse_args(argv)
        return {"train": cmd_train, "tune": cmd_tune, "predict": cmd_predict,
                "analyze": cmd_analyze, "report": cmd_report, "data": cmd_data,
                "checkpoint": cmd_checkpoint}[args.command](args)
    except UserError as err:
        print(f"matxfer: error: {err}", file=sys.stderr)
        return 2
    except StudyInterrupted as err:
        print(f"matxfer: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("matxfer: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The `matxfer` command: main(), then exit without the interpreter's final garbage
    collection walking every object torch, mace and Ray created (about a second)."""
    import gc

    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
