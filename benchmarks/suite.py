"""The benchmark suite behind `make bench`: every figure is a ratio against a baseline measured
in the same command, on this machine. Writes benchmarks/results/bench_*.json and the table
between the bench markers of benchmarks/README.md.

    .venv/bin/python benchmarks/suite.py [--quick]

1. training throughput: matxfer loop (L2-SP + BSS on) vs the bare loop, same batches
2. forward-only feature extraction (the MI path) vs MACE's own forward, same batches
3. graph cache: build vs load of the same structures
4. study overhead: an extra trial vs a standalone `matxfer train`; training share (trial_cost.py)
5. memory: RSS of the dielectric graph cache, loaded and memory-mapped; mp_e_form projected
6. TorchScript warm-up: first training steps of a fresh process, profiling executor on vs off
7. element restriction: training with the backbone restricted to the task's elements vs full
8. edge-budget batches vs a fixed structure count, same mean batch
9. projection of the full programme's wall time from the measured rates (derived)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
HARDWARE = (f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"{__import__('os').cpu_count()} cores, CPU, torch {torch.__version__}, float32")


def _model_and_graphs(task: str):
    from matxfer.config import DataConfig, ModelConfig
    from matxfer.graphs import task_graphs
    from matxfer.model import build_model

    model = build_model(ModelConfig())
    graphs = task_graphs(DataConfig(task=task), model.graph_spec(), progress=False)
    return model, graphs


def forward_extraction(task: str, structures: int, batch_size: int = 64) -> dict:
    """matxfer's pooled per-layer features vs MACE's forward (energies, no forces)."""
    from matxfer.analysis.features import pooled_features
    from matxfer.graphs import iterate_batches

    model, graphs = _model_and_graphs(task)
    rows = list(range(min(structures, len(graphs))))
    pooled_features(model, graphs, rows[:batch_size], batch_size)  # TorchScript warm-up

    def ours() -> float:
        start = time.perf_counter()
        pooled_features(model, graphs, rows, batch_size)
        return len(rows) / (time.perf_counter() - start)

    @torch.no_grad()
    def mace() -> float:
        start = time.perf_counter()
        for batch in iterate_batches(graphs, rows, batch_size):
            n_graphs = batch["ptr"].numel() - 1  # keys MACE reads but needs only for stress
            batch["cell"] = torch.zeros(3 * n_graphs, 3, dtype=batch["positions"].dtype)
            batch["unit_shifts"] = torch.zeros_like(batch["shifts"])
            model.backbone(batch, training=False, compute_force=False)
        return len(rows) / (time.perf_counter() - start)

    mace()
    a, b = [], []
    for _ in range(2):
        b.append(mace())
        a.append(ours())
    return {"task": task, "structures": len(rows), "batch_size": batch_size,
            "matxfer_structures_per_s": a, "mace_forward_structures_per_s": b,
            "ratio_best": max(a) / max(b)}


def graph_cache(task: str, structures: int) -> dict:
    """Building graphs (neighbour lists) vs loading the cached GraphSet of the same rows."""
    from matxfer.datasets.matbench import load_task
    from matxfer.graphs import build_graph_set, load_graph_set, save_graph_set
    from matxfer.model import graph_spec, load_backbone

    bb = load_backbone("small", "pretrained", 0, torch.float32)
    df = load_task(task).iloc[:structures]
    spec = graph_spec(bb)  # float32
    start = time.perf_counter()
    graphs = build_graph_set(list(df.index), list(df["structure"]), df["target"].to_numpy(),
                             spec, progress=False)
    build_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.pt"
        save_graph_set(graphs, path)
        start = time.perf_counter()
        load_graph_set(path)
        load_s = time.perf_counter() - start
        size = path.stat().st_size
    return {"task": task, "structures": len(df), "build_structures_per_s": len(df) / build_s,
            "load_structures_per_s": len(df) / load_s, "ratio_load_vs_build": build_s / load_s,
            "bytes_per_structure": size / len(df)}


def study_share(result: dict) -> float:
    """share_training_or_evaluating of the many-trial study in a trial_cost result."""
    (many,) = [v for k, v in result.items() if k.startswith("study_") and isinstance(v, dict)]
    return many["share_training_or_evaluating"]


MEMORY_PROBE = """
import json, resource, sys, torch
from matxfer.graphs import load_graph_set
def rss():
    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024
