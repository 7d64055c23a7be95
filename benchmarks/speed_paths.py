"""The speed paths of issue #9 on one device, each against the plain e3nn loop in the same
process: cuequivariance kernels, torch.compile, prefetched (pinned, non-blocking) batches,
element restriction, edge-budget batches. Written for a lent GPU; runs on CPU too.

    .venv/bin/python benchmarks/speed_paths.py --device cuda --task matbench_phonons \\
        --structures 640 --out benchmarks/results/speed_paths_cuda.json
    .venv/bin/python benchmarks/speed_paths.py --device cpu --structures 48 --epochs 2 \\
        --variants e3nn prefetch compile_eager     # a dry run of the script itself

Every variant runs matxfer's own training epoch (`train.train_epoch`: L1 loss, L2-SP + BSS on,
AdamW, warm-up + cosine) over the same training rows from the same seeded start. Reported per
variant: structures/s of each epoch after the first (which warms up: TorchScript, Dynamo,
cuequivariance's kernels), the ratio of the best to the e3nn loop's best, and the largest
difference of its validation predictions from the e3nn model's before and after training
(the "same results" check, the second through every step of the path; run with --dtype
float64 for the issue's 1e-5 bar).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from matxfer.config import load_config
from matxfer.model import build_model
from matxfer.run import prepare_fold
from matxfer.train import (
    Objective,
    compiled,
    make_optimizer,
    predict,
    schedule_steps,
    train_epoch,
    warmup_cosine,
)

VARIANTS = {
    "e3nn": {},
    "cueq": {"model.kernels": "cueq"},
    "compile": {"train.compile": "inductor"},
    "compile_eager": {"train.compile": "eager"},  # tracing only: checks the path, not speed
    "prefetch": {"train.prefetch_batches": 2},
    "restrict": {"model.restrict_elements": True},
    "edge_budget": {},  # max_batch_edges = batch_size x the mean edge count, set in measure()
}


def _config(task: str, structures: int, epochs: int, device: str, dtype: str, extra: dict):
    return load_config(overrides={
        "data.task": task, "data.max_structures": structures, "data.val_fraction": 0.2,
        "train.epochs": epochs, "train.batch_size": 16, "train.device": device,
        "model.dtype": dtype, "regularizers.l2sp": 1e-3, "regularizers.bss": 1e-3, **extra})


def run_variant(name: str, task: str, structures: int, epochs: int, device: str,
                dtype: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """(record, validation predictions before and after training) of one variant."""
    extra = dict(VARIANTS[name])
    cfg = _config(task, structures, epochs, device, dtype, extra)
    if name == "edge_budget":
        probe = build_model(cfg.model)
        data = prepare_fold(cfg, probe, progress=False)
        mean_edges = float(data.graphs.n_edges[data.rows["train"]].float().mean())
        extra = {"train.max_batch_edges": int(16 * mean_edges), "train.batch_size": 64}
        cfg = _config(task, structures, epochs, device, dtype, extra)
    start = time.perf_counter()
    model = build_model(cfg.model, for_compile=cfg.train.compile != "off")
    data = prepare_fold(cfg, model, progress=False)
    model.to(device)
    setup = time.perf_counter() - start
    _, before = predict(model, data, "val", 32, device)
    objective = Objective(model, cfg, data.spec, data.scaler)
    optimizer = make_optimizer(model, cfg)
    steps = schedule_steps(data, cfg.train, 1)  # cfg.train.epochs == epochs
    scheduler = warmup_cosine(optimizer, min(steps, steps // epochs), steps)
    step_model = model if cfg.train.compile == "off" else compiled(model, cfg.train.compile)
    rates = []
    for epoch in range(1, epochs + 1):
        row = train_epoch(step_model, objective, optimizer, scheduler, data, cfg, epoch,
                          torch.device(device), 0, 1)
        rates.append(row["structures_per_s"])
    _, after = predict(model, data, "val", 32, device)
    record = {"overrides": extra, "setup_s": setup, "structures_per_s": rates,
              "n_train": len(data.rows["train"])}
    if device == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return record, before, after


def measure(variants: list[str], task: str, structures: int, epochs: int, device: str,
            dtype: str, out_path: Path | None = None) -> dict:
    """Every variant against the e3nn loop; the record is rewritten after each variant, so a
    run stopped at a time limit keeps what it measured."""
    out: dict = {"task": task, "structures": structures, "epochs": epochs, "device": device,
                 "dtype": dtype, "torch": torch.__version__, "host": platform.machine(),
                 "threads": torch.get_num_threads(), "variants": {}}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    base = None
    for name in ["e3nn", *[v for v in variants if v != "e3nn"]]:
        record, before, after = run_variant(name, task, structures, epochs, device, dtype)
        if base is None:
            base = (max(record["structures_per_s"][1:] or record["structures_per_s"]), before,
                    after)
        best = max(record["structures_per_s"][1:] or record["structures_per_s"])
        record["ratio_vs_e3nn"] = best / base[0]
        record["max_abs_pred_diff_vs_e3nn"] = float(np.abs(before - base[1]).max())
        # after the same epochs on the same batches (edge_budget's batches differ by design)
        record["max_abs_pred_diff_after_training"] = float(np.abs(after - base[2]).max())
        out["variants"][name] = record
        print(f"{name:14s} {best:8.1f} structures/s  ratio {record['ratio_vs_e3nn']:.3f}  "
              f"pred diff {record['max_abs_pred_diff_vs_e3nn']:.2e} before, "
              f"{record['max_abs_pred_diff_after_training']:.2e} after training", flush=True)
        if out_path:
            out_path.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="matbench_phonons")
    parser.add_argument("--structures", type=int, default=640)
    parser.add_argument("--epochs", type=int, default=3, help="the first one warms up")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=["cueq", "compile", "prefetch", "restrict", "edge_budget"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "speed_paths.py: --device cuda but no CUDA device; use --device cpu\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    measure(args.variants, args.task, args.structures, args.epochs, args.device, args.dtype,
            args.out)
