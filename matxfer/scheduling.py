"""Where a study's trials run, whether they can run at all, and where their results survive.

A one-worker trial trains in its own Tune trial process, which holds the worker's resources.
A DDP trial is a coordinator (the Tune trial function, which only waits on its Ray Train run)
plus `num_workers` training workers. Coordinators ask for no CPU and a sliver of the head
node's built-in `node:__internal_head__` resource, so they all sit on the head node, which
may have 0 CPUs (cluster/ray-cluster.yaml), and never take a fraction of a CPU from a worker
node (0.01 CPU per coordinator on each 1-CPU node left 0.99 CPU there: no 1-CPU worker fit).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from ray import tune

HEAD_RESOURCE = "node:__internal_head__"  # Ray gives the head node 1.0 of it
# Ray Jobs sets this for a submitted job's entrypoint process (job_supervisor.py)
JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
RUNTIME_DIR = "runtime_resources"  # Ray unpacks a job's working_dir under it
_EPS = 1e-9


def coordinator_resources() -> dict:
    """Resources of one trial coordinator for `tune.with_resources`: 0 CPU, 0.001 of the
    head node's built-in resource (so up to 1000 concurrent trials), i.e. on the head."""
    return {"cpu": 0, HEAD_RESOURCE: 0.001}


def trial_resources(cpus_per_worker: float, use_gpu: bool, gpus_per_worker: float,
                    num_workers: int) -> dict:
    """What a study's trial asks Tune for: a one-worker trial trains in its own process, so it
    holds the worker's CPUs (and GPU); a DDP trial is a coordinator (coordinator_resources)
    whose Ray Train worker group asks for the workers' resources."""
    if num_workers > 1:
        return coordinator_resources()
    return {"cpu": float(cpus_per_worker), **({"gpu": float(gpus_per_worker)} if use_gpu else {})}