base = rss()
path = sys.argv[1]
if sys.argv[2] == 'mmap':  # what matxfer does: pages come from the file on demand
    held = load_graph_set(__import__('pathlib').Path(path))
    n = len(held)
else:  # the baseline: the whole cache read into memory
    held = torch.load(path, map_location='cpu', weights_only=False)
    n = len(held['ids'])
print(json.dumps({'structures': n, 'rss_added': rss() - base}))
"""


def memory(task: str) -> dict:
    """RSS added by holding the task's graph cache in memory, and memory-mapped from disk;
    the mp_e_form (132,752 structures) figure is projected per structure (derived)."""
    from matxfer.tasks import TASKS

    _model_and_graphs(task)  # make sure the cache exists
    from matxfer.graphs import default_cache_dir

    path = max(default_cache_dir().glob(f"{task}-*.pt"), key=lambda p: p.stat().st_mtime)
    probes = {}
    for mode in ("load", "mmap"):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), mode],
                             capture_output=True, text=True, check=True)
        probes[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    n = probes["load"]["structures"]
    per = probes["load"]["rss_added"] / n
    big = TASKS["matbench_mp_e_form"].size
    return {"task": task, "structures": n, "file_bytes": path.stat().st_size,
            "rss_added_loaded": probes["load"]["rss_added"],
            "rss_added_mmap": probes["mmap"]["rss_added"],
            "ratio_mmap_vs_loaded": probes["mmap"]["rss_added"] / probes["load"]["rss_added"],
            "projected_mp_e_form_loaded_bytes": per * big,
            "projection_note": "derived: dielectric's bytes per structure x 132,752"}


WARMUP_PROBE = """
import json, sys, time, torch
if sys.argv[1] == 'off':
    torch._C._jit_set_profiling_executor(False)
