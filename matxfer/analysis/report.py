"""`matxfer report`: the paper's Table 1 and Figure 1 panels from the MLflow runs of studies.

Table 1 per task: Matbench #1, MACE-RI (variant random-init), MACE-MP-0 without regularisers
(no-reg), MACE-MP-0 with searched L2-SP + BSS (main), JMP-S, and the relative improvements as
the paper defines them: (RI − MP0)/RI for regression, (MP0 − RI)/RI for classification, and
(JMP-S − MP0)/JMP-S. MP0 is the searched model. Tasks without runs show "-".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from matxfer.errors import UserError
from matxfer.tasks import TASKS

# published 5-fold means (Matbench v0.1 leaderboard; JMP-S from the JMP paper)
MATBENCH_TOP = {"matbench_jdft2d": (33.19, "MODNet"), "matbench_phonons": (28.76, "MegNet"),
                "matbench_dielectric": (0.2711, "MODNet")}
JMP_S = {"matbench_jdft2d": 30.16, "matbench_phonons": 22.77, "matbench_dielectric": 0.252}
VARIANT_COLUMNS = {"random-init": "MACE-RI", "no-reg": "MP0 (no reg)",
                   "main": "MP0 (L2-SP+BSS)"}
# strategies beyond the paper: a column each, shown when the experiment holds such runs
STRATEGY_COLUMNS = {"lp-ft": "MP0 LP-FT", "llrd": "MP0 LR decay", "freeze": "MP0 freeze",
                    "zero-shot": "MP0 physics zero-shot", "phys-features": "MP0 + physics "
                    "features", "phys-residual": "MP0 physics residual",
                    "phys-select": "MP0 physics (mode per fold)",
                    "chgnet": "CHGNet (L2-SP+BSS)", "chgnet-random": "CHGNet-RI"}
CURVE_KEYS = ("train_loss", "task_loss", "l2sp_term", "bss_term")
METRICS = ("mae", "rocauc")  # regression, classification


def stored_metric(task: str, values: dict) -> str | None:
    """The task's test metric name: Matbench's registry, else the one the run recorded
    (a user dataset's kind lives in its config, not in a registry)."""
    if task in TASKS:
        return TASKS[task].metric
    return next((m for m in METRICS if f"test_{m}" in values), None)


def stored_unit(task: str, unit: str | None) -> str:
    return TASKS[task].unit if task in TASKS else (unit or "")


COLUMNS = ["task", "variant", "metric", "unit", "fold", "test", "run_id", "experiment_id",
           "best_trial", "subset", "backbone", "backbone_params", "fingerprint", "study"]
NO_FINGERPRINT = "(no fingerprint)"  # results and runs written before fingerprints


def collect_runs(client, experiments: list[str],
                 fingerprints: list[str] | None = None) -> pd.DataFrame:
    """One row per fold parent run: task, variant, fold, test metric, run id, best trial,
    the study's fingerprint. Where one task and variant holds several studies, one is shown
    (see `pick_studies`)."""
    ids = []
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise UserError(f"--experiment {name!r} does not exist in the tracking store")
        ids.append(exp.experiment_id)
    rows = []
    for run in client.search_runs(ids, filter_string="tags.variant != ''", max_results=5000):
        tags, metrics = run.data.tags, run.data.metrics
        if "mlflow.parentRunId" in tags or "task" not in tags:
            continue
        name = stored_metric(tags["task"], metrics)
        metric = f"test_{name}"
        if metric in metrics:
            rows.append({"task": tags["task"], "variant": tags["variant"], "metric": name,
                         "unit": stored_unit(tags["task"], tags.get("unit")),
                         "fold": int(tags["fold"]), "test": metrics[metric],
                         "run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                         "best_trial": tags.get("best_trial", ""),
                         "subset": run.data.params.get("max_structures", "None") != "None",
                         "backbone": run.data.params.get("backbone", "small"),
                         "backbone_params": _int(run.data.params.get("backbone_params")),
                         **_study_of(tags.get("matxfer.fingerprint"), run.info.experiment_id),
                         "when": (run.info.start_time or 0) / 1000})
    return pick_studies(pd.DataFrame(rows, columns=[*COLUMNS, "when"]), fingerprints)


def _study_of(fingerprint: str | None, experiment_id: str) -> dict[str, str]:
    """A run's study: its fingerprint; runs from before fingerprints, one per experiment."""
    if fingerprint:
        return {"fingerprint": fingerprint, "study": fingerprint}
    return {"fingerprint": NO_FINGERPRINT, "study": f"{NO_FINGERPRINT} {experiment_id}"}


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "", "None") else None


