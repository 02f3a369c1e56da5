"""Large policies: weights loaded once, no private copy, no object-store pages kept.

Behaviour at 8.4M parameters (34 MiB of weights); the 100M-parameter case is
measured, side by side with a plain memory copy, by ``benchmarks/large_policy.py``.
What a worker did is read from the worker itself: its load counters (through
Ray's ``__ray_call__`` on the real actor) and its memory from ``/proc/<pid>``.
"""

from __future__ import annotations

import functools
import mmap
import os
import sys
import tempfile
import time

import numpy as np
import pytest
import ray
import torch
from ray.util.state import list_objects
from torch import nn

from ray_eval import Evaluator
from ray_eval.backends.pool import SHARED_INITIAL_WEIGHTS_MIN_BYTES
from ray_eval.memory import release_store_pages
from ray_eval.weights import (
    _CHUNK,
    load_payload,
    module_params,
    to_payload,
)
from tests.envs import SeedLengthEnv

HIDDEN = 2900  # 2 -> 2900 -> 2900 -> 1: 8,422,601 parameters
ENV = functools.partial(SeedLengthEnv, action_reward=True)  # the return depends on the weights
RUN = dict(num_trajectories=4, max_steps=5, envs_per_worker=2)  # 2 chunks: one per worker

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise")


def mlp(seed: int = 0, hidden: int = HIDDEN) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)
    )


def make_policy() -> nn.Module:
    """A policy factory: every worker builds the same weights."""
    return mlp(seed=3)


def weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def train_step(module: nn.Module, seed: int) -> None:
    """What a trainer does between evaluations: every weight changes, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def loads(result: dict) -> tuple[int, int]:
    """(weights payloads the workers read, bytes they wrote into their policies)."""
    return result["eval/weights_loads"], result["eval/weights_loaded_bytes"]


def memory_mib(pid: int) -> dict[str, float]:
    """A process's private memory (USS), resident memory and mapped shared memory, in MiB."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0]) / 1024
    with open(f"/proc/{pid}/status") as f:
        shmem = next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssShmem:"))
    uss = fields["Private_Clean"] + fields["Private_Dirty"]
    return {"uss": uss, "rss": fields["Rss"], "shmem": shmem}


# -- in the worker: what is loaded, and what is kept ------------------------------------


def test_same_weights_again_and_none_after_none_load_nothing(ray_local):
    policy = mlp()
    nbytes = weight_bytes(policy)
    with Evaluator(ENV, mlp(), num_workers=0, **RUN) as fresh:
        expected = fresh.evaluate(step=1)  # in-process: the same numbers, to the last bit
        assert loads(expected) == (0, 0)
    with Evaluator(ENV, policy, num_workers=2, **RUN) as ev:
        # (payloads read, bytes written into the policies), both workers together
        initial = ev.evaluate(step=1)
        assert loads(initial) == (0, 0)  # the built weights are in: nothing read

        train_step(policy, seed=1)  # the trainer changes the module the evaluator was built from
        trained = ev.evaluate(weights=policy, step=1)
        assert loads(trained) == (2, 2 * nbytes)  # every byte changed, in both workers

        again = ev.evaluate(weights=policy, step=1)  # the same weights, put again
        assert loads(again) == (2, 0)  # compared, nothing written

        restored = ev.evaluate(step=1)  # weights=None: the built weights come back
        assert loads(restored) == (2, 2 * nbytes)

        restored_again = ev.evaluate(step=1)  # None after None: nothing read at all
        assert loads(restored_again) == (0, 0)

        ev.evaluate(weights=policy, step=1)
        restored_later = ev.evaluate(step=1)  # from the copy the workers put in the store
        assert loads(restored_later) == (2, 2 * nbytes)
    assert trained["eval/reward"] != initial["eval/reward"]
    assert again["eval/reward"] == trained["eval/reward"]
    for result in (initial, restored, restored_again, restored_later):
        assert result["eval/reward"] == expected["eval/reward"]
        np.testing.assert_array_equal(result.episodes.returns, expected.episodes.returns)
    # one put per evaluation, shared by both workers
    ids = [set(r.episodes.weights_ids.tolist()) for r in (trained, again)]
    assert all(len(i) == 1 and "" not in i for i in ids) and ids[0] != ids[1]


