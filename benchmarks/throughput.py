"""Training throughput of matxfer's loop against a bare loop of the same model, same batches.

    .venv/bin/python benchmarks/throughput.py [--task matbench_phonons] [--structures 320]

Bare loop: forward, L1 loss, backward, AdamW step: nothing else. matxfer loop: `train_epoch`
with both regularisers on (L2-SP over every backbone weight, BSS on the last layer's pooled
features), gradient clipping and the LR schedule. Both iterate the same seeded batches of the
same official training fold and collate inside the timed loop. Passes alternate
(bare, matxfer, bare, matxfer, ...) so drift in machine load hits both; the best pass of each
is compared. Writes benchmarks/results/throughput_<task>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from matxfer.config import load_config
from matxfer.graphs import iterate_batches
from matxfer.model import build_model
from matxfer.run import prepare_fold
from matxfer.train import Objective, make_optimizer, train_epoch, warmup_cosine


def bare_pass(model, data, cfg, rows, seed) -> float:
    """Structures per second of the plainest possible fine-tuning step."""
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    n, start = 0, time.perf_counter()
    for batch in iterate_batches(data.graphs, rows, cfg.train.batch_size, shuffle=True, seed=seed):
        out, _ = model(batch)
        loss = torch.nn.functional.l1_loss(out, data.scaler.encode(batch["y"]).to(out.dtype))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n += batch["ptr"].numel() - 1
    return n / (time.perf_counter() - start)


def matxfer_pass(model, data, cfg, seed) -> float:
    objective = Objective(model, cfg, data.spec, data.scaler)
    optimizer = make_optimizer(model, cfg)
    scheduler = warmup_cosine(optimizer, 1, 10_000)
    # train_epoch seeds its shuffle with seed*100_003 + epoch: pick epoch so both loops agree
    metrics = train_epoch(model, objective, optimizer, scheduler, data, cfg,
                          epoch=seed - cfg.train.seed * 100_003, device="cpu",
                          rank=0, world_size=1)
    return metrics["structures_per_s"]


def measure(task: str = "matbench_phonons", structures: int = 320, repeats: int = 3,
            batch_size: int = 16) -> dict:
    """Both loops over the same batches, passes alternating; the result record."""
    cfg = load_config(overrides={"data.task": task, "train.batch_size": batch_size,
                                 "regularizers.l2sp": 1e-4, "regularizers.bss": 1e-3})
    model = build_model(cfg.model)
    data = prepare_fold(cfg, model, progress=False)
    rows = data.rows["train"][:structures]
    data.rows["train"] = rows
    seed = cfg.train.seed * 100_003 + 1
    warm = copy.deepcopy(model)
    bare_pass(warm, data, cfg, rows[: 4 * batch_size], seed)  # TorchScript warm-up
    bare, ours = [], []
    for _ in range(repeats):
        bare.append(bare_pass(copy.deepcopy(model), data, cfg, rows, seed))
        ours.append(matxfer_pass(copy.deepcopy(model), data, cfg, seed))
    return {
        "benchmark": "training throughput, matxfer loop (L2-SP + BSS on) vs bare loop",
        "command": f"python benchmarks/throughput.py --task {task} --structures {structures} "
                   f"--repeats {repeats} --batch-size {batch_size}",
        "task": task, "structures_per_pass": len(rows), "batch_size": batch_size,
        "bare_structures_per_s": bare, "matxfer_structures_per_s": ours,
        "ratio_best": max(ours) / max(bare),
        "hardware": f"{platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} torch threads, CPU, float32",
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="matbench_phonons")
    parser.add_argument("--structures", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    result = measure(args.task, args.structures, args.repeats, args.batch_size)
    out = Path(__file__).parent / "results" / f"throughput_{args.task}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
