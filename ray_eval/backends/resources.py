"""Ray resources: can the cluster host the workers, and what to say when it cannot.

Ray leaves an actor that asks for more than the cluster has pending forever,
silently; these checks and messages turn that into an error naming the
resource (at once when no node could ever fit a worker, otherwise after the
evaluator's ``startup_timeout``).

On a cluster with an autoscaler (KubeRay, the cluster launcher), too little
*now* is normal: the autoscaler adds nodes for pending actors. There the
evaluator requests the workers and waits for them, and fails early only when
the autoscaler says that none of its node types can host one worker. Both of
Ray's autoscalers publish their state in the GCS, which every driver can read:

- v2 (the default for KubeRay and ``ray up`` in Ray 2.60) reports an
  ``AutoscalingState`` (``GcsClient.get_cluster_status``), with a version that
  is 0 until an autoscaler has reported and a list of the requests it found
  infeasible: no node type can host them.
- v1 writes a JSON status under the internal KV key ``__autoscaling_status`` at
  each update (what ``ray status`` prints): the type of each node it runs, the
  demand it saw, its pending launches and nodes. It reports infeasible requests only in its log, so the
  evaluator reads the same verdict off its actions: the workers' request is in
  its demand, no node fits one worker, and update after update it launches
  nothing. A plain Ray instance (a laptop, ``ray start`` by hand) runs v1 on a
  read-only provider, which names each node's type after the node and never
  launches: that is no autoscaler.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from ray_eval.errors import ResourceUnavailableError

V1_STATUS_KEY = b"__autoscaling_status"  # ray_constants.DEBUG_AUTOSCALING_STATUS
# v1 updates (5 s apart by default) that must show the workers' request seen and
# nothing launched for it before the evaluator calls the request infeasible.
V1_UPDATES_WITHOUT_LAUNCH = 3
# Seconds to wait for an autoscaler's first report before failing fast: one
# reports a few seconds after `ray start` returns (v1 every 5 s by default).
FIRST_REPORT_WAIT = 10.0


def requested_resources(
    worker_resources: dict[str, float], actor_options: dict[str, Any]
) -> dict[str, float]:
    """What each worker actor really asks Ray for.

    ``worker_resources`` with ``actor_options``' ``num_cpus``, ``num_gpus``,
    ``resources`` and ``memory`` applied, as ``.options()`` applies them when the
    pool creates a worker: they override, and ``resources`` replaces the custom
    resources as a whole.
    """
    requested = dict(worker_resources)
    if actor_options.get("resources") is not None:
        requested = {k: v for k, v in requested.items() if k in ("CPU", "GPU")}
        requested.update(actor_options["resources"])
    for option, key in (("num_cpus", "CPU"), ("num_gpus", "GPU"), ("memory", "memory")):
        if actor_options.get(option) is not None:
            requested[key] = actor_options[option]
    return requested


@dataclass
class Autoscaler:
    """The cluster's autoscaler, as it reports itself in the GCS (``version``: "v1" or "v2")."""

    version: str
    _last_update: float | None = field(default=None, repr=False)
    _idle_updates: int = field(default=0, repr=False)

    def __str__(self) -> str:
        return f"the cluster's autoscaler ({self.version})"

    def infeasible(self, request: dict[str, float]) -> str | None:
        """Why no node the autoscaler can add would ever host a worker asking for
        ``request``, or ``None`` while it may still add one. Call it repeatedly
        while the workers wait: the v1 verdict takes several of its updates."""
        try:
            if self.version == "v2":
                seen = _v2_infeasible(_cluster_status().autoscaling_state, request)
                verdict = "reports this request as infeasible (no node type has it)"
            else:
                seen = self._v1_launches_nothing(request)
                verdict = (
                    f"saw this request for {V1_UPDATES_WITHOUT_LAUNCH} of its updates and "
                    f"started no node for it"
                )
        except Exception:  # an unreadable status is no verdict: wait for startup_timeout
            return None
        if not seen:
            return None
        return (
            f"no node type of this autoscaling cluster can host one worker: each worker asks "
            f"for {resources_text(request)}; {self} {verdict}, and no node has "
            f"{resources_text(_missing(request, _alive_nodes()) or request)} (cluster total: "
            f"{resources_text(ray.cluster_resources())}). Add a node type that has it, or ask "
            f"for less per worker (num_cpus_per_worker / num_gpus_per_worker / "
            f"resources_per_worker / actor_options)"
        )

    def _v1_launches_nothing(self, request: dict[str, float]) -> bool:
        status = _v1_status()
        if status is None or status.get("time") == self._last_update:
            return self._idle_updates >= V1_UPDATES_WITHOUT_LAUNCH
        self._last_update = status.get("time")
        load = status.get("load_metrics_report") or {}
        report = status.get("autoscaler_report") or {}
        demand = [
            shape for shape, _ in load.get("resource_demand", []) + load.get("request_demand", [])
        ]
        demand += [b for group, _ in load.get("pg_demand", []) for b in group.get("bundles", [])]
        nodes = _alive_nodes()
        idle = (
            any(_same(shape, request) for shape in demand)
            and not report.get("pending_launches")
            and not report.get("pending_nodes")
            # a node the provider started but that has not joined the cluster yet
            and len(report.get("node_type_mapping") or {}) <= len(nodes)
            and not any(_fits(n, request) for n in nodes)
        )
        self._idle_updates = self._idle_updates + 1 if idle else 0
        return self._idle_updates >= V1_UPDATES_WITHOUT_LAUNCH


