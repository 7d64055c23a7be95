"""Where trials run and whether they can: coordinators on the head without CPU, the pure
`fits` check on hand-made clusters, the watchdog ending a study that cannot place its workers
(a real local Ray instance), and where results survive inside a Ray job."""

import json
import re
import time
from types import SimpleNamespace

import pytest

from matxfer.scheduling import (
    coordinator_resources,
    durable_location_problems,
    fits,
    inside_ray_job,
    per_worker_resources,
    stall_message,
    trial_resources,
)


def node(name: str, count: int = 1, **resources) -> dict:
    return {"name": name, "resources": resources, "count": count}


def test_coordinator_takes_no_cpu_only_a_sliver_of_the_head_resource():
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

    pgf = resource_dict_to_pg_factory(coordinator_resources())
    assert pgf.required_resources == {"node:__internal_head__": 0.001}


def test_a_one_worker_trial_holds_its_workers_resources_a_ddp_trial_only_a_coordinator():
    assert trial_resources(2, False, 1, 1) == {"cpu": 2.0}
    assert trial_resources(4, True, 0.5, 1) == {"cpu": 4.0, "gpu": 0.5}
    assert trial_resources(1, True, 1, 2) == coordinator_resources()


def test_per_worker_resources_add_one_gpu_only_with_use_gpu():
    assert per_worker_resources(2, False) == {"CPU": 2.0}
    assert per_worker_resources(1, True) == {"CPU": 1.0, "GPU": 1.0}


def test_fits_when_one_node_or_several_hold_the_workers():
    assert fits({"CPU": 1}, 2, [node("a", CPU=2)]) is True
    assert fits({"CPU": 1}, 2, [node("a", CPU=1), node("b", CPU=1)]) is True
    # a 0-CPU head is no obstacle when the workers fit elsewhere
    assert fits({"CPU": 1, "GPU": 1}, 1, [node("head", CPU=0), node("g", CPU=4, GPU=1)]) is True


def test_fits_refuses_a_worker_larger_than_every_node():
    why = fits({"CPU": 4}, 1, [node("a", CPU=2), node("b", CPU=1)])
    assert why is not True and "no node can hold 1 worker x {CPU: 4}" in why
    assert "largest node: 2" in why


def test_fits_counts_whole_workers_per_node_not_the_cluster_sum():
    # 0.99 CPU left on each of two nodes: 1.98 in total, but no 1-CPU worker fits
    why = fits({"CPU": 1}, 1, [node("a", CPU=0.99), node("b", CPU=0.99)])
    assert why is not True and "CPU 1" in why
    why = fits({"CPU": 2}, 3, [node("a", CPU=5), node("b", CPU=1)])
    assert why == "only 2 of 3 workers x {CPU: 2} fit on the cluster's nodes"


def test_fits_names_a_missing_gpu_and_counts_autoscaled_node_types():
    why = fits({"CPU": 1, "GPU": 1}, 1, [node("head", CPU=8)])
    assert why == "no node can hold 1 worker x {CPU: 1, GPU: 1}: needs GPU 1 (largest node: 0)"
    autoscaled = [node("head", CPU=0), node("gpu_worker (autoscaled, up to 8)", 8, CPU=4, GPU=1)]
    assert fits({"CPU": 1, "GPU": 1}, 8, autoscaled) is True
    assert fits({"CPU": 1, "GPU": 1}, 9, autoscaled) is not True
    assert fits({"CPU": 1}, 1, []) == "the cluster has no nodes for 1 worker x {CPU: 1}"


def test_fits_needs_every_resource_on_the_same_node():
    why = fits({"CPU": 2, "GPU": 1}, 1, [node("a", CPU=2), node("b", CPU=1, GPU=1)])
    assert why is not True and "no single node" in why


