"""Sustained load: many queued requests, many evaluations, many evaluators.

Nothing lost or duplicated, nothing left behind: results are counted, Ray's
state API and memory summary are asked what is still in the object store, the
driver's RSS is measured, and live actors and threads are listed.
"""

from __future__ import annotations

import gc
import re
import threading
import time

import ray
import torch
from ray._private.internal_api import memory_summary
from ray.util.state import list_objects
from tensordict import from_module
from torch import nn

from ray_eval import Evaluator
from tests.checks import (
    evaluator_threads,
    live_actor_ids,
    small_policy,
    wait_no_evaluator_threads,
    wait_until_gone,
)
from tests.envs import SeedLengthEnv

MiB = 1 << 20


def test_500_queued_triggers_give_500_results_in_order_none_lost(ray_local):
    n = 500
    seen = []
    policy = small_policy()
    with Evaluator(
        SeedLengthEnv,
        policy,
        num_workers=2,
        num_trajectories=1,
        max_steps=2,
        envs_per_worker=1,
        busy_policy="queue",
        on_result=lambda td: seen.append(int(td["eval/step"].item())),
    ) as ev:
        started = time.perf_counter()
        refs = [ev.trigger_eval(weights=policy if i % 50 == 0 else None) for i in range(n)]
        triggered_s = time.perf_counter() - started
        assert all(isinstance(r, ray.ObjectRef) for r in refs) and len(set(refs)) == n
        results = [ev.wait(timeout=120) for _ in range(n)]
        total_s = time.perf_counter() - started
        assert ev.poll() is None and not ev.pending
        from_refs = ray.get(refs, timeout=60)
    assert [r["eval/step"] for r in results] == list(range(n))
    assert [r["eval/step"] for r in from_refs] == list(range(n))
    assert seen == list(range(n))  # on_result once per result, in order
    assert all(r["eval/num_episodes"] == 1 for r in results)
    assert all(r.episodes.lengths.tolist() == [min(2, r.episodes.lengths[0])] for r in results)
    print(
        f"\n[500 queued] triggered in {triggered_s:.2f} s, all {n} results in {total_s:.2f} s "
        f"({n / total_s:.0f} evaluations/s)"
    )


def big_policy() -> nn.Module:
    """About 1.05M parameters (4 MiB of weights), for SeedLengthEnv."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(2, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 1)
    )


def driver_memory_mib() -> dict[str, float]:
    """The driver's resident memory: its own (anonymous) pages, and shared ones.

    ``ray.put`` writes into the object store's shared memory, which is mapped
    into this process: those pages count in its RSS (``RssShmem``) up to the
    store's size though they belong to the store. The driver's own memory is
    ``RssAnon``.
    """
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def plasma_usage(address: str) -> tuple[int, int]:
    """(MiB, objects) in the object store of every node, from Ray's memory summary."""
    text = memory_summary(address=address, stats_only=True)
    found = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", text)
    assert found, text
    return int(found.group(1)), int(found.group(2))


def test_memory_is_flat_over_many_evaluations_with_fresh_weights(ray_local):
    address = ray.get_runtime_context().gcs_address
    policy = big_policy()
    weights = from_module(policy).data.clone()
    weights_mib = sum(p.numel() * 4 for p in policy.parameters()) / MiB
    warmup, n = 10, 120
    weight_ids = set()
    with Evaluator(
        SeedLengthEnv,
        policy,
        num_workers=2,
        num_trajectories=2,
        max_steps=3,
        envs_per_worker=1,
        busy_policy="queue",
    ) as ev:
        rss = []
        for i in range(warmup + n):
            if i == warmup:
                gc.collect()
                rss.append(driver_memory_mib())
            weights.apply_(lambda p: p.add_(0.001))  # fresh weights every time
            if i % 2:
                result = ev.evaluate(weights=weights)
            else:
                ev.trigger_eval(weights=weights)
                result = ev.wait(timeout=60)
            weight_ids.update(result.episodes.weights_ids.tolist())
        gc.collect()
        rss.append(driver_memory_mib())
        # Every weights object is freed once its evaluation is over.
        deadline = time.monotonic() + 20
        while True:
            stored = {o.object_id for o in list_objects(address=address, limit=10_000)}
            leftover = weight_ids & stored
            usage_mib, objects = plasma_usage(address)
            if (not leftover and usage_mib < weights_mib) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    growth_mib = rss[1]["RssAnon"] - rss[0]["RssAnon"]
    assert len(weight_ids) == warmup + n  # one put per evaluation, each shared by both workers
    assert not leftover, f"{len(leftover)} weight objects still in the object store"
    assert usage_mib < weights_mib, f"object store holds {usage_mib} MiB in {objects} objects"
    # 120 evaluations x 4 MiB of weights: a leak of one copy each would be 480 MiB.
    assert growth_mib < 24, f"driver memory grew {growth_mib:.1f} MiB over {n} evaluations"
    store_mib = ray.available_resources().get("object_store_memory", 0) / MiB
    assert rss[1]["RssShmem"] < max(store_mib, 1024)  # mapped store pages: bounded by its size
    print(
        f"\n[memory] {n} evaluations with fresh {weights_mib:.1f} MiB weights: driver's own "
        f"memory (RssAnon) {rss[0]['RssAnon']:.0f} -> {rss[1]['RssAnon']:.0f} MiB "
        f"({growth_mib:+.1f} MiB); VmRSS {rss[0]['VmRSS']:.0f} -> {rss[1]['VmRSS']:.0f} MiB, "
        f"of it object-store pages mapped in (RssShmem) {rss[0]['RssShmem']:.0f} -> "
        f"{rss[1]['RssShmem']:.0f} MiB; object store after: {usage_mib} MiB in {objects} "
        f"objects, {len(leftover)} of {len(weight_ids)} weight objects left"
    )


def test_many_evaluators_created_and_shut_down_leave_no_actor_and_no_thread(ray_local):
    before = live_actor_ids()
    threads_before = {t.ident for t in threading.enumerate()}
    created: set[str] = set()
    for i in range(4):
        ev = Evaluator(
            SeedLengthEnv,
            small_policy(),
            num_workers=1,
            num_trajectories=2,
            max_steps=3,
            busy_policy="queue",
        )
        created |= set(ev.actor_ids)
        ev.evaluate()
        ev.trigger_eval()
        ev.trigger_eval()
        if i % 2:
            ev.wait(timeout=60)  # the others are shut down with work in flight
        ev.shutdown()
    for i in range(6):  # in-process evaluators: a background thread each
        with Evaluator(SeedLengthEnv, small_policy(), num_workers=0, num_trajectories=2) as ev:
            ev.trigger_eval()
            if i % 2:
                ev.wait(timeout=60)
    assert len(created) == 4 * 2  # a pool and its worker each
    assert not wait_until_gone(created | (live_actor_ids() - before))
    assert not wait_no_evaluator_threads()
    deadline = time.monotonic() + 10
    while {t.ident for t in threading.enumerate()} - threads_before and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [t for t in threading.enumerate() if t.ident not in threads_before]
    assert not left, f"threads left behind: {[t.name for t in left]}"
    assert not evaluator_threads()