def find_autoscaler(wait: float = 0.0) -> Autoscaler | None:
    """The cluster's autoscaler, or ``None`` where no autoscaler can add nodes
    (or its status cannot be read: then the checks are those of a fixed cluster).

    ``wait``: seconds to wait for a first report when there is none yet (an
    autoscaler reports a few seconds after ``ray start`` returns).
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            if _cluster_status().autoscaling_state.autoscaler_state_version > 0:
                return Autoscaler("v2")
            status = _v1_status()
        except Exception:
            return None
        # v1 writes its status before its first update, without a report in it.
        report = (status or {}).get("autoscaler_report")
        if report or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    mapping = (report or {}).get("node_type_mapping") or {}
    # The read-only provider (no autoscaling config) names each node's type "node_<id>".
    if all(node_type == f"node_{node}" for node, node_type in mapping.items()):
        return None
    return Autoscaler("v1")


def _cluster_status():
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply
    from ray.experimental.internal_kv import internal_kv_get_gcs_client

    reply = GetClusterStatusReply()
    reply.ParseFromString(internal_kv_get_gcs_client().get_cluster_status(timeout_s=10))
    return reply


def _v1_status() -> dict | None:
    from ray.experimental.internal_kv import internal_kv_get_gcs_client

    raw = internal_kv_get_gcs_client().internal_kv_get(V1_STATUS_KEY, None, timeout=10)
    return json.loads(raw) if raw else None


def _v2_infeasible(state, request: dict[str, float]) -> bool:
    requests = [*state.infeasible_resource_requests]
    requests += [r for gang in state.infeasible_gang_resource_requests for r in gang.requests]
    return any(_same(dict(r.resources_bundle), request) for r in requests)


def _same(shape: dict, request: dict[str, float]) -> bool:
    """The same resource request (zero amounts left out, as Ray leaves them out)."""
    return {k: float(v) for k, v in shape.items() if v} == {
        k: float(v) for k, v in request.items() if v
    }


def _alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def _fits(node: dict, request: dict[str, float]) -> bool:
    return all(node["Resources"].get(k, 0) >= v for k, v in request.items() if v > 0)


def _missing(request: dict[str, float], nodes: list[dict]) -> dict[str, float]:
    """The requested amounts that no node has."""
    return {
        k: v
        for k, v in request.items()
        if v > 0 and not any(n["Resources"].get(k, 0) >= v for n in nodes)
    }


def check_resources(worker_resources: dict[str, float], num_workers: int) -> None:
    """Fail fast when a cluster without an autoscaler can never host the workers
    (no node fits one, or the cluster's total is short). ``worker_resources``:
    what each worker asks for (``requested_resources``)."""
    nodes = _alive_nodes()
    if not any(_fits(n, worker_resources) for n in nodes):
        missing = _missing(worker_resources, nodes)
        raise ResourceUnavailableError(
            f"no node of the cluster can host one worker: each worker asks for "
            f"{resources_text(worker_resources)}, and no node has "
            f"{resources_text(missing or worker_resources)} (cluster total: "
            f"{resources_text(ray.cluster_resources())})"
        )
    total = ray.cluster_resources()
    for key, amount in worker_resources.items():
        if amount > 0 and amount * num_workers > total.get(key, 0) + 1e-9:
            raise ResourceUnavailableError(
                f"{num_workers} workers x {amount:g} {key} = {amount * num_workers:g} {key}, "
                f"but the cluster has {total.get(key, 0):g} {key} in all; use fewer workers "
                f"(num_workers) or less per worker (num_cpus_per_worker / num_gpus_per_worker, "
                f"or num_cpus / num_gpus in actor_options)"
            )


def nodes_that_fit(request: dict[str, float]) -> str:
    """``"1 of 1"``: alive nodes with the resources of one worker, of all alive nodes."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fit = [n for n in nodes if all(n["Resources"].get(k, 0) >= v for k, v in request.items())]
    return f"{len(fit)} of {len(nodes)}"


def free_text(request: dict[str, float]) -> str:
    """``"the cluster has {CPU: 0} free of {CPU: 4}: not enough free CPU"``."""
    keys = [k for k, v in request.items() if v > 0]
    free, total = ray.available_resources(), ray.cluster_resources()
    short = [k for k in keys if free.get(k, 0) + 1e-9 < request[k]]
    text = (
        f"the cluster has {resources_text({k: free.get(k, 0) for k in keys}, zeros=True)} free "
        f"of {resources_text({k: total.get(k, 0) for k in keys}, zeros=True)}"
    )
    if short:
        text += f": not enough free {', '.join(short)} (held by other actors or tasks)"
    return text


def resources_text(resources: dict, *, zeros: bool = False) -> str:
    shown = {
        k: v
        for k, v in resources.items()
        if (v or zeros)
        and not k.startswith(("node:", "object_store", "memory", "accelerator_type:"))
    }
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"
