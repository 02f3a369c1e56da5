"""Connecting to Ray: the session already running, a cluster, or a quiet local instance.

A cluster job calls ``ray.init()`` (or ``ray.init(address="auto")``) first and
ray_eval uses that session. ``ray job submit`` sets ``$RAY_ADDRESS``, which is
followed. Otherwise a new local instance is started, sized for the machine,
never an instance an earlier ``ray start`` left running.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import weakref

import ray

log = logging.getLogger("ray_eval")


def connect(address: str | None = None, *, log_to_driver: bool = True) -> bool:
    """Make sure this process is connected to Ray; True when this call connected it.

    ``address``: a cluster to join (``"auto"``: one started on this machine);
    ``None`` follows ``$RAY_ADDRESS`` or starts a local instance. A caller that
    got True may ``ray.shutdown()`` when done; the cluster itself keeps running.
    """
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver)
        log.info("connected to the Ray cluster at %s", address or os.environ["RAY_ADDRESS"])
        return True
    # Freed objects (last evaluation's weights) go within 20 ms rather than Ray's
    # 1 s batches, so back-to-back puts reuse store pages instead of faulting in new ones.
    system_config: dict = {"free_objects_period_milliseconds": 20}
    if "RAY_worker_niceness" not in os.environ:
        # Ray starts workers at nice 15: behind any busy process at nice 0 (the trainer,
        # another job) they get a few percent of a core, and their start-up alone
        # outlasts startup_timeout. At nice 0, 2 workers started in 7 s beside two busy
        # loops, against 105 s at nice 15. RAY_worker_niceness=15 restores Ray's way.
        system_config["worker_niceness"] = 0
    ray.init(
        address="local",  # a new instance, even if `ray start` left a cluster address behind
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=log_to_driver,
        _system_config=system_config,
    )
    log.info("started a local Ray instance (%s CPUs)", os.cpu_count())
    return True


_live: weakref.WeakSet = weakref.WeakSet()


def close_at_exit(obj) -> None:
    """Call ``obj._abandon()`` at interpreter exit, before Ray's own exit hook.

    A script that dies with a live evaluator in its traceback keeps it alive
    until after Ray's exit hook has shut Ray down; a Ray call then would start
    a new instance and never return. Exit hooks run last-registered first, and
    this one is registered again after every ``ray.init``, so it runs first:
    it stops the evaluators' delivery threads and kills their pools at once,
    without waiting. It never starts Ray and never blocks.
    """
    _live.add(obj)
    atexit.unregister(_abandon_all)
    atexit.register(_abandon_all)


def _abandon_all() -> None:
    for obj in list(_live):
        with contextlib.suppress(Exception):
            obj._abandon()
