"""Injected faults, each named: concurrent cache builders, truncated files."""

import subprocess
import sys

BUILD = """
import sys, torch
from matxfer.graphs import task_graphs
from matxfer.model import load_backbone
bb = load_backbone("small", "pretrained", 0, torch.float32)
g = task_graphs("matbench_jdft2d", [int(z) for z in bb.atomic_numbers], float(bb.r_max),
                torch.float32, sys.argv[1], progress=False)
print(len(g))
"""


def test_fault_two_processes_build_the_same_graph_cache_at_once(tmp_path):
    """Fault: two writers race on one cache file. Atomic rename: both finish, one intact file."""
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(cache)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert [o[0].strip().splitlines()[-1] for o in outs] == ["636", "636"]
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temporary file left behind
    from matxfer.graphs import load_graph_set

    assert len(load_graph_set(files[0])) == 636


def test_fault_truncated_checkpoint_is_refused_with_one_line(tmp_path, tiny_cfg, capsys):
    """Fault: a checkpoint cut in half (disk full, killed copy). predict refuses it, exit 2."""
    from matxfer.cli import main
    from matxfer.run import run_finetune

    tiny_cfg.train.epochs = 1
    run_finetune(tiny_cfg, tmp_path / "run", progress=False)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    (tmp_path / "x.cif").write_text("irrelevant")
    code = main(["predict", "--model", str(ckpt), str(tmp_path / "x.cif"),
                 "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "is not a matxfer checkpoint" in err and err.count("\n") == 1
    assert not (tmp_path / "p.csv").exists()
