"""A 100M-parameter policy: what handing its weights to ray_eval costs, beside the floor.

    python benchmarks/large_policy.py            # the 100M case (about 3-5 GB of RAM, ~2 min)
    python benchmarks/large_policy.py --free-period-ms 1000  # Ray's default freeing period
    python benchmarks/large_policy.py --hidden 1500 --evals 10   # a small smoke run

The policy is ``Sequential(Linear(3, H), Tanh, Linear(H, H), Tanh, Linear(H, 1))``
with ``H = 10000``: 100,060,001 parameters, 382 MiB of float32. Two workers run
2 episodes of 2 steps of Pendulum-v1 per evaluation, so the evaluation is all
weight transfer. Printed, all from this one run:

* the floor: one plain copy of the weights' bytes between two warm buffers, and
  (after the evaluator is gone, so that it warms nothing for it) a bare
  ``ray.put`` of the same arrays, what the one put per evaluation costs at best;
* ``trigger_eval(weights=...)`` over ``--calls`` calls with fresh weights each
  time, after two warm-up calls: median and max ms (the time the trainer is
  blocked), beside a plain copy timed just before each call (the load drifts),
  and the driver's page faults during each call;
* memory of the driver and of each worker: RSS, USS (its private pages, from
  ``/proc/<pid>/smaps_rollup``) and the object-store pages it has mapped
  (``RssShmem``); each worker's USS beside a worker of an evaluator with a
  tiny policy (the base) and its own module, over ``--evals`` evaluations with
  fresh weights;
* what a second evaluation with the same weights, ``weights=None`` and
  ``weights=None`` after ``weights=None`` load: the bytes each worker wrote
  into its policy (its own counter), and how long each ``evaluate()`` took;
* the object store's bytes and objects (Ray's ``memory_summary``) right after the
  last evaluation and 2 s later: Ray frees unreferenced objects in batches, once
  a second by default (``free_objects_period_milliseconds``), and until then a
  new put goes to another place in the store, which the driver then writes for
  the first time (page faults) and which a worker maps in when it reads it.
  ``--free-period-ms`` sets that period for the Ray instance started here: 20 ms
  by default, as in the instance ray_eval starts itself; 1000 is what a cluster
  started with a plain ``ray start`` has.

Nothing here asserts a speed. The machine's load average is printed beside the
numbers: other processes make them noisy.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import ray
import torch
from harness import start_ray
from torch import nn

from ray_eval import Evaluator
from ray_eval.weights import to_payload

MiB = 1024 * 1024


def policy_of(hidden: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)
    )


def weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# -- memory of a process ----------------------------------------------------------------


def memory_mib(pid: int) -> dict[str, float]:
    """RSS, USS, PSS, anonymous pages and the shared-memory pages mapped in, in MiB.

    USS counts every page no other process maps, so object-store pages that only
    this process has mapped count in it; ``anon`` (RssAnon) is its own memory only.
    """
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0]) / 1024
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("RssShmem:", "RssAnon:")):
                name, value = line.split(":")
                fields[name] = int(value.split()[0]) / 1024
    return {
        "rss": fields["Rss"],
        "uss": fields["Private_Clean"] + fields["Private_Dirty"],
        "pss": fields["Pss"],
        "shmem": fields.get("RssShmem", 0.0),
        "anon": fields.get("RssAnon", 0.0),
    }


def store_usage(address: str) -> tuple[int, int]:
    """(MiB, objects) in this node's object store, as Ray's ``memory_summary`` reports."""
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=address, stats_only=True)
    found = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", text)
    return (int(found.group(1)), int(found.group(2))) if found else (-1, -1)


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- the floor --------------------------------------------------------------------------


def copy_floor_ms(nbytes: int, reps: int, src=None, dst=None) -> list[float]:
    """A plain copy of ``nbytes`` between two buffers whose pages are already in."""
    if src is None:
        src = np.ones(nbytes // 4, np.float32)
        dst = np.zeros_like(src)
    np.copyto(dst, src)  # fault both in
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        np.copyto(dst, src)
        times.append((time.perf_counter() - started) * 1e3)
    return times


def put_floor_ms(module: nn.Module, reps: int, flat: bool = False) -> list[float]:
    """A bare ``ray.put`` of the weights as ray_eval hands them over (a dict of numpy
    views), or (``flat``) of one contiguous array of the same bytes."""
    times = []
    if flat:
        one = np.concatenate([a.ravel() for a in to_payload(module, copy=False).values()])
    for _ in range(reps):
        payload = {"flat": one} if flat else to_payload(module, copy=False)
        started = time.perf_counter()
        ref = ray.put(payload)
        times.append((time.perf_counter() - started) * 1e3)
        del ref
        time.sleep(0.2)  # let Ray free it, as between two evaluations
    return times


# -- the evaluator ----------------------------------------------------------------------


def fresh(module: nn.Module) -> None:
    """A trainer's step: every weight changes, in place."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1e-4)


