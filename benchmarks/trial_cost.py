"""What one trial of a study costs besides its training (issue 24), measured side by side in
one command on this machine:

    .venv/bin/python benchmarks/trial_cost.py [--trials 16]

1. a standalone `matxfer train` (fresh process: imports, model, one epoch, test pass, outputs)
2. `matxfer tune tune_configs/quickstart.yaml` with 1 and with 4 trials (1 epoch, 48
   structures, one trial at a time): the cost of each extra trial is (t4 - t1) / 3, and its
   ratio to (1) is the figure the issue bounds (target <= 0.5); (t16 - t1) / 15 with the
   16-trial study of (3) gives the same figure, steadier
3. a 16-trial study of the same size: the share of its wall time spent training or
   evaluating (target >= 0.5), and where each trial's time goes, from the per-epoch reports
   (model build, fold load, training epoch, validation, checkpoint + report) and the driver;
   the same study with MLflow tracking off gives MLflow's share of the driver's time

Every command runs as a user would run it (`.venv/bin/matxfer`), with its own output, Ray
storage and SQLite tracking store in a temporary folder; the graph cache is built once before
the timed runs. Writes benchmarks/results/trial_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent
ROOT = HERE.parent
MATXFER = str(Path(sys.executable).parent / "matxfer")
SIZE = ["--epochs", "1", "--max-structures", "48"]


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one command; its output is kept only when it fails."""
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return took


def study(trials: int, folder: Path, env: dict[str, str],
          config: str = "tune_configs/quickstart.yaml") -> float:
    return timed([MATXFER, "tune", config, *SIZE,
                  "--max-concurrent-trials", "1", "--num-samples", str(trials),
                  "--output-dir", str(folder / "studies"), "--storage-path",
                  str(folder / "ray")], {**env, "MLFLOW_TRACKING_URI":
                                         f"sqlite:///{folder / 'mlflow.db'}"})


def breakdown(folder: Path, wall: float) -> dict:
    """Per-trial means of the reported parts, and the share of the wall time spent training
    or evaluating (training epochs + validation passes of every trial)."""
    trials = [pd.read_csv(p) for p in folder.glob("ray/*/_trial_*/progress.csv")]
    n = len(trials)
    build = sum(t["model_build_s"].iloc[0] for t in trials)
    load = sum(t["data_load_s"].iloc[0] for t in trials)
    train_s = sum(t["seconds"].sum() for t in trials)
    val_s = sum(t["val_seconds"].sum() for t in trials)
    in_trials = sum(t["time_total_s"].max() for t in trials)  # each trial's own clock
    parts = {"model_build_s": build / n, "fold_load_s": load / n, "train_epochs_s": train_s / n,
             "validation_s": val_s / n,
             "checkpoint_and_report_s": (in_trials - build - load - train_s - val_s) / n,
             "driver_and_scheduling_s": (wall - in_trials) / n}
    return {"trials": n, "wall_s": round(wall, 2),
            "per_trial_s": {k: round(float(v), 3) for k, v in parts.items()},
            "share_training_or_evaluating": round(float((train_s + val_s) / wall), 3)}