def collect_results(results_dir: Path, fingerprints: list[str] | None = None) -> pd.DataFrame:
    """The same rows as `collect_runs`, from the files `matxfer tune` writes:
    <results_dir>/<task>/<variant>/<fingerprint>/fold<k>/result.json (no MLflow store
    needed; the older <task>/<variant>/fold<k>/ layout is read too). Where one task and
    variant holds several studies, one is shown (see `pick_studies`)."""
    import json

    if not results_dir.is_dir():
        raise UserError(f"--results {str(results_dir)!r} is not a folder; it should hold "
                        f"<task>/<variant>/<fingerprint>/fold<k>/result.json, as `matxfer "
                        "tune` writes")
    rows = []
    paths = [*results_dir.glob("*/*/*/fold[0-9]/result.json"),
             *results_dir.glob("*/*/fold[0-9]/result.json")]
    for path in sorted(paths):
        record = json.loads(path.read_text())
        name = stored_metric(record["task"], record)
        metric = f"test_{name}"
        rows.append({"task": record["task"], "variant": record["variant"], "metric": name,
                     "unit": stored_unit(record["task"], record.get("unit")),
                     "fold": int(record["fold"]), "test": float(record[metric]),
                     "run_id": record.get("mlflow_run_id", ""), "experiment_id": "",
                     "best_trial": record.get("trial_id", ""),
                     "subset": record.get("max_structures") is not None,
                     "study": str(path.parent.parent),
                     "fingerprint": record.get("fingerprint") or NO_FINGERPRINT,
                     "when": path.stat().st_mtime,
                     # records from before backbones were recorded: MACE-MP-0 small
                     "backbone": record.get("backbone", "small"),
                     "backbone_params": record.get("backbone_params")})
    if not rows:
        raise UserError(f"--results {str(results_dir)!r} holds no "
                        f"<task>/<variant>/<fingerprint>/fold<k>/result.json")
    return pick_studies(pd.DataFrame(rows), fingerprints)


def pick_studies(rows: pd.DataFrame, fingerprints: list[str] | None = None) -> pd.DataFrame:
    """One study per (task, variant), never the folds of several mixed in a cell: the one
    `fingerprints` names (a fingerprint or its first digits), else full data before subsets,
    then the most folds, then the newest; one line names it and the others. A fold run twice
    in one study counts once (the newest)."""
    wanted, used, keep, lines = list(fingerprints or []), set(), [], []
    for (task, variant), group in rows.groupby(["task", "variant"], sort=False):
        group = group.sort_values("when").drop_duplicates(["study", "fold"], keep="last")
        studies = group.groupby("study").agg(fingerprint=("fingerprint", "first"),
                                             subset=("subset", "max"), n=("fold", "nunique"),
                                             when=("when", "max"))
        studies = studies.sort_values(["subset", "n", "when"], ascending=[True, False, False])
        matches = {w: [s for s in studies.index if studies.at[s, "fingerprint"].startswith(w)]
                   for w in wanted}
        used.update(w for w, m in matches.items() if m)
        named = sorted({s for m in matches.values() for s in m})
        if len(named) > 1:
            raise UserError(f"--fingerprint picks {len(named)} studies of {task} [{variant}]: "
                            f"{', '.join(studies.loc[named, 'fingerprint'])}; name one per "
                            "task and variant")
        chosen = named[0] if named else studies.index[0]
        if len(studies) > 1:
            lines.append(_choice_line(task, variant, studies, chosen, bool(named)))
        keep.append(group[group["study"] == chosen])
    unknown = [w for w in wanted if w not in used]
    if unknown:
        found = sorted(f"{t} [{v}] {f}" for (t, v, f), _ in rows.groupby(
            ["task", "variant", "fingerprint"]))
        raise UserError(f"--fingerprint {unknown[0]!r} names no study here; studies: "
                        f"{'; '.join(found) or 'none'}")
    print(*lines, sep="\n", end="\n" if lines else "")
    return (pd.concat(keep) if keep else rows)[COLUMNS].reset_index(drop=True)


