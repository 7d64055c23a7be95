"""Every shipped config × every variant passes `matxfer tune --check`, and a study's identity
(fingerprint) decides what is reused. Configs and variants are found, not listed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from matxfer.cli import main
from matxfer.config import VARIANTS, load_config, load_study_config
from matxfer.datasets.matbench import local_data_file
from matxfer.errors import UserError
from matxfer.identity import claim_folder, fingerprint, study_settings
from matxfer.model import weights_file
from matxfer.preflight import download_reachable, matminer_url, preflight

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(ROOT.glob("tune_configs/**/*.yaml"))


def is_study(path: Path) -> bool:
    """Study YAMLs have a `run:` template; the others are single-run configs (train)."""
    return "run" in (yaml.safe_load(path.read_text()) or {})


STUDIES = [p for p in SHIPPED if is_study(p)]
RUNS = [p for p in SHIPPED if not is_study(p)]


def expected_problems(path: Path, cpu: bool) -> list[str]:
    """What this machine cannot offer the config: no CUDA, data neither here nor reachable,
    foundation weights neither here (../shared, MATXFER_MODEL, mace's cache) nor reachable."""
    study = load_study_config(path)
    problems = []
    task = study.run.data.task
    if study.run.data.source is not None:  # the example's own data ships in examples/
        assert (ROOT / study.run.data.source.path).is_file()
    elif local_data_file(task) is None and download_reachable(matminer_url(task)):
        problems.append(f"data for {task} is not on this machine")
    try:
        weights_file(study.run.model.source)
    except UserError:
        problems.append("cannot find or download MACE-MP-0")
    if study.scaling.use_gpu and not cpu and not torch.cuda.is_available():
        problems.append("scaling.use_gpu is true but this machine has no CUDA device")
    return problems


def test_the_shipped_configs_are_found():
    assert len(STUDIES) >= 10 and ROOT / "tune_configs/quickstart.yaml" in STUDIES
    assert len(VARIANTS) >= 7


@pytest.mark.parametrize("cpu", [False, True], ids=["as-shipped", "cpu"])
@pytest.mark.parametrize("path", STUDIES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_study_config_and_variant_passes_check(path, cpu, tmp_path, monkeypatch,
                                                             capsys):
    """`matxfer tune CONFIG --variant V --check` exits 0, or 2 naming exactly what this
    machine lacks (CUDA for the GPU configs, data not available offline), never a crash;
    nothing is written. Run from a fresh folder holding the shipped examples/ (the example
    configs name their data relative to where the user runs, the repository root)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    expected = expected_problems(path, cpu)
    for variant in VARIANTS:
        argv = ["tune", str(path), "--variant", variant, "--check"] + (["--cpu"] if cpu else [])
        code = main(argv)
        out, err = capsys.readouterr()
        assert f"[{VARIANTS[variant].get('name', 'main')}]" in out
        assert "fingerprint" in out and "folds" in out and "results" in out, out
        if not expected:
            assert code == 0 and out.rstrip().endswith("ok: the study can start"), err
            continue
        assert code == 2, out
        (line,) = err.strip().splitlines()
        problems = line.removeprefix("matxfer: error: ").split("; ")
        assert len(problems) == len(expected), line
        for needle in expected:
            assert needle in line, line
    assert list(tmp_path.iterdir()) == [tmp_path / "examples"]  # --check writes nothing


@pytest.mark.parametrize("path", RUNS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_run_config_loads(path):
    cfg = load_config(path)
    assert local_data_file(cfg.data.task) is not None


def test_first_trial_off_does_not_apply_under_variants_that_search_nothing_off(capsys):
    """The GPU configs ask for first_trial_off; under no-reg/llrd nothing can be off, and
    the plan says the flag does not apply instead of refusing the study."""
    path = ROOT / "tune_configs/matbench_jdft2d.yaml"
    assert main(["tune", str(path), "--variant", "llrd", "--cpu", "--check"]) == 0
    assert "first_trial_off does not apply" in capsys.readouterr().out
    assert main(["tune", str(path), "--cpu", "--check"]) == 0
    assert "first trial all off" in capsys.readouterr().out


QUICK = ROOT / "tune_configs/quickstart.yaml"


def settings_of(**overrides):
    study = load_study_config(QUICK, overrides)
    return study_settings(study, "d" * 64, "w" * 64)


def test_fingerprint_ignores_where_and_how_fast_but_not_what():
    base = fingerprint(settings_of())
    neutral = {"output_dir": "/x", "storage_path": "/y", "max_concurrent_trials": 7,
               "folds": [1, 2], "run.train.threads": 3, "tracking.uri": "http://h:5000",
               "scaling.cpus_per_worker": 4}
    assert fingerprint(settings_of(**neutral)) == base
    for change in ({"num_samples": 5}, {"run.train.epochs": 3}, {"seed": 1},
                   {"run.data.max_structures": 64}, {"search.bss.high": 0.5},
                   {"scaling.num_workers": 2}, {"run.model.init": "random"}):
        assert fingerprint(settings_of(**change)) != base, change
    other_data = study_settings(load_study_config(QUICK), "e" * 64, "w" * 64)
    assert fingerprint(other_data) != base


def test_a_pinned_study_dir_holding_another_study_is_refused_naming_the_fields(tmp_path,
                                                                               capsys):
    pinned = {"study_dir": str(tmp_path / "mine"), "output_dir": str(tmp_path / "out"),
              "storage_path": str(tmp_path / "ray")}
    first = preflight(load_study_config(QUICK, pinned)).ident
    claim_folder(first)
    args = ["tune", str(QUICK), "--study-dir", pinned["study_dir"], "--output-dir",
            pinned["output_dir"], "--storage-path", pinned["storage_path"]]
    assert main([*args, "--check"]) == 0  # same settings: the folder is ours
    capsys.readouterr()
    assert main([*args, "--epochs", "3", "--num-samples", "2", "--check"]) == 2
    err = capsys.readouterr().err
    assert "run.train.epochs: 2 -> 3" in err and "num_samples: 4 -> 2" in err
    assert len(err.strip().splitlines()) == 1


def test_check_compares_the_trial_shape_with_the_attached_clusters_nodes():
    """Two 1-CPU nodes hold the quickstart's 1-CPU workers; 3 workers x 2 CPUs never fit,
    and the plan says what each node offers."""
    study = load_study_config(QUICK)
    nodes = [{"name": "10.0.0.1", "resources": {"CPU": 1.0}},
             {"name": "10.0.0.2", "resources": {"CPU": 1.0}}]
    assert not preflight(study, nodes).problems
    big = load_study_config(QUICK, {"scaling.num_workers": 3, "scaling.cpus_per_worker": 2})
    (problem,) = preflight(big, nodes).problems
    assert "nodes offer" in problem and "10.0.0.2" in problem


def test_inside_a_ray_job_relative_locations_are_refused(monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    problems = preflight(load_study_config(QUICK)).problems
    assert [p.split()[0] for p in problems] == ["output_dir", "storage_path", "tracking"]
    pinned = load_study_config(QUICK, {"output_dir": "/shared/studies",
                                       "storage_path": "s3://bucket/matxfer",
                                       "tracking.uri": "http://mlflow.internal:5000"})
    assert not [p for p in preflight(pinned).problems if "Ray job" in p]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")  # as submit.sh passes
    unpinned_uri = load_study_config(QUICK, {"output_dir": "/shared/studies",
                                             "storage_path": "/shared/ray"})
    assert not [p for p in preflight(unpinned_uri).problems if "Ray job" in p]


def test_the_plan_says_how_a_trial_trains_one_worker_in_process_several_with_ddp():
    quick = ROOT / "tune_configs/quickstart.yaml"
    one = preflight(load_study_config(quick)).lines
    two = preflight(load_study_config(quick, {"scaling.num_workers": 2})).lines
    assert any("1 per trial x {CPU 1} (in the trial's own process)" in line for line in one)
    assert any("2 per trial x {CPU 1} (DDP, gloo)" in line for line in two)


def test_matbench_fingerprints_are_unchanged_by_the_own_data_sections():
    """data.source and data.split (absent for Matbench) leave a Matbench study's fingerprint
    as it was before they existed: finished studies are still found and skipped."""
    study = load_study_config(ROOT / "tune_configs/matbench_jdft2d.yaml")
    settings = study_settings(study, "a", "b")
    assert not any(k.startswith(("run.data.source", "run.data.split")) for k in settings)
    assert fingerprint(settings) == "efaa95cd9c7b"  # computed at commit 157ea84