def test_stall_message_names_the_trial_shape_and_what_each_node_offers():
    nodes = [{"name": "10.0.0.1 (head)", "resources": {"CPU": 0.0}, "free": {"CPU": 0.0}},
             {"name": "10.0.0.2", "resources": {"CPU": 1.0}, "free": {"CPU": 0.99}}]
    msg = stall_message({"CPU": 1.0}, 1, nodes, 300.2)  # a one-worker trial: no coordinator
    assert msg.startswith("no trial could start for 300 s: each trial needs 1 worker x "
                          "{CPU: 1}; nodes offer: ")
    assert "nodes offer: 10.0.0.1 (head) {CPU: 0 (0 free)}, 10.0.0.2 {CPU: 1 (0.99 free)}" in msg
    assert "other work" in msg  # it fits the totals: something else holds the CPU
    assert "\n" not in msg
    msg = stall_message({"CPU": 2.0, "GPU": 1.0}, 3, nodes, 5)
    assert "needs 3 workers x {CPU: 2, GPU: 1} (+ a CPU-less coordinator on the head " \
           "node); " in msg and "no node can hold" in msg


def test_inside_ray_job_from_the_entrypoint_variable_or_a_runtime_resources_cwd(
        monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert not inside_ray_job()
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))
    assert inside_ray_job()
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    pkg = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    pkg.mkdir(parents=True)
    monkeypatch.chdir(pkg)
    assert inside_ray_job()


