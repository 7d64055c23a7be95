"""The analysis subcommands: arguments -> computation -> files under --out -> an MLflow run."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pydantic import ValidationError

from matxfer.config import DataConfig, format_validation_error, load_run_section
from matxfer.errors import UserError
from matxfer.run import write_outputs


def tracking_target(args: argparse.Namespace) -> str | None:
    """The checked tracking URI, or None when logging is off ('--tracking-uri off')."""
    if args.tracking_uri == "off":
        return None
    from matxfer.tracking import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    check_reachable(uri)  # an unreachable server fails before any work
    return uri


def log_run(uri: str | None, experiment: str, name: str, out: Path, files: dict,
            params: dict, run_id: str | None = None) -> str | None:
    """Log `files` (already under `out`) on run `run_id`, or on a new run in `experiment`."""
    if uri is None:
        return None
    from matxfer.tracking import Tracker

    tracker = Tracker(uri, experiment)
    if run_id is None:
        run = tracker.call(tracker.client.create_run, tracker.experiment_id, run_name=name,
                           tags={"matxfer.analysis": name})
        tracker.log_params(run.info.run_id, params)
        tracker.log_files(run.info.run_id, {n: out / n for n in files})
        tracker.end_run(run.info.run_id)
        return run.info.run_id
    tracker.log_files(run_id, {n: out / n for n in files}, "analysis")
    return run_id


def check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"{name} must be a positive integer, got {value}")


def mi_datasets(tasks: list[str], configs: list[str]) -> list[DataConfig]:
    """The data sections of `analyze mi`: Matbench tasks by name, your data by config file."""
    if not tasks and not configs:
        raise UserError("analyze mi needs --tasks (Matbench) and/or --data CONFIG (your data)")
    datas = []
    for task in tasks:
        try:
            datas.append(DataConfig(task=task))
        except ValidationError as err:
            raise UserError(f"--tasks: {format_validation_error(err)}".replace(
                "config: ", "")) from None
    return datas + [load_run_section(path).data for path in configs]


def run_mi(args: argparse.Namespace) -> str:
    from matxfer.analysis.mi_analysis import analyze_mi

    check_positive("--max-structures", args.max_structures)
    check_positive("--batch-size", args.batch_size)
    if not args.eps2 > 0:
        raise UserError(f"--eps2 must be positive, got {args.eps2}")
    uri = tracking_target(args)
    result = analyze_mi(mi_datasets(args.tasks, args.data), args.model, args.pooling,
                        args.bins, args.eps2, args.max_structures, args.batch_size)
    table = result["table"]
    files = {"mi.json": {"settings": result["settings"], "rows": table.to_dict("records")},
             "mi.csv": table, "mi_heatmap.png": result["heatmap"]}
    out = Path(args.out)
    write_outputs(out, files)
    params = {k: str(v) for k, v in result["settings"].items() if k != "seconds"}
    run_id = log_run(uri, args.log_experiment, "transrate", out, files, params)
    shown = table.pivot_table(index=["task", "init"], columns="layer", values="normalized")
    return (f"normalised TransRate I(Z;Y)/H(Z):\n{shown.round(3).to_string()}\n"
            f"wrote {out}/mi.json, mi.csv, mi_heatmap.png" +
            (f"; MLflow run {run_id}" if run_id else ""))


def run_drift(args: argparse.Namespace) -> str:
    from matxfer.analysis.drift_analysis import analyze_drift, checkpoint_from_run, describe

    check_positive("--max-structures", args.max_structures)
    uri = tracking_target(args)
    if args.run and uri is None:
        raise UserError("--run needs MLflow: drop '--tracking-uri off' or use --checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            checkpoint = checkpoint_from_run(args.run, uri, Path(tmp))
        else:
            checkpoint = Path(args.checkpoint)
            if not checkpoint.exists():
                raise UserError(f"--checkpoint {args.checkpoint!r} does not exist")
        result = analyze_drift(checkpoint, args.max_structures, foundation=args.foundation,
                               data=args.data)
    name = args.run or Path(args.checkpoint).resolve().name.removesuffix(".pt")
    out = Path(args.out or f"runs/analysis/drift-{name}")
    files = {"drift.json": result["result"], "drift.png": result["png"]}
    write_outputs(out, files)
    run_id = log_run(uri, args.log_experiment, "drift", out, files,
                     {"checkpoint": str(args.checkpoint)}, run_id=args.run)
    return (describe(result) + f"\nwrote {out}/drift.json, drift.png" +
            (f"; MLflow run {run_id}" if run_id else ""))


def run_report(args: argparse.Namespace) -> str:
    from matxfer.analysis.report import build_report

    if args.tracking_uri == "off" and not args.results:
        raise UserError("report reads MLflow runs: '--tracking-uri off' is not allowed here "
                        "(or pass --results DIR)")
    files = build_report(args.experiment, args.tasks, args.tracking_uri,
                         Path(args.results) if args.results else None, args.fingerprint)
    out = Path(args.out)
    write_outputs(out, files)
    return files["table1.md"].decode() + f"\nwrote {out}: " + ", ".join(files)
