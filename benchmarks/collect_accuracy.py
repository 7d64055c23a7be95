"""Copy an accuracy campaign's results into benchmarks/results/accuracy/<task>/ and print the
per-fold table for benchmarks/README.md.

    .venv/bin/python benchmarks/collect_accuracy.py runs/accuracy matbench_jdft2d

Reads <acc_dir>/studies/<task>/<variant>/fold<k>/result.json (what `matxfer tune` wrote),
the per-variant summary.json and matbench_results.json, <acc_dir>/report-<task>/ (what
`matxfer report` wrote) and the campaign log (wall time per fold).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

VARIANTS = ("main", "no-reg", "random-init")
COPIED = ("summary.json", "summary.csv", "matbench_results.json")


def collect(acc_dir: Path, task: str, dest: Path) -> list[dict]:
    """Copy the small result files; return one row per (variant, fold)."""
    rows = []
    for variant in VARIANTS:
        study = acc_dir / "studies" / task / variant
        target = dest / variant
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
    report = acc_dir / f"report-{task}"
    if report.is_dir():
        shutil.copytree(report, dest / "report", dirs_exist_ok=True)
    log = acc_dir / "logs" / f"{task}.log"
    if log.is_file():
        stamps = [line for line in log.read_text().splitlines() if line.startswith("[20")]
        (dest / "campaign_log.txt").write_text("\n".join(stamps) + "\n")
    return rows


def markdown(rows: list[dict]) -> str:
    metric = next(k for k in rows[0] if k.startswith("test_")).removeprefix("test_")
    lines = [f"| variant | fold | λ | η | best epoch | val {metric} | test {metric} |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (VARIANTS.index(r["variant"]), r["fold"])):
        lines.append(f"| {r['variant']} | {r['fold']} | {r['l2sp']:.2g} | {r['bss']:.2g} | "
                     f"{r['best_epoch']} | {r[f'val_{metric}']:.2f} | {r[f'test_{metric}']:.2f} |")
    return "\n".join(lines)


def wall_times(log: Path) -> str:
    """Seconds per fold and phase from the campaign log's stamped lines."""
    found = re.findall(r"fold (\d) (main|no-reg \+ random-init) done \((\d+) s\)", log.read_text())
    return ", ".join(f"fold {f} {phase} {s} s" for f, phase, s in found)


if __name__ == "__main__":
    acc, task = Path(sys.argv[1]), sys.argv[2]
    out = Path(__file__).parent / "results" / "accuracy" / task
    table = collect(acc, task, out)
    print(markdown(table))
    log = acc / "logs" / f"{task}.log"
    if log.is_file():
        print("\nwall:", wall_times(log))
