"""The process-wide state a rollout may read or change, and how each backend treats it.

Three things an evaluation touches are global to a process, not to a thread:

* torch's default random generator, which a stochastic policy (TorchRL's
  ``RandomPolicy``, a ``ProbabilisticActor`` sampling) or an env draws from;
  evaluations seed it from their episodes, so that they are reproducible;
* TorchRL's exploration type (``set_exploration_type``): one value behind a
  lock in tensordict, read by every probabilistic and exploration module;
* torch's thread count: ``torch.set_num_threads`` also sets the count that
  threads take when they first use torch.

A Ray worker is its own process and sets all three freely. In-process, the
trainer shares them. So an in-process evaluation runs on its background thread
only when its policy uses neither the generator nor the exploration type (a
``Probe`` of the first policy call, when the evaluator is built, says so), with
one torch thread set for that thread alone; else it runs while the thread that
asked for it waits, on state lent by ``LentState`` and handed back before that
thread goes on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# TorchRL's ExplorationType and set_exploration_type are these, tensordict's: named so
# here, a worker that evaluates a gymnasium env does not import TorchRL (about 1 s).
from tensordict.nn import InteractionType as ExplorationType
from tensordict.nn import set_interaction_type as set_exploration_type


@dataclass
class Probe:
    """What one probed call did with the process-wide state."""

    drew: bool = False  # drew from torch's global random generator
    read_exploration: bool = False  # read TorchRL's exploration type

    @property
    def touched(self) -> bool:
        return self.drew or self.read_exploration


@contextlib.contextmanager
def probed(exploration: ExplorationType) -> Iterator[Probe]:
    """For a call on a thread that may change process state (a Ray worker, or the
    thread building an in-process evaluator): TorchRL's exploration type set, torch's
    generator forked (left as it was after); the probe says whether the call drew
    from the generator or read the exploration type."""
    probe = Probe()
    with (
        torch.random.fork_rng(devices=[]),
        set_exploration_type(exploration),
        _watching_exploration_reads() as watch,
    ):
        before = torch.get_rng_state()
        yield probe
        probe.drew = not torch.equal(before, torch.get_rng_state())
    probe.read_exploration = watch is None or watch.read


class _ReadWatch:
    """Stands in for tensordict's exploration-type holder, noting whether it is read."""

    def __init__(self, holder) -> None:
        self._holder = holder
        self.read = False

    def get_mode(self):
        self.read = True
        return self._holder.get_mode()

    def set_mode(self, mode) -> None:
        self._holder.set_mode(mode)


@contextlib.contextmanager
def _watching_exploration_reads() -> Iterator[_ReadWatch | None]:
    """Every reader of TorchRL's exploration type (``exploration_type()`` is tensordict's
    ``interaction_type()``) asks one holder in ``tensordict.nn.probabilistic``; a watch
    stands in for it meanwhile. ``None`` where that holder is not found (another
    tensordict version): the caller then assumes the type is read."""
    from tensordict.nn import probabilistic

    holder = getattr(probabilistic, "_interaction_type", None)
    if holder is None or not hasattr(holder, "get_mode"):
        yield None
        return
    watch = _ReadWatch(holder)
    probabilistic._interaction_type = watch
    try:
        yield watch
    finally:
        probabilistic._interaction_type = holder


@contextlib.contextmanager
def seeded(seed: int, exploration: ExplorationType) -> Iterator[None]:
    """Torch's generator seeded with ``seed`` and the exploration type set, both
    restored after: for a Ray worker, whose process is its own."""
    with torch.random.fork_rng(devices=[]), set_exploration_type(exploration):
        torch.manual_seed(seed)
        yield


def use_one_torch_thread_here() -> None:
    """One torch thread for the calling thread only, as on a Ray worker.

    ``torch.set_num_threads`` sets the calling thread's count and the process's
    default for threads that have not used torch yet. The default is put back at
    once, from a short-lived helper thread (whose own count is dropped with it).
    """
    default = torch.get_num_threads()  # a fresh thread's first use: the process default
    torch.set_num_threads(1)
    if default != 1:
        helper = threading.Thread(target=torch.set_num_threads, args=(default,))
        helper.start()
        helper.join()


class LentState:
    """Torch's generator and TorchRL's exploration type, lent to one in-process
    evaluation while the thread that asked for it waits.

    ``hand_back`` restores what the caller had, once: called by the evaluation
    when it ends, or by the timeout watchdog before the caller is told, so an
    abandoned evaluation that resumes later never rewinds the caller's state.
    """

    def __init__(self, exploration: ExplorationType) -> None:
        self._lock = threading.Lock()
        self._rng_state = torch.get_rng_state()
        self._exploration = set_exploration_type(exploration)
        self._exploration.__enter__()
        self._lent = True

    def seed(self, seed: int) -> None:
        """Seed torch's generator for the next chunk (as a Ray worker does)."""
        with self._lock:
            if self._lent:
                torch.manual_seed(seed)

    def hand_back(self) -> None:
        with self._lock:
            if not self._lent:
                return
            self._lent = False
            torch.set_rng_state(self._rng_state)
            self._exploration.__exit__(None, None, None)
