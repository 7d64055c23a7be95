"""Copy an accuracy campaign's results into benchmarks/results/accuracy/<task>/, build Table 1
from them (`matxfer report --results`) and print the per-fold and per-variant tables for
benchmarks/README.md.

    .venv/bin/python benchmarks/collect_accuracy.py runs/accuracy matbench_jdft2d [RESULTS_ROOT]

Reads <acc_dir>/studies/<task>/<variant>/<fingerprint>/fold<k>/result.json (what `matxfer tune`
wrote; the study with the most finished folds per variant, or the older layout without a
fingerprint folder), the
per-variant summary.json and matbench_results.json, and the campaign log (wall time per fold
and phase, appended to the stamps already collected).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np

ORDER = ("main", "no-reg", "random-init", "lp-ft", "llrd", "freeze", "pooling", "zero-shot",
         "phys-features", "phys-residual")
COPIED = ("summary.json", "summary.csv", "matbench_results.json")


def collect(acc_dir: Path, task: str, dest: Path) -> list[dict]:
    """Copy the small result files of every variant; return one row per (variant, fold)."""
    rows = []
    for variant in sorted((acc_dir / "studies" / task).iterdir()):
        study = study_of(variant)
        target = dest / variant.name
        target.mkdir(parents=True, exist_ok=True)
        for name in COPIED:
            if (study / name).is_file():
                shutil.copy(study / name, target / name)
        for fold_dir in sorted(study.glob("fold*")):
            for name in ("result.json", "trials.csv", "predictions.csv"):
                if (fold_dir / name).is_file():
                    (target / fold_dir.name).mkdir(exist_ok=True)
                    shutil.copy(fold_dir / name, target / fold_dir.name / name)
            if (fold_dir / "result.json").is_file():
                rows.append(json.loads((fold_dir / "result.json").read_text()))
    log = acc_dir / "logs" / f"{task}.log"
    if log.is_file():
        kept = dest / "campaign_log.txt"
        old = kept.read_text().splitlines() if kept.is_file() else []
        new = [line for line in log.read_text().splitlines() if line.startswith("[20")]
        kept.write_text("\n".join(dict.fromkeys(old + new)) + "\n")
    return rows


def study_of(variant: Path) -> Path:
    """The fingerprint folder with the most finished folds (the variant folder itself for
    results written before fingerprints)."""
    studies = [d for d in variant.iterdir() if (d / "study.json").is_file()]
    if not studies:
        return variant
    return max(studies, key=lambda d: (len(list(d.glob("fold*/result.json"))),
                                       d.stat().st_mtime))


def _rank(variant: str) -> int:
    return ORDER.index(variant) if variant in ORDER else len(ORDER)


def _strategy(r: dict) -> str:
    parts = [f"LP {r['lp_epochs']} ep" if r.get("lp_epochs") else "",
             f"decay {r['lr_decay']:.2f}" if r.get("lr_decay", 1.0) != 1.0 else "",
             f"freeze {r['freeze_blocks']}" if r.get("freeze_blocks") else ""]
    return ", ".join(p for p in parts if p) or "-"


def markdown(rows: list[dict]) -> str:
    metric = next(k for k in rows[0] if k.startswith("test_")).removeprefix("test_")
    lines = [f"| variant | fold | λ | η | strategy | pooling | best epoch | val {metric} | "
             f"test {metric} |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (_rank(r["variant"]), r["fold"])):
        lines.append(f"| {r['variant']} | {r['fold']} | {r['l2sp']:.2g} | {r['bss']:.2g} | "
                     f"{_strategy(r)} | {r.get('pooling', 'mean')} | {r['best_epoch']} | "
                     f"{r[f'val_{metric}']:.2f} | {r[f'test_{metric}']:.2f} |")
    return "\n".join(lines)


def means(rows: list[dict]) -> str:
    """Mean ± std (population, as matbench) of the test metric per variant, over its folds."""
    metric = next(k for k in rows[0] if k.startswith("test_"))
    lines = [f"| variant | folds | {metric} mean ± std |", "| --- | --- | --- |"]
    for variant in sorted({r["variant"] for r in rows}, key=_rank):
        part = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["fold"])
        values = np.array([r[metric] for r in part])
        lines.append(f"| {variant} | {', '.join(str(r['fold']) for r in part)} | "
                     f"{values.mean():.2f} ± {values.std():.2f} |")
    return "\n".join(lines)


def wall_times(log: Path) -> str:
    """Seconds per fold and phase from the campaign log's stamped lines."""
    found = re.findall(r"fold (\d) (.+?) done \((\d+) s\)", log.read_text())
    return ", ".join(f"fold {f} {phase} {s} s" for f, phase, s in found)


def report(results: Path, task: str) -> str:
    """Table 1 of `matxfer report --results` over the collected files."""
    from matxfer.analysis.report import build_report
    from matxfer.run import write_outputs

    files = build_report(None, [task], results_dir=results)
    write_outputs(results / task / "report", files)
    return files["table1.md"].decode()


if __name__ == "__main__":
    acc, task = Path(sys.argv[1]), sys.argv[2]
    # optional third argument: another results root (a campaign at another budget)
    results = Path(sys.argv[3]) if len(sys.argv) > 3 else \
        Path(__file__).parent / "results" / "accuracy"
    table = collect(acc, task, results / task)
    print(markdown(table), "", means(table), "", report(results, task), sep="\n")
    log = results / task / "campaign_log.txt"
    if log.is_file():
        print("wall:", wall_times(log))