def measure(trials: int = 16) -> dict:
    """Run the four measurements (about 6 minutes with 16 trials on 2 cores)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "MATXFER_CACHE": str(tmp / "cache")}
        train = [MATXFER, "train", "--task", "matbench_jdft2d", "--fold", "0", *SIZE, "--quiet"]
        timed([*train, "--out", str(tmp / "warm")], env)  # builds the graph cache, untimed
        standalone = timed([*train, "--out", str(tmp / "train")], env)
        one = study(1, tmp / "one", env)
        four = study(4, tmp / "four", env)
        many_wall = study(trials, tmp / "many", env)
        many = breakdown(tmp / "many", many_wall)
        untracked = tmp / "untracked.yaml"  # the same study with MLflow logging off
        untracked.write_text((ROOT / "tune_configs/quickstart.yaml").read_text()
                             + "tracking: {enabled: false}\n")
        quiet_wall = study(trials, tmp / "quiet", env, str(untracked))
    extra = (four - one) / 3
    return {
        "command": f"python benchmarks/trial_cost.py --trials {trials}",
        "standalone_train_s": round(standalone, 2), "study_1_trial_s": round(one, 2),
        "study_4_trials_s": round(four, 2), "extra_trial_s": round(extra, 2),
        "ratio_extra_trial_vs_standalone": round(extra / standalone, 3),
        # the same figure over 15 extra trials: steadier than over 3 on a noisy machine
        f"extra_trial_s_{trials}": round((many_wall - one) / (trials - 1), 2),
        f"ratio_extra_trial_vs_standalone_{trials}": round(
            (many_wall - one) / (trials - 1) / standalone, 3),
        f"study_{trials}_trials": many,
        f"study_{trials}_trials_tracking_off_s": round(quiet_wall, 2),
        "mlflow_logging_per_trial_s": round((many_wall - quiet_wall) / trials, 3),
        "targets": {"ratio_extra_trial_vs_standalone": "<= 0.5",
                    "share_training_or_evaluating": ">= 0.5"},
    }


# The measurement before any of this work (commit 29d2b0f, same machine and command):
# 1 trial 92.8 s, 4 trials 242.6 s, about 1.5 s of it training per trial.
BEFORE = {"study_1_trial_s": 92.8, "extra_trial_s": (242.6 - 92.8) / 3, "train_s": 1.5}
GPU_RATE = 600.0  # training structures/s per GPU: the assumption of make bench's projection
SHIPPED = {"matbench_jdft2d": 636, "matbench_mp_gap": 106_113}  # structures per task


def asha_epochs(trials: int, grace: int, factor: int, max_epochs: int) -> float:
    """Expected epochs summed over `trials` under ASHA: a fraction 1/factor of the trials
    reaching each rung (grace, grace*factor, ...) goes on; the rest stop there."""
    rungs, rung = [], grace
    while rung < max_epochs:
        rungs.append(rung)
        rung *= factor
    total, alive = 0.0, float(trials)
    for r in rungs:
        total += alive * (1 - 1 / factor) * r
        alive /= factor
    return total + alive * max_epochs


def gpu_projection(fixed_s: float, per_trial_s: float) -> dict:
    """Overhead share of one fold's study of each shipped GPU config (its trials, ASHA,
    epochs, concurrency on that many GPUs), training at GPU_RATE on 72% of the task (the
    training split less validation); overhead = the fixed per-study cost plus the per-trial
    cost measured here, taken as the same on a GPU node (CPU work: imports, Ray, files)."""
    from matxfer.config import load_study_config

    rows = {}
    for task, size in SHIPPED.items():
        study = load_study_config(HERE.parent / "tune_configs" / f"{task}.yaml")
        a, epochs = study.asha, study.run.train.epochs
        total = asha_epochs(study.num_samples, a.grace_period, a.reduction_factor, epochs)
        train = total * 0.72 * size / GPU_RATE / study.max_concurrent_trials
        overhead = fixed_s + study.num_samples * per_trial_s / study.max_concurrent_trials
        rows[task] = {"trials": study.num_samples, "gpus": study.max_concurrent_trials,
                      "asha_epochs": round(total, 1), "training_s": round(train, 1),
                      "overhead_s": round(overhead, 1),
                      "overhead_share": round(overhead / (overhead + train), 3)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    result = measure(parser.parse_args().trials)
    trained = sum(result[f"study_{parser.parse_args().trials}_trials"]["per_trial_s"][k]
                  for k in ("train_epochs_s", "validation_s"))
    before_fixed = BEFORE["study_1_trial_s"] - BEFORE["extra_trial_s"]
    after_fixed = result["study_1_trial_s"] - result["extra_trial_s"]
    result["gpu_projection"] = {
        "assumes": f"{GPU_RATE:g} training structures/s per GPU, one GPU per trial",
        "before": gpu_projection(before_fixed, BEFORE["extra_trial_s"] - BEFORE["train_s"]),
        "now": gpu_projection(after_fixed, max(0.0, result["extra_trial_s"] - trained))}
    (HERE / "results" / "trial_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