@linux_only
def test_workers_hold_one_copy_and_no_store_pages_over_evaluations(ray_local):
    policy = mlp()
    weights_mib = weight_bytes(policy) / 2**20
    with Evaluator(ENV, mlp(hidden=4), num_workers=1, **RUN) as tiny:  # a worker's base
        tiny.evaluate(weights=mlp(seed=1, hidden=4))
        base = min(memory_mib(w.pid)["uss"] for w in tiny.workers)
    with Evaluator(ENV, policy, num_workers=2, **RUN) as ev:
        pids = [w.pid for w in ev.workers]
        series = []
        for i in range(6):
            train_step(policy, seed=i)
            ev.evaluate(weights=policy)
            if i == 3:
                ev.evaluate()  # weights=None too: from the pickled policy, then back
            series.append([memory_mib(pid) for pid in pids])
    for k in range(len(pids)):
        first, last = series[1][k], series[-1][k]
        # The worker's own module is its one copy (it used to keep a second one).
        assert last["uss"] - base < 1.5 * weights_mib, (k, base, last, weights_mib)
        # The pages of the weights objects it read are not kept mapped...
        assert last["shmem"] < 0.25 * weights_mib, (k, last)
        # ...so its resident memory stays flat as objects come and go.
        assert last["rss"] - first["rss"] < 0.25 * weights_mib, (k, first, last)


def test_factory_built_weights_come_back_and_the_store_keeps_no_weights_objects(ray_local):
    # A factory-built policy's weights wait in the object store for weights=None:
    # one object per worker, put once, gone with the evaluator. Every evaluation's
    # weights object is gone once its evaluation is over.
    address = ray.get_runtime_context().gcs_address
    trainer = make_policy()
    size = weight_bytes(trainer)

    def weights_sized() -> set[str]:
        objects = list_objects(address=address, limit=10_000, raise_on_missing_output=False)
        return {o.object_id for o in objects if size <= (o.object_size or 0) < size + 2**20}

    with Evaluator(ENV, policy_factory=make_policy, num_workers=0, **RUN) as fresh:
        expected = fresh.evaluate(step=2)
    before = weights_sized()
    evaluation_ids = set()
    with Evaluator(ENV, policy_factory=make_policy, num_workers=2, **RUN) as ev:
        for seed in range(3):
            train_step(trainer, seed)
            trained = ev.evaluate(weights=trainer, step=2)
            evaluation_ids |= set(trained.episodes.weights_ids.tolist())
            restored = ev.evaluate(step=2)  # from the worker's own object
            assert trained["eval/reward"] != expected["eval/reward"]
            np.testing.assert_array_equal(restored.episodes.returns, expected.episodes.returns)
        assert len(evaluation_ids) == 3
        kept = _settle(lambda: weights_sized() - before, lambda s: not (s & evaluation_ids))
        assert not kept & evaluation_ids, "weights objects of finished evaluations remain"
        assert len(kept) == 2, kept  # the two workers' built weights, each put once
    left = _settle(lambda: weights_sized() - before, lambda s: not s)
    assert not left, f"{len(left)} weights-sized objects outlived the evaluator"


def test_a_live_policy_s_built_weights_are_put_once_for_all_workers(ray_local):
    """weights=None after other weights, with a policy passed live: the pool puts the
    built weights once, shared by both workers (not one copy per worker in the store)."""
    address = ray.get_runtime_context().gcs_address
    policy = mlp()
    size = weight_bytes(policy)
    assert size >= SHARED_INITIAL_WEIGHTS_MIN_BYTES  # smaller ones: each worker its own

    def weights_sized() -> set[str]:
        objects = list_objects(address=address, limit=10_000, raise_on_missing_output=False)
        return {o.object_id for o in objects if size <= (o.object_size or 0) < size + 2**20}

    with Evaluator(ENV, mlp(), num_workers=0, **RUN) as fresh:
        expected = fresh.evaluate(step=2)
    before = weights_sized()
    # Two workers unpickling a 32+ MiB policy at once: on a loaded 2-core machine that
    # took over the default 60 s; this test is about the store, not start-up time.
    with Evaluator(ENV, policy, num_workers=2, startup_timeout=180, **RUN) as ev:
        evaluation_ids = set()
        for seed in range(2):  # the second weights=None reuses the object the first put
            train_step(policy, seed)
            trained = ev.evaluate(weights=policy, step=2)
            evaluation_ids |= set(trained.episodes.weights_ids.tolist())
            restored = ev.evaluate(step=2)
            assert loads(restored) == (2, 2 * size)  # both workers loaded the built weights
            np.testing.assert_array_equal(restored.episodes.returns, expected.episodes.returns)
        kept = _settle(lambda: weights_sized() - before, lambda s: not (s & evaluation_ids))
        assert not kept & evaluation_ids
        # the pickled policy the workers were built from, and its weights: one object each
        assert len(kept) == 2, kept