def per_worker_resources(cpus_per_worker: float, use_gpu: bool) -> dict:
    """The bundle Ray Train asks for each worker: {"CPU": c} (+ {"GPU": 1} with use_gpu)."""
    return {"CPU": float(cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}


def shape(resources: dict) -> str:
    """{CPU: 1, GPU: 1}: a resource dict in a message (whole numbers without '.0')."""
    return "{" + ", ".join(f"{k}: {_num(v)}" for k, v in resources.items()) + "}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _workers_on(node: dict, per_worker: dict) -> int:
    """How many workers of this shape one node can ever hold (its total resources)."""
    have = node.get("resources", {})
    needs = {k: v for k, v in per_worker.items() if v > 0}
    if not needs:
        return 0
    return min(math.floor(have.get(k, 0.0) / v + _EPS) for k, v in needs.items())


def fits(per_worker: dict, num_workers: int, nodes: list[dict]) -> bool | str:
    """True when `num_workers` bundles `per_worker` can ever be placed on `nodes` (total
    resources; Train's PACK strategy may spread workers over nodes), else why not (a str:
    test with `is True`). A node is {"name": str, "resources": {...}, "count": int (1)}."""
    placeable = sum(_workers_on(n, per_worker) * n.get("count", 1) for n in nodes)
    if placeable >= num_workers:
        return True
    one = f"1 worker x {shape(per_worker)}"
    if not nodes:
        return f"the cluster has no nodes for {one}"
    if placeable == 0:
        largest = {k: max(n["resources"].get(k, 0.0) for n in nodes) for k in per_worker}
        short = [f"{k} {_num(v)} (largest node: {_num(largest[k])})"
                 for k, v in per_worker.items() if v > 0 and largest[k] + _EPS < v]
        if short:
            return f"no node can hold {one}: needs {', '.join(short)}"
        return f"no node can hold {one}: no single node has all of {shape(per_worker)}"
    return (f"only {placeable} of {num_workers} workers x {shape(per_worker)} fit on the "
            f"cluster's nodes")


def cluster_nodes() -> list[dict]:
    """The attached cluster's live nodes (total and free resources) plus, on an autoscaling
    cluster, each node type it may add ({"count": its max}). Needs ray.init()."""
    import ray

    try:
        free = ray._private.state.available_resources_per_node()
    except Exception:  # a private helper: the message just loses the free amounts
        free = {}
    alive = [n for n in ray.nodes() if n.get("Alive")]
    addresses = [n["NodeManagerAddress"] for n in alive]
    nodes = []
    for n in alive:
        name = n["NodeManagerAddress"]
        if addresses.count(name) > 1:  # several nodes on one host: tell them apart
            name += f" [{n['NodeID'][:6]}]"
        if HEAD_RESOURCE in n["Resources"]:
            name += " (head)"
        nodes.append({"name": name, "resources": dict(n["Resources"]),
                      "free": free.get(n["NodeID"])})
    return nodes + autoscaled_node_types(nodes)


def autoscaled_node_types(live: list[dict]) -> list[dict]:
    """Nodes an autoscaler may still add, per node type of the cluster config it published:
    its max count less the live nodes of the same resources (a private Ray helper: none when
    it is missing or the cluster does not autoscale)."""
    import ray

    try:
        groups = list(ray._private.state.state.get_cluster_config().node_group_configs)
    except Exception:
        return []
    extra = []
    for g in groups:
        wanted = dict(g.resources)
        same = sum(all(n["resources"].get(k, 0.0) == v for k, v in wanted.items()) for n in live)
        more = 10**6 if g.max_count < 0 else g.max_count - same
        if more > 0:
            up_to = "any number" if g.max_count < 0 else f"up to {more}"
            extra.append({"name": f"{g.name} (autoscaled, {up_to} more)",
                          "resources": wanted, "count": more})
    return extra


def describe_nodes(nodes: list[dict], keys: tuple[str, ...] = ("CPU", "GPU")) -> str:
    """`127.0.0.1 (head) {CPU: 1 (0.99 free)}, ...`: the resources that matter to trials."""
    parts = []
    for node in nodes:
        free = node.get("free") or {}
        items = []
        for key in keys:
            total = node["resources"].get(key, 0)
            if not total and key != "CPU":
                continue
            spare = f" ({_num(round(free.get(key, 0.0), 3))} free)" if node.get("free") else ""
            items.append(f"{key}: {_num(total)}{spare}")
        parts.append(f"{node['name']} {{{', '.join(items)}}}")
    return ", ".join(parts) or "none"


def stall_message(per_worker: dict, num_workers: int, nodes: list[dict], waited_s: float) -> str:
    """One line: what one trial needs, what the nodes offer, and whether it can ever fit."""
    keys = tuple(dict.fromkeys(["CPU", "GPU", *per_worker]))
    verdict = fits(per_worker, num_workers, nodes)
    why = ("it fits the nodes' totals, so other work (or placement groups leaked by an "
           "earlier run) holds the resources" if verdict is True else verdict)
    workers = f"{num_workers} worker{'s' if num_workers != 1 else ''}"
    coordinator = " (+ a CPU-less coordinator on the head node)" if num_workers > 1 else ""
    return (f"no trial could start for {waited_s:.0f} s: each trial needs {workers} x "
            f"{shape(per_worker)}{coordinator}; "
            f"nodes offer: {describe_nodes(nodes, keys)}; {why}")


def job_placement_groups() -> list[dict]:
    """Placement groups of this driver's job (trial coordinators and Train worker groups:
    a group's id ends with its creator's job id) that are not removed."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    return [pg for pg_id, pg in ray.util.placement_group_table().items()
            if pg_id.endswith(job) and pg["state"] != "REMOVED"]


def fit_watched(tuner: tune.Tuner) -> tune.ResultGrid:
    """`tuner.fit()`; when the SchedulingWatchdog stops the study, also remove the worker
    groups its stopped trials left waiting: Tune stops the trial coordinators, but a Train
    run's pending placement group belongs to this driver's job and would otherwise wait, and
    take the CPUs when they free up, until the driver exits."""
    try:
        return tuner.fit()
    except StudyStalled:
        remove_waiting_groups()
        raise


def remove_waiting_groups() -> int:
    """Remove this job's placement groups that are still waiting to be placed (PENDING or
    RESCHEDULING); return how many."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    waiting = [pg for pg in job_placement_groups()
               if pg["state"] in ("PENDING", "RESCHEDULING")]
    for pg in waiting:
        pg_id = PlacementGroupID(bytes.fromhex(pg["placement_group_id"]))
        remove_placement_group(PlacementGroup(pg_id))
    return len(waiting)