torch.set_num_threads(int(sys.argv[3]))
from matxfer.config import DataConfig, ModelConfig
from matxfer.graphs import iterate_batches, task_graphs
from matxfer.model import build_model
model = build_model(ModelConfig())
graphs = task_graphs(DataConfig(task='matbench_jdft2d'), model.graph_spec(), progress=False)
opt = torch.optim.AdamW(model.parameters(), 1e-4)
times = []
for batch in iterate_batches(graphs, range(16 * int(sys.argv[2])), 16, shuffle=True, seed=1):
    start = time.perf_counter()
    pred, _ = model(batch)
    loss = (pred - batch['y'].to(pred.dtype)).abs().mean()
    opt.zero_grad(); loss.backward(); opt.step()
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def torchscript_warmup(steps: int = 16, repeats: int = 2, threads: int = 2) -> dict:
    """Per-step seconds of the first `steps` training steps (jdft2d, batch 16, shapes vary per
    batch) in fresh processes, with TorchScript's profiling executor (the default) and
    without it; processes alternate. Warm-up = the first 3 steps, steady = median of the rest."""
    runs: dict[str, list[list[float]]] = {"on": [], "off": []}
    for _ in range(repeats):
        for mode in runs:
            out = subprocess.run([sys.executable, "-c", WARMUP_PROBE, mode, str(steps),
                                  str(threads)], capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def summary(mode: str) -> dict:
        warm = [sum(t[:3]) for t in runs[mode]]
        steady = [sorted(t[3:])[len(t[3:]) // 2] for t in runs[mode]]
        return {"warmup_s": min(warm), "steady_step_s": min(steady)}

    on, off = summary("on"), summary("off")
    return {"steps": steps, "repeats": repeats, "per_step_s": runs, "on": on, "off": off,
            "ratio_warmup_off_vs_on": off["warmup_s"] / on["warmup_s"],
            "ratio_steady_off_vs_on": off["steady_step_s"] / on["steady_step_s"]}


def asha_epochs(max_epochs: int, grace: int, factor: float) -> float:
    """Expected epochs per trial under synchronous successive halving (a lower bound for
    Tune's asynchronous ASHA, which promotes earlier): rungs at grace·factor^k."""
    total, reached, start, rung = 0.0, 1.0, 0, grace
    while start < max_epochs:
        end = min(rung, max_epochs)
        total += (end - start) * reached
        start, rung, reached = end, rung * factor, reached / factor
    return total


def projection(train_rate: float, forward_rate: float, trials: int = 20, epochs: int = 40,
               gpu_rate: float = 600.0) -> dict:
    """Wall time of 9 tasks x 5 folds x `trials` trials from the measured CPU rates (derived)
    and an assumed per-GPU rate (an assumption until a GPU run replaces it)."""
    from matxfer.config import AshaSettings
    from matxfer.tasks import TASKS

    asha = AshaSettings()
    per_trial = {"no ASHA": float(epochs),
                 "ASHA": asha_epochs(epochs, asha.grace_period, asha.reduction_factor)}
    rows = []
    for label, trial_epochs in per_trial.items():
        # per fold: train 72% of the task, validate 8% every epoch, test 20% once
        work = sum(5 * trials * trial_epochs * (0.72 * t.size / train_rate
                                                + 0.08 * t.size / forward_rate)
                   + 5 * 0.2 * t.size / forward_rate for t in TASKS.values())
        cpu_h = work / 3600
        gpu_h = cpu_h * train_rate / gpu_rate
        rows.append({"schedule": label, "epochs_per_trial": round(trial_epochs, 2),
                     "this_machine_hours": cpu_h, "gpu_hours": gpu_h,
                     "wall_h_1_gpu": gpu_h, "wall_h_8_gpus": gpu_h / 8,
                     "wall_h_64_gpus": gpu_h / 64})
    return {"trials_per_fold": trials, "max_epochs": epochs, "gpu_rate_assumed": gpu_rate,
            "train_rate_measured": train_rate, "forward_rate_measured": forward_rate,
            "rows": rows}


def markdown(results: dict, command: str) -> str:
    t, f, g = results["throughput"], results["forward"], results["graph_cache"]
    s, m, p = results["study"], results["memory"], results["projection"]
    w, r, b = results["warmup"], results["restriction"], results["batching"]
    lines = [
        f"Measured by `{command}` on {HARDWARE}.", "",
        "| # | benchmark | measured | baseline (same command) | ratio |",
        "| --- | --- | --- | --- | --- |",
        f"| 1 | training, matxfer loop (L2-SP + BSS) | {max(t['matxfer_structures_per_s']):.1f} "
        f"structures/s | bare loop {max(t['bare_structures_per_s']):.1f} | "
        f"**{t['ratio_best']:.3f}** |",
        f"| 2 | forward-only pooled features (MI path) | "
        f"{max(f['matxfer_structures_per_s']):.1f} structures/s | MACE forward (energy) "
        f"{max(f['mace_forward_structures_per_s']):.1f} | **{f['ratio_best']:.2f}** |",
        f"| 3 | graph cache load | {g['load_structures_per_s']:.0f} structures/s | build "
        f"{g['build_structures_per_s']:.0f} | **{g['ratio_load_vs_build']:.0f}x** faster |",
        f"| 4 | study: cost of one extra 1-epoch trial | {s['extra_trial_s']:.1f} s | "
        f"standalone `matxfer train` {s['standalone_train_s']:.1f} s | "
        f"**{s['ratio_extra_trial_vs_standalone']:.2f}** |",
        f"| 4b | study: training + validation time | {study_share(s):.2f} of the wall time | "
        f"the whole study | **{study_share(s):.2f}** |",
        f"| 5 | RSS, {m['task']} graphs memory-mapped | {m['rss_added_mmap'] / 2**20:.0f} MiB | "
        f"loaded {m['rss_added_loaded'] / 2**20:.0f} MiB ({m['structures']} structures) | "
        f"**{m['ratio_mmap_vs_loaded']:.2f}** |",
        f"| 6 | first 3 training steps, profiling executor off | {w['off']['warmup_s']:.2f} s "
        f"(steady step {w['off']['steady_step_s']:.3f} s) | executor on (default) "
        f"{w['on']['warmup_s']:.2f} s (steady {w['on']['steady_step_s']:.3f} s) | "
        f"**{w['ratio_warmup_off_vs_on']:.2f}** (steady {w['ratio_steady_off_vs_on']:.2f}) |",
        f"| 7 | training, backbone restricted to the task's {r['elements_present']} elements "
        f"(float64 max abs diff: predictions {r['max_abs_diff_predictions_float64']:.0e}, "
        f"gradients {r['max_abs_diff_gradients_float64']:.0e}; one-off restrict "
        f"{r['restrict_seconds']:.1f} s) | "
        f"{max(r['restricted_structures_per_s']):.1f} structures/s | full "
        f"{r['elements_model']}-element model {max(r['full_structures_per_s']):.1f} | "
        f"**{r['ratio_best']:.2f}** |",
        f"| 8 | training, batches to an edge budget of {b['max_edges']} (largest batch "
        f"{b['edge_budget_edges_per_batch_max']} edges) | "
        f"{max(b['edge_budget_structures_per_s']):.1f} structures/s | fixed {b['batch_size']} "
        f"structures (largest batch {b['fixed_edges_per_batch_max']} edges) "
        f"{max(b['fixed_structures_per_s']):.1f} | **{b['ratio_best']:.2f}** |",
        "",
        f"Projected RSS of mp_e_form's graphs fully loaded: "
        f"{m['projected_mp_e_form_loaded_bytes'] / 2**30:.1f} GiB (derived from {m['task']}'s "
        f"bytes per structure).", "",
        f"**Projection (derived)** of the full programme: 9 tasks x 5 folds x "
        f"{p['trials_per_fold']} trials, up to {p['max_epochs']} epochs, from the measured "
        f"training rate ({p['train_rate_measured']:.1f} structures/s) and forward rate "
        f"({p['forward_rate_measured']:.1f}/s) of this machine; GPU rows assume "
        f"{p['gpu_rate_assumed']:.0f} training structures/s per GPU (an assumption, not "
        f"measured) and independent trials spread evenly over the GPUs.", "",
        "| schedule | epochs/trial | this machine (h) | GPU-hours | 1 GPU (h) | 8 GPUs (h) | "
        "64 GPUs (h) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in p["rows"]:
        lines.append(f"| {r['schedule']} | {r['epochs_per_trial']} | "
                     f"{r['this_machine_hours']:,.0f} | {r['gpu_hours']:,.0f} | "
                     f"{r['wall_h_1_gpu']:,.0f} | {r['wall_h_8_gpus']:,.1f} | "
                     f"{r['wall_h_64_gpus']:,.1f} |")
    return "\n".join(lines) + "\n"


def write_readme(table: str) -> None:
    readme = HERE / "README.md"
    text = readme.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start not in text:
        text += f"\n## `make bench`\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    readme.write_text(head + start + "\n" + table + end + rest.split(end, 1)[1])


def main() -> None:
    import batching
    import restriction
    import throughput
    import trial_cost

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller samples (about 5 min)")
    parser.add_argument("--force", action="store_true", help="run on a busy machine anyway")
    args = parser.parse_args()
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores and not args.force:  # other work would be measured, not matxfer
        parser.exit(2, f"suite.py: load average {load:.1f} on {cores} cores; the ratios need "
                       f"an idle machine (allowed: below {0.5 * cores:.1f}; --force to run)\n")
    n = 96 if args.quick else 320
    command = "make bench" + (" BENCH_ARGS=--quick" if args.quick else "")
    results = {
        "throughput": throughput.measure("matbench_phonons", n, 2 if args.quick else 3),
        "forward": forward_extraction("matbench_phonons", 2 * n),
        "graph_cache": graph_cache("matbench_dielectric", n),
        "study": trial_cost.measure(8 if args.quick else 16),
        "memory": memory("matbench_dielectric"),
        "warmup": torchscript_warmup(12 if args.quick else 16),
        "restriction": restriction.measure("matbench_phonons", n // 2, 2),
        "batching": batching.measure("matbench_phonons", n // 2),
    }
    results["projection"] = projection(max(results["throughput"]["matxfer_structures_per_s"]),
                                       max(results["forward"]["matxfer_structures_per_s"]))
    RESULTS.mkdir(exist_ok=True)
    for name, result in results.items():
        result = {**result, "command": command, "hardware": HARDWARE,
                  "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        (RESULTS / f"bench_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(results, command)
    write_readme(table)
    print(table)


if __name__ == "__main__":
    main()
