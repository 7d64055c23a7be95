"""A study's outcome per task and variant: the 5-fold summary, the Matbench record file
(the format the leaderboard takes, scored by matbench itself) and the console table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from matxfer.config import StudyConfig
from matxfer.datasets.matbench import load_task, official_fold
from matxfer.storage import atomic_write
from matxfer.tasks import get_task


def summarize(study: StudyConfig, out: Path, records: list[dict]) -> pd.DataFrame:
    """Per-fold table plus mean ± std of the test metric over every finished fold of the
    study in `out` (its fold<k>/result.json of the same fingerprint as `records`, this run's
    folds), written there with the folds it holds, with the Matbench record when complete."""
    spec = study.run.data.spec
    before = summary_folds(out)
    records = study_records(out, records)
    table = pd.DataFrame(records)
    test = table[f"test_{spec.metric}"].to_numpy()
    folds = [int(k) for k in table["fold"]]
    complete = (study.run.data.max_structures is None and not spec.custom
                and folds == list(range(5)))
    summary = {"task": spec.name, "variant": study.name, "metric": f"test_{spec.metric}",
               "fingerprint": records[0].get("fingerprint"),
               "matbench_record": "matbench_results.json" if complete else None,
               **({"matbench_record_note": "your own data: a Matbench record needs a Matbench "
                   "task and its official folds"} if spec.custom else {}),
               "unit": spec.unit, "folds": folds,
               "missing_folds": [k for k in range(study.run.data.n_folds) if k not in folds],
               "mean": float(np.mean(test)), "std": float(np.std(test)),
               "per_fold": records}
    gone = sorted(set(before) - set(folds))
    if gone:
        print(f"summary: {out / 'summary.json'} held fold{'s' * (len(gone) > 1)} "
              f"{', '.join(map(str, gone))}, which no result.json of this study holds any more; "
              f"it now holds fold(s) {', '.join(map(str, folds))}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "summary.csv", lambda fh: fh.write(table.to_csv(index=False).encode()))
    atomic_write(out / "summary.json",
                 lambda fh: fh.write((json.dumps(summary, indent=2) + "\n").encode()))
    if complete:  # matbench records (and validates) all five full folds, nothing less
        write_matbench_record(
            spec.name,
            {r.fold: pd.read_csv(out / f"fold{r.fold}" / "predictions.csv")
             for r in table.itertuples()},
            {r.fold: {"l2sp": r.l2sp, "bss": r.bss, "lr": r.lr, "variant": study.name}
             for r in table.itertuples()},
            out / "matbench_results.json", study.run.data.data_dir)
    return table


def study_records(out: Path, records: list[dict]) -> list[dict]:
    """Every finished fold of the study in `out`, by fold: `records` (this run's folds) and
    the fold<k>/result.json files of the same fingerprint that earlier runs wrote."""
    fingerprint = records[0].get("fingerprint") if records else None
    by_fold: dict[int, dict] = {}
    for path in sorted(out.glob("fold*/result.json")) if fingerprint else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            print(f"summary: {path} is unreadable; its fold is left out of the summary")
            continue
        if isinstance(record, dict) and record.get("fingerprint") == fingerprint:
            by_fold[int(record["fold"])] = record
    by_fold.update({int(r["fold"]): r for r in records})
    return [by_fold[k] for k in sorted(by_fold)]


def summary_folds(out: Path) -> list[int]:
    """The folds the summary in `out` holds (none when there is none or it is unreadable)."""
    try:
        return [int(k) for k in json.loads((out / "summary.json").read_text())["folds"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def write_matbench_record(task_name: str, folds: dict[int, pd.DataFrame], params: dict[int, dict],
                          path: Path, data_dir: str | None = None) -> None:
    """The record file MatbenchBenchmark writes (all 5 folds): test predictions by matbench id,
    scored by matbench itself against the study's own data (`data_dir`, as trained on).
    Gzip it for a leaderboard submission."""
    from matbench.bench import MatbenchBenchmark

    spec = get_task(task_name)
    mb = MatbenchBenchmark(autoload=False, subset=[task_name])
    task = mb.tasks_map[task_name]
    # matbench scores each recorded fold against its data frame: hand it ours (same ids and
    # rows) instead of letting it re-download with a hash check the offline copies don't pass
    frame = load_task(task_name, data_dir).rename(columns={"target": spec.target})
    if spec.kind == "classification":
        frame[spec.target] = frame[spec.target].astype(bool)
    task.df = frame
    for fold, preds in sorted(folds.items()):
        _, test_ids = official_fold(task_name, fold)
        by_id = preds.set_index("mbid")["prediction"]
        values = by_id.loc[test_ids].to_numpy()
        if spec.kind == "classification":
            values = values >= 0.5  # matbench records classes; ROC-AUC stays in our results
        task.record(fold, values.astype(float if spec.kind == "regression" else bool),
                    params=params[fold])
    tmp = path.with_name(path.name + ".partial")
    mb.to_file(str(tmp))
    os.replace(tmp, path)


def format_summary(table: pd.DataFrame, study: StudyConfig) -> str:
    spec = study.run.data.spec
    metric = f"test_{spec.metric}"
    lines = [f"{spec.name} [{study.name}]  ({metric}, {spec.unit})",
             f"{'fold':>4}  {'l2sp':>9}  {'bss':>9}  {'val':>9}  {'test':>9}"]
    for r in table.itertuples():
        lines.append(f"{r.fold:>4}  {r.l2sp:9.2e}  {r.bss:9.2e}  "
                     f"{getattr(r, f'val_{spec.metric}'):9.4f}  {getattr(r, metric):9.4f}")
    values = table[metric].to_numpy()
    lines.append(f"mean ± std over {len(values)} fold(s): {values.mean():.4f} ± {values.std():.4f}")
    return "\n".join(lines)
