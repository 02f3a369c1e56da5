"""Env state set through ``weights_dict`` travels with every request.

It persists until the same key is given again, and every request carries all of
it (on Ray, one object-store ref, like the weights): a worker that Ray restarted
after a crash, one replaced after a timeout, in-process or on Ray, computes the
same numbers as one that saw every request. Keys an env cannot load are refused at
the call, on every kind of env.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import time

import numpy as np
import pytest
from torchrl.envs import RewardScaling

import tests.torchrl_parts as parts
from ray_eval import EvaluationTimeout, Evaluator
from tests.checks import small_policy, wait_no_evaluator_threads

PLAN = {"num_trajectories": 8, "envs_per_worker": 4, "seed": 4}
SCALED = {"env.transform": RewardScaling(0.0, 100.0)}  # rewards x100


def reference(step: int):
    """The numbers of a fault-free in-process run with rewards scaled x100."""
    with Evaluator(
        parts.scaled_seed_length_env(), small_policy(), num_workers=0, **PLAN
    ) as evaluator:
        evaluator.evaluate(weights_dict=SCALED, step=0)
        return evaluator.evaluate(step=step)


def assert_same_returns(result, expected) -> None:
    np.testing.assert_array_equal(result.episodes.seeds, expected.episodes.seeds)
    np.testing.assert_array_equal(result.episodes.returns, expected.episodes.returns)


def test_env_state_persists_and_reaches_a_worker_restarted_after_sigkill(ray_local):
    expected = reference(step=2)
    unscaled = expected.episodes.returns / 100
    assert np.all(expected.episodes.returns > 50)  # the scale is in
    env = functools.partial(parts.scaled_seed_length_env, step_sleep=0.01)
    with Evaluator(env, small_policy(), num_workers=2, max_restarts=3, **PLAN) as evaluator:
        evaluator.evaluate(weights_dict=SCALED, step=0)
        clean = evaluator.evaluate(step=2)  # no weights_dict: the scale persists
        started = time.perf_counter()
        evaluator.evaluate(step=2)
        clean_s = time.perf_counter() - started
        victim = evaluator.workers[1].pid
        evaluator.trigger_eval(step=2)
        time.sleep(clean_s / 3)
        os.kill(victim, signal.SIGKILL)  # its chunk runs again on the restarted worker
        killed = evaluator.wait(timeout=120)
    assert killed["eval/worker_restarts"] >= 1
    for result in (clean, killed):
        assert_same_returns(result, expected)
    assert not np.allclose(killed.episodes.returns, unscaled)


def test_env_state_reaches_the_fresh_worker_that_replaces_a_timed_out_one(tmp_path):
    """In-process: the request that set the scale hangs and times out; the fresh worker
    that runs the next request gets the scale from that request."""
    expected = reference(step=2)
    env = functools.partial(
        parts.scaled_seed_length_env,
        hang_file=str(tmp_path / "hang"),
        fault_step=1,
        hang_seconds=6.0,  # the abandoned thread ends, and closes its envs, soon after
    )
    with Evaluator(env, small_policy(), num_workers=0, timeout=3.0, **PLAN) as evaluator:
        with pytest.raises(EvaluationTimeout):
            evaluator.evaluate(weights_dict=SCALED, step=0)
        after = evaluator.evaluate(step=2)
    assert_same_returns(after, expected)
    # No thread is left behind for the tests that run next in this process.
    assert not wait_no_evaluator_threads(timeout=15)


@pytest.mark.parametrize(
    ("env", "key", "message"),
    [
        ("vector:CartPole-v1", "env.does_not_exist[7]", "native vector envs have none"),
        ("CartPole-v1", "env.transform", "gymnasium envs and native vector envs have none"),
        (
            functools.partial(parts.scaled_seed_length_env),
            "env.transform[7]",
            "the env (TransformedEnv) has no [7] there (below env.transform); its parts are",
        ),
        (functools.partial(parts.scaled_seed_length_env), "env.base", "has no .base there"),
    ],
    ids=["vector", "gymnasium", "torchrl-index", "torchrl-name"],
)
def test_env_keys_an_env_cannot_load_are_refused_at_the_call(env, key, message):
    policy = small_policy() if not isinstance(env, str) else None
    kwargs = {"policy": policy} if policy is not None else {"policy_factory": cartpole_policy}
    with Evaluator(env, num_workers=0, num_trajectories=4, max_steps=10, **kwargs) as evaluator:
        with pytest.raises(ValueError, match=re.escape(f"weights_dict key {key!r}")) as error:
            evaluator.evaluate(weights_dict={key: RewardScaling(0.0, 2.0)})
        assert message in str(error.value)
        assert evaluator.state_dict()["step_counter"] == 0  # nothing was sent
        evaluator.evaluate()  # and the evaluator works on


def test_a_state_with_other_keys_is_refused_at_the_call():
    with Evaluator(
        parts.scaled_seed_length_env, small_policy(), num_workers=0, num_trajectories=2
    ) as evaluator:
        with pytest.raises(ValueError, match=r"'env.transform': the state given has keys"):
            evaluator.evaluate(weights_dict={"env.transform": {"scale": 2.0}})
        assert evaluator.evaluate()["eval/num_episodes"] == 2


def cartpole_policy():
    import torch

    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)
