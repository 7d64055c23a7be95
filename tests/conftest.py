"""Shared fixtures: the real MACE-MP-0 small model, real Matbench data, a per-session cache."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

# Tests build many short-lived models: skip most TorchScript profiling warm-up.
torch._C._jit_set_profiling_executor(False)


# The environment the session started with (the user's). In-process code changes os.environ
# for good: importing mace sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, scikit-learn
# KMP_DUPLICATE_LIB_OK, ray.init RAY_AUTH_MODE, mlflow.set_tracking_uri MLFLOW_TRACKING_URI,
# inductor its cache folder; every `matxfer` subprocess a later test starts would inherit them.
SESSION_ENV = dict(os.environ)


@pytest.fixture(scope="session", autouse=True)
def graph_cache_dir(tmp_path_factory):
    """Keep graph caches of the test session out of the user's cache folder."""
    path = tmp_path_factory.mktemp("graph-cache")
    old = os.environ.get("MATXFER_CACHE")
    os.environ["MATXFER_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MATXFER_CACHE", None)
    else:
        os.environ["MATXFER_CACHE"] = old


@pytest.fixture(scope="module", autouse=True)
def session_environment(graph_cache_dir):
    """Each test file starts from the session's environment plus its graph cache, so nothing
    an earlier file's code set reaches this file's processes (pytest's own PYTEST_* kept)."""
    own = {k: v for k, v in os.environ.items() if k.startswith("PYTEST_")}
    os.environ.clear()
    os.environ.update(SESSION_ENV, MATXFER_CACHE=str(graph_cache_dir), **own)
    yield


@pytest.fixture(scope="session")
def nacl(tmp_path_factory):
    """A rock-salt NaCl CIF file, the structure the predict tests feed to `matxfer predict`."""
    from pymatgen.core import Lattice, Structure

    path = tmp_path_factory.mktemp("structures") / "nacl.cif"
    Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(
        filename=str(path))
    return path


@pytest.fixture(scope="session")
def dataset_files(tmp_path_factory):
    """{format: path}: the small labelled dataset of tests/datasets/own_data.py in every
    format matxfer reads (requested by tests/datasets, whose folder is then importable)."""
    from own_data import write_formats

    return write_formats(tmp_path_factory.mktemp("own_data"))


@pytest.fixture(scope="session")
def backbone():
    from matxfer.model import load_backbone

    return load_backbone("small", "pretrained", dtype=torch.float64)


@pytest.fixture(scope="session")
def jdft2d_graphs(backbone, graph_cache_dir):
    from matxfer.config import DataConfig
    from matxfer.graphs import task_graphs
    from matxfer.model import graph_spec

    spec = dataclasses.replace(graph_spec(backbone), dtype=torch.float32)
    return task_graphs(DataConfig(task="matbench_jdft2d"), spec, progress=False)


@pytest.fixture(scope="session")
def mace_files(tmp_path_factory):
    """{lmax: path} of 3-interaction MACE models with L = 1 and L = 2 hidden irreps, built
    with mace's own constructors (random weights; requested by tests/backbones, whose folder
    is then importable)."""
    from mace_files import build_mace_file

    folder = tmp_path_factory.mktemp("mace-files")
    return {lmax: build_mace_file(folder / f"mace-L{lmax}.model", lmax) for lmax in (1, 2)}


@pytest.fixture(scope="module")
def local_ray(request):
    """One local Ray instance (2 CPUs) for the requesting test module; the module's trainables
    travel by value (Ray's workers cannot import the tests folder)."""
    import ray
    from ray import cloudpickle

    from matxfer.tune import pinned_local_address

    cloudpickle.register_pickle_by_value(request.module)
    with pinned_local_address():
        ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False,
                 _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
                 logging_level="ERROR")
    yield ray
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(request.module)


@pytest.fixture
def tiny_cfg():
    """A run config small enough for a unit test: 32 structures, 2 epochs."""
    from matxfer.config import load_config

    return load_config(overrides={
        "data.task": "matbench_jdft2d", "data.max_structures": 40, "data.val_fraction": 0.2,
        "train.epochs": 2, "train.batch_size": 8, "train.threads": 2,
    })


def write_study_yaml(folder, uri: str, samples: int = 2, concurrent: int = 1, epochs: int = 2,
                     experiment: str | None = None):
    """A tiny one-fold jdft2d study (40 structures, ASHA off) under `folder`, tracked at `uri`."""
    tracking = f"{{uri: '{uri}'" + (f", experiment: {experiment}}}" if experiment else "}")
    path = folder / "study.yaml"
    path.write_text(
        f"folds: [0]\nnum_samples: {samples}\nmax_concurrent_trials: {concurrent}\n"
        f"asha: {{enabled: false}}\nstorage_path: {folder / 'ray'}\n"
        f"output_dir: {folder / 'studies'}\ntracking: {tracking}\n"
        "run:\n  data: {task: matbench_jdft2d, max_structures: 40, val_fraction: 0.2}\n"
        f"  train: {{epochs: {epochs}, batch_size: 8}}\n  model: {{head_hidden: [32]}}\n")
    return path


def study_folder(studies_root, task: str = "matbench_jdft2d", variant: str = "main"):
    """The one fingerprint folder a study wrote under `studies_root` (its output_dir)."""
    from pathlib import Path

    (folder,) = (p.parent for p in Path(studies_root, task, variant).glob("*/study.json"))
    return folder


def study_identity(cfg_path, **overrides):
    """The identity (fingerprint, folders, Ray experiment names) `matxfer tune` computes."""
    from matxfer.config import load_study_config
    from matxfer.preflight import preflight

    return preflight(load_study_config(cfg_path, overrides)).ident


# The files that run real studies take most of the suite's wall time: collected first, so a
# parallel run (pytest -n 2 --dist loadfile) starts them first instead of ending on them.
LONG_FILES = ("test_readme.py", "test_tune.py", "test_tracking.py", "test_faults.py",
              "test_cluster.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: LONG_FILES.index(item.path.name)
               if item.path.name in LONG_FILES else len(LONG_FILES))