def test_durable_locations_inside_a_job_flag_relative_and_runtime_paths(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert durable_location_problems("runs/studies", "runs/ray", None) == []  # not in a job
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    problems = durable_location_problems("runs/studies", "runs/ray", None)
    assert len(problems) == 3
    assert problems[0].startswith("output_dir 'runs/studies' is relative: inside a Ray job it "
                                  "would be lost with the job's working_dir; pass --output-dir")
    assert problems[1].startswith("storage_path 'runs/ray' is relative")
    assert "tracking store 'sqlite:///mlflow.db' is relative" in problems[2]
    pkg = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_ab"
    problems = durable_location_problems(f"{pkg}/runs", "s3://bucket/matxfer",
                                         f"sqlite:///{pkg}/mlflow.db")
    assert [p.split(" '")[0] for p in problems] == ["output_dir", "tracking store"]
    assert all("is under Ray's runtime_resources" in p for p in problems)
    assert durable_location_problems("/shared/studies", "/shared/ray",
                                     "http://10.0.0.1:5000") == []
    (only,) = durable_location_problems("/shared/studies", "/shared/ray",
                                        "sqlite:////shared/mlflow.db")
    assert "keeps run artifacts in ./mlruns" in only


# ---------------------------------------------------------------- a real local Ray instance


def _hold_one_cpu_until_both(config: dict) -> None:
    """A coordinator that does what Ray Train does first: reserve a 1-CPU worker bundle.
    It holds it until the other trial holds one too (a barrier of files), so both 1-CPU
    bundles must be placed at once on the 2-CPU node."""
    from pathlib import Path

    import ray
    from ray import tune
    from ray.util.placement_group import placement_group, remove_placement_group

    ctx = ray.get_runtime_context()
    pg = placement_group([{"CPU": 1}])
    if not pg.wait(30):
        raise RuntimeError("the worker bundle was never placed")
    folder = Path(config["folder"])
    (folder / tune.get_context().get_trial_id()).write_text(json.dumps(
        {"resources": ctx.get_assigned_resources(), "node": ctx.get_node_id()}))
    deadline = time.monotonic() + 30
    while len(list(folder.iterdir())) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the other trial never placed its worker bundle")
        time.sleep(0.2)
    remove_placement_group(pg)
    tune.report({"best_val": 1.0})


@pytest.mark.cluster
def test_coordinators_leave_the_cpus_whole_for_concurrent_workers(local_ray, tmp_path):
    """Two concurrent trials on 2 CPUs each place a 1-CPU worker bundle at the same time:
    the coordinators (on the head, no CPU) took nothing from them. With {"cpu": 0.01} the
    second bundle would wait for the first (1.98 CPU left: one whole CPU)."""
    from ray import tune

    folder = tmp_path / "placed"
    folder.mkdir()
    tuner = tune.Tuner(
        tune.with_resources(_hold_one_cpu_until_both, coordinator_resources()),
        param_space={"folder": str(folder)},
        tune_config=tune.TuneConfig(num_samples=2, max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="coord", verbose=0))
    results = tuner.fit()
    assert [r.error for r in results] == [None, None]
    head = local_ray.get_runtime_context().get_node_id()
    for path in folder.iterdir():
        info = json.loads(path.read_text())
        assert info["node"] == head
        assert info["resources"] == {"node:__internal_head__": 0.001}  # no CPU at all


def _train_with_huge_workers(config: dict) -> None:
    """A tiny DDP trial: a Ray Train run whose 2 workers ask for 64 CPUs each (the node has 2).
    Train V2 retries placing the worker group forever; the watchdog must end it."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    def worker(_):
        import ray.train

        ray.train.report({"best_val": 1.0})

    TorchTrainer(worker, scaling_config=ScalingConfig(
        num_workers=2, resources_per_worker={"CPU": 64.0}),
        run_config=RunConfig(name="huge", storage_path=config["storage"],
                             callbacks=[TuneReportCallback()])).fit()


@pytest.mark.cluster
def test_watchdog_ends_a_study_whose_workers_never_fit_within_seconds(local_ray, tmp_path):
    from ray import tune

    from matxfer.scheduling import (
        SchedulingWatchdog,
        StudyStalled,
        fit_watched,
        job_placement_groups,
    )

    watchdog = SchedulingWatchdog({"CPU": 64.0}, 2, timeout_s=5, poll_s=1)
    tuner = tune.Tuner(
        tune.with_resources(_train_with_huge_workers, coordinator_resources()),
        param_space={"storage": str(tmp_path / "ray")},
        tune_config=tune.TuneConfig(num_samples=2, max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="stall",
                                  verbose=0, callbacks=[watchdog]))
    start = time.monotonic()
    with pytest.raises(StudyStalled) as err:
        fit_watched(tuner)
    took = time.monotonic() - start
    msg = str(err.value)
    assert msg.startswith("no trial could start for 5 s: each trial needs 2 workers x "
                          "{CPU: 64} (+ a CPU-less coordinator on the head node); ")
    assert re.search(r"nodes offer: \S+ \(head\) \{CPU: 2 \(2 free\)\}; ", msg)
    assert "no node can hold 1 worker x {CPU: 64}: needs CPU 64 (largest node: 2)" in msg
    assert took < 60, f"the watchdog took {took:.0f} s"
    # no worker group the stopped trials asked for is left waiting to take the CPUs later
    # (Tune removes its own coordinators' groups as it stops the trials)
    deadline = time.monotonic() + 10
    while job_placement_groups() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job_placement_groups() == []
    assert tune.Tuner.can_restore(str(tmp_path / "ray" / "stall"))


def test_autoscaled_node_types_add_what_the_autoscaler_may_still_start(monkeypatch):
    import ray

    from matxfer.scheduling import autoscaled_node_types

    groups = [SimpleNamespace(name="head", resources={"CPU": 0.0}, max_count=1),
              SimpleNamespace(name="gpu_worker", resources={"CPU": 4.0, "GPU": 1.0}, max_count=8)]
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config",
                        lambda: SimpleNamespace(node_group_configs=groups))
    live = [node("10.0.0.1 (head)"), node("10.0.0.2", CPU=4.0, GPU=1.0)]
    extra = autoscaled_node_types(live)
    assert extra == [{"name": "gpu_worker (autoscaled, up to 7 more)",
                      "resources": {"CPU": 4.0, "GPU": 1.0}, "count": 7}]
    assert fits({"CPU": 1, "GPU": 1}, 8, live + extra) is True
    assert fits({"CPU": 1, "GPU": 1}, 9, live + extra) is not True
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: None)
    assert autoscaled_node_types(live) == []  # a cluster without an autoscaler