def workers_placed(per_worker: dict) -> bool:
    """Whether any worker group of this job holds its resources (a CREATED placement group
    whose every bundle covers `per_worker`)."""
    def covers(bundle: dict) -> bool:
        return all(bundle.get(k, 0.0) + _EPS >= v for k, v in per_worker.items() if v > 0)

    return any(pg["state"] == "CREATED" and pg["bundles"]
               and all(covers(b) for b in pg["bundles"].values())
               for pg in job_placement_groups())


class StudyStalled(RuntimeError):
    """No trial of a study could place its workers for the watchdog's timeout."""


class SchedulingWatchdog(tune.Callback):
    """Ends a study whose trials cannot start: when for `timeout_s` seconds some trial waits
    (PENDING, or RUNNING but without its workers) and no worker group of the study is placed
    and no result arrives, raise StudyStalled out of `Tuner.fit()` (Tune stops the trials;
    its experiment state keeps them unfinished, so a rerun resumes them). The cluster is
    polled at most every `poll_s` seconds."""

    def __init__(self, per_worker: dict, num_workers: int, timeout_s: float = 300.0,
                 poll_s: float = 5.0) -> None:
        self.per_worker, self.num_workers = dict(per_worker), num_workers
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self._since: float | None = None  # monotonic s since when nothing is placed
        self._polled = -math.inf

    def setup(self, **info) -> None:
        self._since, self._polled = None, -math.inf

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._since = None

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        now = time.monotonic()
        if now - self._polled < self.poll_s:
            return
        self._polled = now
        waiting = any(t.status in ("PENDING", "RUNNING") for t in trials)
        if not waiting or workers_placed(self.per_worker):
            self._since = None
            return
        if self._since is None:
            self._since = now
        if now - self._since >= self.timeout_s:
            raise StudyStalled(stall_message(self.per_worker, self.num_workers,
                                             cluster_nodes(), now - self._since))


def inside_ray_job() -> bool:
    """Whether this process is (or descends from) a `ray job submit` entrypoint: Ray Jobs
    sets RAY_JOB_CONFIG_JSON_ENV_VAR for it, and runs it in an unpacked working_dir under
    Ray's runtime_resources folder."""
    return JOB_ENV_VAR in os.environ or RUNTIME_DIR in Path.cwd().parts


def durable_location_problems(output_dir: str, storage_path: str,
                              tracking_uri: str | None) -> list[str]:
    """Inside a Ray job: one message per location that would land in the job's working_dir
    (relative, or under runtime_resources), which Ray deletes after the job. A SQLite
    tracking store also puts run artifacts in ./mlruns. Outside a job, or for absolute
    shared paths and URIs (s3://, http://): nothing. `tracking_uri` None: matxfer's default
    sqlite:///mlflow.db; 'off': tracking disabled."""
    if not inside_ray_job():
        return []
    places = (("output_dir", output_dir, "--output-dir /shared/..."),
              ("storage_path", storage_path, "--storage-path /shared/... or s3://..."))
    problems = [f"{name} '{path}' {_ephemeral(path)}: {LOST}; pass {flag}"
                for name, path, flag in places if _ephemeral(path)]
    if tracking_uri == "off":  # tracking disabled: nothing to keep
        return problems
    uri = tracking_uri or "sqlite:///mlflow.db"
    server = "MLFLOW_TRACKING_URI=http://HOST:5000 (a server every node reaches)"
    if uri.startswith("sqlite:///"):
        where = _ephemeral(uri[len("sqlite:///"):]) or "keeps run artifacts in ./mlruns"
        problems.append(f"tracking store '{uri}' {where}: {LOST}; pass {server}")
    elif "://" not in uri and _ephemeral(uri):
        problems.append(f"tracking store '{uri}' {_ephemeral(uri)}: {LOST}; pass {server}")
    return problems


LOST = "inside a Ray job it would be lost with the job's working_dir"


def _ephemeral(path: str) -> str:
    """Why a local path is not durable inside a Ray job ('' when it is, or for a URI)."""
    if "://" in path:
        return ""
    if not os.path.isabs(path):
        return "is relative"
    return f"is under Ray's {RUNTIME_DIR}" if RUNTIME_DIR in Path(path).parts else ""
