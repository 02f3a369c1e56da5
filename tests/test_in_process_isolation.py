"""In-process evaluation leaves the caller's process state alone.

Torch's default random generator, TorchRL's exploration type and the thread
count torch gives new threads are process-wide. A trainer thread that draws
random numbers while an in-process evaluation runs must draw exactly what it
would draw with no evaluation running, under the exploration type it set.
"""

from __future__ import annotations

import functools
import threading
import time

import pytest
import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.collectors import RandomPolicy
from torchrl.envs.utils import ExplorationType, exploration_type, set_exploration_type
from torchrl.modules import ProbabilisticActor, TanhNormal

from ray_eval import Evaluator
from tests.checks import small_policy
from tests.envs import SeededCountdownEnv, SeedLengthEnv

TRAINER_SEED = 1234


class SlowCountdownEnv(SeededCountdownEnv):
    """``SeededCountdownEnv`` at about 2 ms a step: an evaluation that lasts."""

    def _step(self, tensordict):
        time.sleep(0.002)
        return super()._step(tensordict)


def expected_draws(n: int) -> list[float]:
    """What ``torch.rand(1)`` gives ``n`` times after ``torch.manual_seed(TRAINER_SEED)``."""
    gen = torch.Generator().manual_seed(TRAINER_SEED)
    return [torch.rand(1, generator=gen).item() for _ in range(n)]


def count_of_a_new_thread() -> int:
    """The torch thread count a thread started now gets (the process default)."""
    box = {}
    fresh = threading.Thread(target=lambda: box.update(n=torch.get_num_threads()))
    fresh.start()
    fresh.join()
    return box["n"]


def trainer(ev: Evaluator, seen: dict) -> None:
    """Seeds torch, triggers an evaluation under its own exploration type, and keeps
    drawing random numbers (and reading its process state) until the result is in."""
    torch.manual_seed(TRAINER_SEED)
    threads = torch.get_num_threads()
    with set_exploration_type(ExplorationType.RANDOM):
        handle = ev.trigger_eval(step=3)
        draws, modes, counts, during = [], set(), set(), 0
        while not handle.done() or len(draws) < during + 5:
            during += not handle.done()
            draws.append(torch.rand(1).item())
            modes.add(exploration_type())
            counts.add(torch.get_num_threads())
            counts.add(count_of_a_new_thread())
            time.sleep(0.002)
    seen.update(
        draws=draws,
        during=during,
        modes=modes,
        counts=counts,
        threads=threads,
        after=exploration_type(),
        result=handle.result(timeout=60),
    )


def run_trainer(ev: Evaluator) -> dict:
    seen: dict = {}
    thread = threading.Thread(target=trainer, args=(ev, seen))
    thread.start()
    thread.join(120)
    assert not thread.is_alive()
    return seen


def test_a_trainer_thread_draws_the_same_numbers_during_an_async_in_process_evaluation():
    """A deterministic policy runs in the background and touches no process state."""
    with Evaluator(
        functools.partial(SeedLengthEnv, step_sleep=0.002),
        small_policy(),
        num_workers=0,
        num_trajectories=6,
        envs_per_worker=2,
    ) as ev:
        seen = run_trainer(ev)
        reference = ev.evaluate(step=3)
    assert seen["during"] >= 5  # it really drew while the evaluation ran
    assert seen["draws"] == expected_draws(len(seen["draws"]))
    assert seen["modes"] == {ExplorationType.RANDOM} and seen["after"] is None
    assert seen["counts"] == {seen["threads"]}  # its own count, and a new thread's
    assert seen["result"]["eval/reward"] == reference["eval/reward"]


def probabilistic_actor() -> ProbabilisticActor:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), NormalParamExtractor())
    return ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        distribution_class=TanhNormal,
    )


@pytest.mark.parametrize(
    "make_policy, exploration",
    [
        (lambda: RandomPolicy(SeededCountdownEnv().action_spec), ExplorationType.RANDOM),
        (probabilistic_actor, ExplorationType.RANDOM),
        (probabilistic_actor, ExplorationType.DETERMINISTIC),
    ],
    ids=["RandomPolicy", "ProbabilisticActor-random", "ProbabilisticActor-deterministic"],
)
def test_a_policy_that_uses_torchs_globals_is_evaluated_while_the_trainer_waits(
    make_policy, exploration
):
    """Torch's generator and TorchRL's exploration type cannot be isolated on a
    background thread: the evaluation runs while trigger_eval waits, seeded from its
    episodes, and hands the trainer its own random state back."""
    results = []
    for _ in range(2):
        with Evaluator(
            SlowCountdownEnv,
            make_policy(),
            num_workers=0,
            num_trajectories=4,
            envs_per_worker=2,
            exploration_type=exploration,
        ) as ev:
            seen = run_trainer(ev)
        assert seen["draws"] == expected_draws(len(seen["draws"]))
        assert seen["modes"] == {ExplorationType.RANDOM} and seen["after"] is None
        assert seen["counts"] == {seen["threads"]}
        results.append(seen["result"]["eval/reward"])
    assert results[0] == results[1]  # seeded from the episodes, not from the trainer
