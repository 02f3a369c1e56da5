"""Ray resources: can the cluster host the workers, and what to say when it cannot.

Ray leaves an actor that asks for more than the cluster has pending forever,
silently; these checks and messages turn that into an error naming the
resource (at once when no node could ever fit a worker, otherwise after the
evaluator's ``startup_timeout``).
"""

from __future__ import annotations

from typing import Any

import ray

from ray_eval.errors import ResourceUnavailableError


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


def check_resources(worker_resources: dict[str, float], num_workers: int) -> None:
    """Fail fast when the cluster can never host the workers (no node fits one, or
    the cluster's total is short). ``worker_resources``: what each worker asks for
    (``requested_resources``)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits_one = [
        n
        for n in nodes
        if all(n["Resources"].get(k, 0) >= v for k, v in worker_resources.items() if v > 0)
    ]
    if not fits_one:
        missing = {
            k: v
            for k, v in worker_resources.items()
            if v > 0 and not any(n["Resources"].get(k, 0) >= v for n in nodes)
        }
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
