"""The training loop under DDP (two gloo ranks in spawned processes, the real small model):
ranks step in lockstep under atom budgets, the LR schedule is exactly as long as the steps
taken, and a NaN loss on one rank stops every rank with the same message."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from matxfer.config import RunConfig, derive
from matxfer.model import build_model
from matxfer.run import prepare_fold


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, world: int, port: int, cfg_json: str, out: str, nan_rank: int) -> None:
    """One DDP rank: fit the tiny run; write the optimizer steps taken, the schedule's length
    and last factor, or the error message, to out/<rank>.txt."""
    import torch.distributed as dist

    import matxfer.train as train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = RunConfig.model_validate_json(cfg_json)
    model = build_model(cfg.model)
    data = prepare_fold(cfg, model, progress=False)
    steps, factors = [0], []
    original_step, original_call = torch.optim.AdamW.step, train.Objective.__call__

    def counting_step(self, *args, **kw):
        steps[0] += 1
        return original_step(self, *args, **kw)

    def nan_loss(self, model, batch):  # this rank's loss turns NaN (a test-only patch)
        loss, terms = original_call(self, model, batch)
        return loss * float("nan"), {**terms, "train_loss": float("nan")}

    torch.optim.AdamW.step = counting_step
    if rank == nan_rank:
        train.Objective.__call__ = nan_loss
    original_cosine = train.warmup_cosine

    def recording_cosine(optimizer, warmup, total):
        factors.append(total)
        return original_cosine(optimizer, warmup, total)

    train.warmup_cosine = recording_cosine
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    try:
        train.fit(ddp, data, cfg, rank=rank, world_size=world, log=None)
        text = f"steps {steps[0]} schedule {factors[0]}"
    except FloatingPointError as err:
        text = f"error {err}"
    Path(out, f"{rank}.txt").write_text(text)
    dist.destroy_process_group()


def _run_ranks(cfg: RunConfig, tmp_path: Path, nan_rank: int = -1) -> list[str]:
    model = build_model(cfg.model)
    prepare_fold(cfg, model, progress=False)  # build the graph cache once, before the ranks
    mp.spawn(_rank, args=(2, _free_port(), cfg.model_dump_json(), str(tmp_path), nan_rank),
             nprocs=2, join=True)
    return [Path(tmp_path, f"{r}.txt").read_text() for r in range(2)]


@pytest.fixture
def ddp_cfg(tiny_cfg):
    tiny_cfg = derive(tiny_cfg, {"model.head_hidden": [16], "train.threads": 1})
    return tiny_cfg


@pytest.mark.slow
def test_ddp_ranks_take_the_same_steps_under_an_atom_budget_and_the_schedule_matches(
        ddp_cfg, tmp_path):
    """An atom budget below the largest structure: batches vary in size with each epoch's
    order and one structure is alone in its batch; both ranks take the same number of
    steps (else DDP hangs), and the schedule is exactly that long."""
    ddp_cfg = derive(ddp_cfg, {"train.max_batch_atoms": 12, "train.epochs": 2})
    ranks = _run_ranks(ddp_cfg, tmp_path)
    assert ranks[0] == ranks[1] and ranks[0].startswith("steps"), ranks
    _, steps, _, schedule = ranks[0].split()
    assert int(steps) == int(schedule) > 0


@pytest.mark.slow
def test_a_nan_loss_on_one_ddp_rank_stops_every_rank_with_the_same_message(ddp_cfg, tmp_path):
    ddp_cfg = derive(ddp_cfg, {"train.epochs": 2})
    ranks = _run_ranks(ddp_cfg, tmp_path, nan_rank=1)
    assert ranks[0] == ranks[1] == "error training loss became nan at epoch 1", ranks