def stats(times: list[float]) -> str:
    return (
        f"median {statistics.median(times):6.1f} ms, min {min(times):6.1f}, "
        f"max {max(times):6.1f} (n={len(times)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=20, help="timed trigger_eval calls")
    parser.add_argument("--evals", type=int, default=50, help="evaluations for the RSS series")
    parser.add_argument("--env", default="Pendulum-v1")
    parser.add_argument(
        "--free-period-ms",
        type=int,
        default=20,
        help="Ray's free_objects_period_milliseconds for its instance (default 20, as the "
        "instance ray_eval starts itself; Ray's own default is 1000)",
    )
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    out: dict = {"load_before": os.getloadavg()}

    policy = policy_of(args.hidden)
    nbytes = weight_bytes(policy)
    params = sum(p.numel() for p in policy.parameters())
    print(f"policy: 3-{args.hidden}-{args.hidden}-1, {params:,} parameters, {nbytes / MiB:.0f} MiB")
    print(f"torch {torch.__version__}, ray {ray.__version__}; {load()}")

    start_ray(num_cpus=max(2, os.cpu_count() or 1), free_objects_period_ms=args.free_period_ms)
    address = ray.get_runtime_context().gcs_address
    kwargs = dict(num_workers=2, num_trajectories=2, max_steps=2, envs_per_worker=1)
    period = args.free_period_ms
    print(f"Ray frees unreferenced objects every {period} ms")
    out["free_period_ms"] = args.free_period_ms

    copy_ms = copy_floor_ms(nbytes, 10)
    print(f"\nfloor, a plain {nbytes / MiB:.0f} MiB copy:  {stats(copy_ms)}   ({load()})")
    out["copy_ms"] = copy_ms

    # A worker's base memory: the same evaluator with a tiny policy.
    with Evaluator(args.env, policy_of(4), **kwargs) as tiny:
        tiny.evaluate(weights=policy_of(4, seed=1))
        base = [memory_mib(w.pid)["uss"] for w in tiny.workers]
    print(f"\nworker base (tiny policy): USS {', '.join(f'{b:.0f}' for b in base)} MiB")
    out["worker_base_uss"] = base

    gc.collect()
    driver_start = memory_mib(os.getpid())
    started = time.perf_counter()
    evaluator = Evaluator(args.env, policy, **kwargs)
    print(f"evaluator started in {time.perf_counter() - started:.1f} s")
    pids = [w.pid for w in evaluator.workers]
    mem = {"built": [memory_mib(pid) for pid in pids]}
    warmup = []
    for _ in range(2):
        fresh(policy)
        started = time.perf_counter()
        evaluator.trigger_eval(weights=policy)
        warmup.append((time.perf_counter() - started) * 1e3)
        evaluator.wait(timeout=300)
    trigger_ms, faults, paired = [], [], []
    src = np.ones(nbytes // 4, np.float32)
    dst = np.zeros_like(src)
    for _ in range(args.calls):
        fresh(policy)
        gc.collect()
        paired.extend(copy_floor_ms(nbytes, 1, src, dst))  # the floor, now (load drifts)
        faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        evaluator.trigger_eval(weights=policy)
        trigger_ms.append((time.perf_counter() - started) * 1e3)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted)
        evaluator.wait(timeout=300)
    del src, dst
    slow = [f"{t:.0f} ms ({f} faults)" for t, f in zip(trigger_ms, faults) if t > 80]
    ratios = [t / c for t, c in zip(trigger_ms, paired)]
    print(
        f"\ntrigger_eval(weights=policy), fresh weights each call:\n  {stats(trigger_ms)}   "
        f"(2 warm-up calls before: {', '.join(f'{t:.0f}' for t in warmup)} ms)   ({load()})\n"
        f"  the plain copy just before each call: {stats(paired)}\n"
        f"  trigger_eval / that copy: median {statistics.median(ratios):.2f}x, "
        f"max {max(ratios):.2f}x; driver page faults per call: median {statistics.median(faults):.0f}, "
        f"max {max(faults)}; calls over 80 ms: {', '.join(slow) or 'none'}"
    )
    out["trigger_ms"], out["warmup_ms"], out["trigger_faults"] = trigger_ms, warmup, faults
    out["paired_copy_ms"] = paired

    # Same weights again, and weights=None: what do the workers copy, and how long?
    same = {}
    steps = (
        ("fresh weights", True),
        ("the same weights again", False),
        ("weights=None (1st time)", None),
        ("weights=None again", None),
        ("fresh weights", True),
        ("weights=None (2nd time)", None),
    )
    for i, (label, change) in enumerate(steps):
        if change:
            fresh(policy)
        started = time.perf_counter()
        result = evaluator.evaluate(weights=None if change is None else policy)
        seconds = time.perf_counter() - started
        same[f"{i + 1}. {label}"] = (
            result["eval/weights_loads"],
            result["eval/weights_loaded_bytes"],
            seconds,
            result.episodes.weights_ids[0],
        )
    print("\nwhat each evaluation loads into the workers' policies (both workers together):")
    for label, (reads, written, seconds, wid) in same.items():
        print(
            f"  {label:28s} {reads} payloads read, {written / MiB:4.0f} MiB written   "
            f"evaluate() {seconds * 1e3:6.0f} ms  weights object {wid[-8:] or '-'}"
        )
    out["loads"] = {k: (v[0], v[1], v[2]) for k, v in same.items()}

    # Memory over many evaluations with fresh weights.
    series = []
    for i in range(args.evals):
        fresh(policy)
        evaluator.evaluate(weights=policy)
        if i % 10 == 9 or i == 0:
            series.append((i + 1, [memory_mib(pid) for pid in pids]))
    mem["after"] = [memory_mib(pid) for pid in pids]
    gc.collect()
    driver = memory_mib(os.getpid())
    usage = store_usage(address)
    time.sleep(2.0)  # Ray frees unreferenced objects in batches, once a second by default
    settled = store_usage(address)
    print(f"\nworkers over {args.evals} evaluations with fresh weights (MiB):")
    print("  after  " + "   ".join(f"worker {k}: RSS   USS  store" for k in range(len(pids))))
    for n, rows in [(0, mem["built"]), *series]:
        cells = "   ".join(f"{m['rss']:13.0f} {m['uss']:5.0f} {m['shmem']:6.0f}" for m in rows)
        print(f"  {n:5d}  {cells}")
    module = nbytes / MiB
    for k, m in enumerate(mem["after"]):
        extra = m["uss"] - base[min(k, len(base) - 1)]
        print(
            f"  worker {k}: USS {m['uss']:.0f} = base {base[min(k, len(base) - 1)]:.0f} + "
            f"{extra:.0f} (its module: {module:.0f}; target: below module + 10% = "
            f"{1.1 * module:.0f}) -> {'met' if extra < 1.1 * module else 'NOT met'}"
        )
    rss = [[m["rss"] for m in rows] for _, rows in series]
    growth = [rss[-1][k] - rss[0][k] for k in range(len(pids))]
    print(
        f"  RSS growth from evaluation 1 to {args.evals}: {', '.join(f'{g:+.0f}' for g in growth)}"
    )
    print(
        f"\ndriver: RSS {driver['rss']:.0f} MiB = its own {driver['anon']:.0f} + object-store "
        f"pages mapped {driver['shmem']:.0f} (+ files); USS {driver['uss']:.0f} (before the "
        f"evaluator: RSS {driver_start['rss']:.0f}, own {driver_start['anon']:.0f}); it holds "
        f"the policy ({module:.0f} MiB)"
    )
    print(
        f"object store: {usage[0]} MiB in {usage[1]} objects right after the last evaluation, "
        f"{settled[0]} MiB in {settled[1]} objects 2 s later (the pool's pickled policy and "
        f"config are two of them)   ({load()})"
    )
    evaluator.shutdown()
    put_ms = put_floor_ms(policy, 10)
    flat_ms = put_floor_ms(policy, 10, flat=True)
    print(
        f"\nfloor, a bare ray.put (after the evaluator): {stats(put_ms)}\n"
        f"  the same bytes as one flat array:         {stats(flat_ms)}   ({load()})\n"
        f"  trigger_eval's median is {statistics.median(trigger_ms) / statistics.median(put_ms):.2f}x"
        f" the bare put's"
    )
    out.update(
        worker_memory={str(n): rows for n, rows in [(0, mem["built"]), *series]},
        driver=driver,
        driver_start=driver_start,
        store_mib=usage[0],
        store_objects=usage[1],
        store_settled=settled,
        put_ms=put_ms,
        put_flat_ms=flat_ms,
        load_after=os.getloadavg(),
        weight_mib=module,
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