def _choice_line(task: str, variant: str, studies: pd.DataFrame, chosen: str,
                 picked: bool) -> str:
    def about(s: str, how: str = "") -> str:
        row = studies.loc[s]
        return (f"{row['fingerprint']} ({row['n']} fold{'s' if row['n'] > 1 else ''}"
                f"{', subset' if row['subset'] else ''}{how})")

    others = ", ".join(about(s) for s in studies.index if s != chosen)
    how = "; picked by --fingerprint" if picked else "; the most complete, then newest"
    return (f"report: {task} [{variant}]: showing study {about(chosen, how)}, not {others}; "
            "pick another with --fingerprint")


def _cell(values: pd.Series, subset: bool = False) -> str:
    """'mean ± std (folds)'; '*' marks runs on a subset of the task (not comparable)."""
    if values.empty:
        return "-"
    std = float(values.std(ddof=0)) if len(values) > 1 else 0.0
    return f"{values.mean():.4g} ± {std:.2g} ({len(values)}{', subset*' if subset else ''})"


def relative(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or not np.isfinite(a) or a == 0 else f"{(a - b) / a:+.1%}"


def table1(runs: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """Table 1 rows (strings, 'mean ± std (folds)'; '-' where there is nothing)."""
    rows = []
    columns = {**VARIANT_COLUMNS, **{v: c for v, c in STRATEGY_COLUMNS.items()
                                     if v in set(runs["variant"])}}
    for task in tasks:
        part = runs[runs["task"] == task]
        metric, unit = ((TASKS[task].metric, TASKS[task].unit) if task in TASKS
                        else (part["metric"].iloc[0], part["unit"].iloc[0]))
        means = {v: part.loc[part["variant"] == v, "test"] for v in columns}
        mean = {v: (float(s.mean()) if len(s) else None) for v, s in means.items()}
        top = MATBENCH_TOP.get(task)
        row = {"task": task, "metric": f"{metric} [{unit}]",
               "Matbench #1": f"{top[0]} ({top[1]})" if top else "-"}
        subset = part.groupby("variant")["subset"].any() if "subset" in part else {}
        row.update({col: _cell(means[v], bool(subset.get(v, False)))
                    for v, col in columns.items()})
        row["JMP-S"] = str(JMP_S[task]) if task in JMP_S else "-"
        ri, mp0 = mean["random-init"], mean["main"]
        if metric == "rocauc":  # higher is better: (MP0 − RI)/RI
            row["MP0 vs RI"] = "-" if ri is None or mp0 is None else f"{(mp0 - ri) / ri:+.1%}"
        else:
            row["MP0 vs RI"] = relative(ri, mp0)
        row["MP0 vs JMP-S"] = relative(JMP_S.get(task), mp0)
        if "fingerprint" in part:  # which study each cell shows
            shown = part.drop_duplicates("variant").set_index("variant")["fingerprint"]
            row["studies"] = "; ".join(f"{v} {shown[v]}" for v in columns
                                       if v in shown) or "-"
        rows.append(row)
    table = pd.DataFrame(rows)
    if not any(t in MATBENCH_TOP or t in JMP_S for t in tasks):  # your own data only
        table = table.drop(columns=["Matbench #1", "JMP-S", "MP0 vs JMP-S"])
    return table


def backbone_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per task and variant: the backbone, its trained parameters, 'mean ± std (folds)' and
    the per-fold test values (the comparison of foundation models on the same folds)."""
    rows = []
    for (task, variant), part in runs.groupby(["task", "variant"], sort=True):
        part = part.sort_values("fold")
        params = part["backbone_params"].dropna() if "backbone_params" in part else []
        rows.append({"task": task, "variant": variant,
                     "backbone": part["backbone"].iloc[0] if "backbone" in part else "-",
                     "parameters": f"{int(params.iloc[0]):,}" if len(params) else "-",
                     "study": part["fingerprint"].iloc[0] if "fingerprint" in part else "-",
                     "test": _cell(part["test"], bool(part["subset"].any())),
                     "per fold": " ".join(f"{k}:{v:.4g}" for k, v in zip(part["fold"],
                                                                        part["test"]))})
    return pd.DataFrame(rows, columns=["task", "variant", "backbone", "parameters", "study",
                                       "test", "per fold"])


def best_child_curves(client, runs: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch train/task loss and weighted regulariser terms of each fold's chosen trial."""
    frames = []
    for row in runs.itertuples():
        children = client.search_runs(
            [row.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{row.run_id}'")
        chosen = [c for c in children
                  if c.data.tags.get("matxfer.trial_id", "").endswith("/" + row.best_trial)]
        if not chosen:
            continue
        curves = {}
        for key in CURVE_KEYS:
            for m in client.get_metric_history(chosen[0].info.run_id, key):
                curves.setdefault(m.step, {})[key] = m.value
        frame = pd.DataFrame([{"epoch": s, **v} for s, v in sorted(curves.items())])
        frame = frame.reindex(columns=["epoch", *CURVE_KEYS])
        frames.append(frame.assign(task=row.task, variant=row.variant, fold=row.fold))
    columns = ["task", "variant", "fold", "epoch", *CURVE_KEYS]
    return pd.concat(frames)[columns] if frames else pd.DataFrame(columns=columns)


def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    from matxfer.tracking import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no MLflow store at {uri}; pass --tracking-uri or run from the "
                        f"folder holding mlflow.db")
    return MlflowClient(uri)


def to_markdown(table: pd.DataFrame) -> str:
    head = "| " + " | ".join(table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.to_numpy()]
    return "\n".join([head, rule, *body]) + "\n"


def build_report(experiments: list[str] | None, tasks: list[str] | None,
                 tracking_uri: str | None = None, results_dir: Path | None = None,
                 fingerprints: list[str] | None = None) -> dict[str, object]:
    """The report's files: table1.md/.csv, runs.csv and the Figure 1 panels (PNG bytes).
    From MLflow parent runs (`experiments`), or from result files (`results_dir`: Table 1
    and the per-fold panel; the training curves live in MLflow only). One study per task
    and variant: the one `fingerprints` names, else the most complete, then newest."""
    from matxfer.analysis import figures

    for task in tasks or []:  # Matbench's names are known before any work
        if task.startswith("matbench_") and task not in TASKS:
            raise UserError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}, or your "
                            "dataset's name")
    if results_dir is not None:
        runs = collect_results(results_dir, fingerprints)
        curves = pd.DataFrame(columns=["task", "variant", "fold", "epoch", *CURVE_KEYS])
    else:
        client = _client(tracking_uri)
        runs = collect_runs(client, experiments or [], fingerprints)
        curves = best_child_curves(client, runs)
    unknown = sorted(set(tasks or []) - set(runs["task"]) - set(TASKS))
    if unknown:
        raise UserError(f"--tasks {unknown[0]!r} has no finished runs here; tasks found: "
                        f"{', '.join(sorted(runs['task'].unique())) or 'none'}")
    tasks = tasks or sorted(runs["task"].unique())
    table = table1(runs, tasks)
    files: dict[str, object] = {
        "table1.md": to_markdown(table).encode(), "table1.csv": table, "runs.csv": runs,
        "backbones.md": to_markdown(backbone_table(runs)).encode(),
        "figure1_fold_metrics.png": figures.fold_metrics(runs, "test metric")}
    if len(curves):  # from MLflow only
        files["figure1_training_loss.png"] = figures.curves_by_task(
            curves, ["train_loss"], "training loss")
        files["figure1_regularizers.png"] = figures.curves_by_task(
            curves[curves["variant"] == "main"], ["l2sp_term", "bss_term"], "weighted term")
    return files