def _settle(measure, done, timeout: float = 20.0):
    """Ray frees objects in batches (about once a second): wait, bounded, until ``done``."""
    deadline = time.monotonic() + timeout
    value = measure()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.25)
        value = measure()
    return value


# -- the pieces, without Ray ----------------------------------------------------------------


def test_load_payload_writes_only_from_the_first_chunk_that_differs():
    live = nn.Linear(700, 1000)  # a 2.8 MB weight: three chunks
    targets = module_params(live)
    payload = to_payload(live, copy=True)
    assert load_payload(targets, payload) == 0

    weight = payload["weight"].reshape(-1)
    weight[-1] += 1.0  # only the last chunk differs
    nbytes = weight.nbytes
    assert load_payload(targets, payload) == nbytes - (nbytes - 1) // _CHUNK * _CHUNK
    assert torch.equal(live.weight, torch.from_numpy(payload["weight"]))

    weight[0] = np.nan  # bitwise: the same NaN is equal...
    load_payload(targets, payload)
    assert load_payload(targets, payload) == 0
    payload["bias"][:] = 0.0
    load_payload(targets, payload)
    payload["bias"][0] = -0.0  # ...and -0.0 is not 0.0
    assert load_payload(targets, payload) == payload["bias"].nbytes
    assert torch.equal(live.bias, torch.from_numpy(payload["bias"]))
    assert str(live.bias[0].item()) == "-0.0"

    as_double = {k: v.astype(np.float64) for k, v in payload.items()}
    assert load_payload(targets, as_double) == sum(t.nbytes for t in targets.values())


@linux_only
def test_release_store_pages_unmaps_only_the_stores_shared_pages():
    size = 64 * 2**20
    store = _shared_file(size, "plasma-test-")  # named like the object store's files
    other = _shared_file(size, "not-the-store-")
    private = np.full(size // 8, 7.0)
    try:
        for mapping in (store, other):
            mapping.write(b"\x01" * size)  # make every page resident
        mapped = memory_mib(os.getpid())["shmem"]
        assert _mapping_rss("plasma-test-") >= 0.9 * size
        assert _mapping_rss("not-the-store-") >= 0.9 * size
        # A Ray driver in this test process (an earlier test's) maps the real store too.
        store_rss = sum(_mappings_rss("plasma"))
        released = release_store_pages()
        assert 0.9 * size <= released <= 1.1 * store_rss
        assert memory_mib(os.getpid())["shmem"] < mapped - 0.9 * size / 2**20
        # Only the store's pages left this process: the other shared mapping stays resident.
        assert _mapping_rss("plasma-test-") <= 0.1 * size
        assert _mapping_rss("not-the-store-") >= 0.9 * size
        # The data is still there, read back from the shared file; nothing else changed.
        assert store[:] == b"\x01" * size and other[:] == b"\x01" * size
        assert np.all(private == 7.0)
    finally:
        store.close()
        other.close()


def _mapping_rss(prefix: str) -> int:
    """Resident bytes of this process's one mapping of a file named ``prefix...``."""
    found = _mappings_rss(prefix)
    assert len(found) == 1, (prefix, found)
    return found[0]


def _mappings_rss(prefix: str) -> list[int]:
    """Resident bytes of each of this process's mappings of files named ``prefix...``."""
    found = []
    with open("/proc/self/smaps") as smaps:
        current = None
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                path = fields[5] if len(fields) > 5 else ""
                current = os.path.basename(path).startswith(prefix)
            elif current and fields[0] == "Rss:":
                found.append(int(fields[1]) * 1024)
    return found


def _shared_file(size: int, prefix: str) -> mmap.mmap:
    fd, path = tempfile.mkstemp(prefix=prefix, dir="/dev/shm")
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
        os.unlink(path)
