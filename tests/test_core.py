"""The core contract: the tutorial's API over a real Ray actor pool.

Tests that only evaluate share the module's ``pendulum_pool`` (tests/conftest.py):
one pool and two worker processes instead of one each. Tests of a busy policy, a
callback, shutdown or another env build their own.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from tensordict import TensorDict, from_module
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.collectors import RandomPolicy
from torchrl.envs import GymEnv

from ray_eval import EvalResult, Evaluator, EvaluatorBusyError
from tests.checks import PENDULUM_POOL, live_actor_ids, pendulum_policy
from tests.envs import SeedLengthEnv

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL_KEYS = [
    "eval/reward",
    "eval/reward_std",
    "eval/num_episodes",
    "eval/episode_length",
    "eval/fps",
    "eval/step",
]


def perturbed(policy: TensorDictModule, scale: float = 0.5, seed: int = 1) -> TensorDict:
    gen = torch.Generator().manual_seed(seed)
    weights = from_module(policy).data.clone()
    return weights.apply(lambda p: p + scale * torch.randn(p.shape, generator=gen))


def test_tutorial_runs_with_only_the_import_changed():
    tutorial = (ROOT / "examples" / "tutorial.py").read_text()
    assert "from ray_eval import Evaluator" in tutorial
    assert "from torchrl.collectors import RandomPolicy" in tutorial
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "tutorial.py")],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout
    assert "poll() returned: None" in lines
    # TorchRL 0.14.1's wording (the tutorial's printed output predates its "'skip' or").
    assert (
        "Errored with: Evaluation already pending. Wait for completion or set "
        "busy_policy='skip' or busy_policy='queue'." in lines
    )
    for label in (
        "First eval:",
        "Second eval:",
        "poll(timeout=30) returned:",
        "Before weight update:",
        "After weight update:",
        "With TensorDict weights:",
        "Process backend:",
    ):
        line = next(x for x in lines.splitlines() if x.startswith(label))
        result = eval(line[len(label) :].strip())  # a dict of plain scalars, printed
        assert list(result)[:6] == TUTORIAL_KEYS
        assert result["eval/num_episodes"] == 1 and result["eval/episode_length"] == 200.0
    # The tutorial prints the first CSV that rglob finds, in directory order: which result
    # key that is depends on the file system. Whichever it is, it has one row per step.
    logged = lines.split("Logged to:", 1)[1].strip().splitlines()[1:]
    assert [row.split(",")[0] for row in logged] == ["0", "1", "2"], logged


def in_process_like_the_pool(policy, **kwargs) -> Evaluator:
    """An in-process evaluator with ``pendulum_pool``'s plan: the same numbers."""
    return Evaluator("Pendulum-v1", policy, **{**PENDULUM_POOL, "num_workers": 0, **kwargs})


def test_same_numbers_with_one_two_workers_and_in_process(pendulum_pool):
    policy = pendulum_policy()
    weights = perturbed(policy)
    results = {}
    for workers in (0, 1):
        with in_process_like_the_pool(policy, num_workers=workers) as ev:
            results[workers] = ev.evaluate(weights=weights, step=5)
            assert ev.num_workers == workers
    results[2] = pendulum_pool.evaluate(weights=weights, step=5)
    assert pendulum_pool.num_workers == 2
    for workers in (1, 2):
        assert results[workers]["eval/reward"] == results[0]["eval/reward"]
        np.testing.assert_array_equal(
            results[workers].episodes.returns, results[0].episodes.returns
        )
    # two workers really shared the work
    assert set(results[2].episodes.workers.tolist()) == {0, 1}
    assert set(results[0].episodes.workers.tolist()) == {-1}


def test_result_is_flat_scalars_with_statistics_and_episodes(pendulum_pool):
    result = pendulum_pool.evaluate(step=0)
    assert isinstance(result, EvalResult)
    assert list(result)[:6] == TUTORIAL_KEYS
    assert all(isinstance(v, int | float) for v in result.values())
    returns = result.episodes.returns
    assert len(returns) == 6 and sorted(result.episodes.indices.tolist()) == list(range(6))
    assert result["eval/reward"] == pytest.approx(returns.mean())
    assert result["eval/reward_std"] == pytest.approx(returns.std())
    assert result["eval/reward_min"] == returns.min() and result["eval/reward_max"] == returns.max()
    assert result["eval/reward_median"] == pytest.approx(np.median(returns))
    assert result["eval/reward_ci_low"] <= result["eval/reward"] <= result["eval/reward_ci_high"]
    assert result["eval/episode_length"] == 200.0
    assert result["eval/fps"] == pytest.approx(1200 / result["eval/wall_time"])
    assert pendulum_pool.last_episodes is result.episodes
    # log_prefix names every key (the pool and in-process aggregate alike: planning.py)
    with in_process_like_the_pool(pendulum_policy(), log_prefix="val") as local:
        prefixed = local.evaluate(step=0)
    assert list(prefixed)[:6] == [k.replace("eval/", "val/") for k in TUTORIAL_KEYS]
    assert all(key.startswith("val/") for key in prefixed)
    assert prefixed["val/reward"] == result["eval/reward"]


def test_weights_as_module_or_tensordict_agree_and_new_weights_change_results(pendulum_pool):
    policy = pendulum_policy()  # the weights pendulum_pool's policy was built with
    ev = pendulum_pool
    initial = ev.evaluate(step=0)["eval/reward"]
    trained = pendulum_policy()
    from_module(trained).data.copy_(perturbed(policy))
    as_module = ev.evaluate(weights=trained, step=1)["eval/reward"]
    as_td = ev.evaluate(weights=from_module(trained), step=1)["eval/reward"]
    as_state_dict = ev.evaluate(weights=trained.state_dict(), step=1)["eval/reward"]
    back_to_initial = ev.evaluate(step=0)["eval/reward"]
    assert as_module == as_td == as_state_dict
    assert as_module != initial  # the new weights were used
    assert back_to_initial == initial  # None means the weights the policy was built with


def test_weights_are_put_once_and_shared_by_every_worker(pendulum_pool):
    policy = pendulum_policy()
    # 6 episodes, 4 env copies a worker: a chunk of 4 and one of 2, one per worker
    first = pendulum_pool.evaluate(weights=policy)
    second = pendulum_pool.evaluate(weights=policy)
    for result in (first, second):
        ids = set(result.episodes.weights_ids.tolist())
        assert len(ids) == 1 and "" not in ids  # one object, read by both workers
        assert set(result.episodes.workers.tolist()) == {0, 1}
    assert first.episodes.weights_ids[0] != second.episodes.weights_ids[0]  # one put per evaluation


def test_the_pool_actor_imports_no_torch_and_gymnasium_workers_no_torchrl(pendulum_pool):
    """Imports are seconds of every start-up. The pool actor only plans and routes: what
    the workers report (their env parts included) unpickles without torch. A worker that
    evaluates a gymnasium env with a TensorDict policy needs torch and tensordict but
    not TorchRL (about 1 s)."""
    pendulum_pool.evaluate(weights=pendulum_policy(), step=1)
    heavy = ("torch", "tensordict", "torchrl")
    pool = pendulum_pool._backend._pool

    def imported(_) -> list[str]:
        return [name for name in heavy if name in sys.modules]

    assert ray.get(pool.__ray_call__.remote(imported), timeout=60) == []
    workers = ray.get(pool.__ray_call__.remote(lambda pool: pool._workers), timeout=60)
    on_workers = ray.get([w.__ray_call__.remote(imported) for w in workers], timeout=60)
    assert on_workers == [["torch", "tensordict"]] * len(workers)


def test_trigger_eval_returns_an_object_ref_usable_with_ray_get_and_wait(pendulum_pool):
    ev = pendulum_pool
    ref = ev.trigger_eval(step=7)
    assert isinstance(ref, ray.ObjectRef)
    mine = ray.put("user object")
    ready, _ = ray.wait([ref, mine], num_returns=2, timeout=60)
    assert len(ready) == 2
    got = ray.get(ref)
    polled = ev.poll(timeout=10)
    assert polled == got and polled["eval/step"] == 7


def test_queue_runs_every_request_in_order_with_its_step(pendulum_pool):
    ev = pendulum_pool  # busy_policy="queue"; its on_result logs to ev.delivered
    refs = [ev.trigger_eval(step=s) for s in range(10, 16)]
    assert all(isinstance(r, ray.ObjectRef) for r in refs)
    assert ev.pending
    results = [ev.wait(timeout=60) for _ in refs]
    assert ev.poll() is None and not ev.pending
    assert [r["eval/step"] for r in results] == list(range(10, 16))
    assert [ray.get(r)["eval/step"] for r in refs] == list(range(10, 16))
    assert [step for step, _ in ev.delivered] == list(range(10, 16))


def test_latest_replaces_a_waiting_request(ray_local):
    with Evaluator(
        "Pendulum-v1",
        pendulum_policy(),
        num_workers=1,
        num_trajectories=64,
        envs_per_worker=1,
        busy_policy="latest",
    ) as ev:
        ev.trigger_eval(step=0)  # runs for a while (64 sequential episodes)
        for step in (1, 2, 3):
            ev.trigger_eval(step=step)
        steps = []
        while (result := ev.wait(timeout=120)) is not None:
            steps.append(result["eval/step"])
    assert steps == [0, 3]


def test_error_and_skip_busy_policies(ray_local):
    with Evaluator(
        "Pendulum-v1", pendulum_policy(), num_workers=1, num_trajectories=32, envs_per_worker=1
    ) as ev:
        ev.trigger_eval()
        with pytest.raises(EvaluatorBusyError, match="busy_policy='queue'"):
            ev.trigger_eval()
        with pytest.raises(RuntimeError, match="already pending"):
            ev.evaluate()
        assert ev.wait(timeout=120)["eval/step"] == 0
    with Evaluator(
        "Pendulum-v1",
        pendulum_policy(),
        num_workers=1,
        num_trajectories=32,
        envs_per_worker=1,
        busy_policy="skip",
    ) as ev:
        assert ev.trigger_eval() is not None
        assert ev.trigger_eval() is None
        assert ev.wait(timeout=120)["eval/step"] == 0
        assert ev.trigger_eval() is not None  # no step was used up by the skipped request
        assert ev.wait(timeout=120)["eval/step"] == 1


def test_evaluate_while_async_pending_waits_its_turn(ray_local):
    with Evaluator(
        "Pendulum-v1",
        pendulum_policy(),
        num_workers=1,
        num_trajectories=16,
        envs_per_worker=1,
        busy_policy="queue",
    ) as ev:
        ev.trigger_eval(step=1)
        sync = ev.evaluate(step=2)
        assert sync["eval/step"] == 2
        assert ev.wait(timeout=60)["eval/step"] == 1  # the async result is not lost


def test_on_result_fires_for_async_results_without_polling(pendulum_pool):
    ev = pendulum_pool  # its on_result logs (step, thread) to ev.delivered
    ev.trigger_eval(step=4)
    deadline = time.monotonic() + 60
    while not ev.delivered and time.monotonic() < deadline:  # no poll, no wait
        time.sleep(0.01)
    assert ev.delivered == [(4, "ray-eval-results")]


def test_on_result_that_raises_is_logged_not_fatal(ray_local, caplog):
    def bad(td):
        raise ValueError("logger is down")

    with Evaluator(
        "Pendulum-v1", pendulum_policy(), num_workers=1, num_trajectories=1, on_result=bad
    ) as ev:
        assert ev.evaluate()["eval/num_episodes"] == 1
        ev.trigger_eval()
        assert ev.wait(timeout=60)["eval/num_episodes"] == 1
    assert "logger is down" in caplog.text


def test_variable_length_episodes_are_all_counted_once(ray_local):
    policy = nn.Sequential(nn.Linear(2, 1))
    with Evaluator(
        SeedLengthEnv, policy, num_workers=2, num_trajectories=50, envs_per_worker=8, seed=11
    ) as ev:
        result = ev.evaluate(step=3)
    ep = result.episodes
    assert sorted(ep.indices.tolist()) == list(range(50))
    expected = np.array([SeedLengthEnv.length_for(s) for s in ep.seeds])
    np.testing.assert_array_equal(ep.lengths, expected)  # every episode ran to its own end
    np.testing.assert_array_equal(ep.returns, expected.astype(float))
    assert len(set(expected.tolist())) > 10  # lengths really vary
    assert result["eval/episode_length"] == pytest.approx(expected.mean())  # no bias to short ones


def test_cartpole_random_policy_counts_every_episode(ray_local):
    env_maker = functools.partial(GymEnv, "CartPole-v1")
    with Evaluator(
        env_maker,
        policy_factory=functools.partial(RandomPolicy, env_maker().action_spec),
        num_workers=2,
        num_trajectories=40,
        envs_per_worker=16,
    ) as ev:
        result = ev.evaluate()
    assert result["eval/num_episodes"] == 40
    assert sorted(result.episodes.indices.tolist()) == list(range(40))
    assert result.episodes.lengths.min() >= 8 and len(set(result.episodes.lengths.tolist())) > 5


def test_each_result_uses_exactly_its_own_weights(pendulum_pool):
    policy = pendulum_policy()
    a, b = perturbed(policy, seed=1), perturbed(policy, seed=2)
    with in_process_like_the_pool(policy) as local:
        expected = {
            name: local.evaluate(weights=w, step=9)["eval/reward"]
            for name, w in (("a", a), ("b", b))
        }
    assert expected["a"] != expected["b"]
    ev = pendulum_pool  # busy_policy="queue"
    assert ev.evaluate(weights=a, step=9)["eval/reward"] == expected["a"]
    for _ in range(3):
        ev.trigger_eval(weights=b, step=9)
    for _ in range(3):
        assert ev.wait(timeout=60)["eval/reward"] == expected["b"]
    ev.trigger_eval(weights=a, step=9)
    ev.trigger_eval(weights=b, step=9)
    assert [ev.wait(timeout=60)["eval/reward"] for _ in range(2)] == [
        expected["a"],
        expected["b"],
    ]


def test_trainer_may_change_weights_right_after_trigger(pendulum_pool):
    policy = pendulum_policy(seed=5)  # not the weights the pool's policy was built with
    with in_process_like_the_pool(policy) as local:
        expected = local.evaluate(weights=policy, step=1)["eval/reward"]
    pendulum_pool.trigger_eval(weights=policy, step=1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    assert pendulum_pool.wait(timeout=60)["eval/reward"] == expected


def test_shutdown_leaves_no_actor_alive_and_is_idempotent(ray_local):
    ev = Evaluator("Pendulum-v1", pendulum_policy(), num_workers=2, num_trajectories=4)
    ids = set(ev.actor_ids)
    assert len(ids) == 3 and ids <= live_actor_ids()  # the pool and two workers
    ev.trigger_eval()
    ev.shutdown()
    ev.shutdown()
    deadline = time.time() + 20
    while ids & live_actor_ids() and time.time() < deadline:
        time.sleep(0.2)
    assert not ids & live_actor_ids()
    with pytest.raises(RuntimeError, match="shut down"):
        ev.evaluate()


def test_state_dict_round_trip(ray_local):
    with Evaluator("Pendulum-v1", pendulum_policy(), num_workers=0, num_trajectories=1) as ev:
        ev.evaluate()
        ev.evaluate()
        state = ev.state_dict()
    assert state == {"step_counter": 2}
    with Evaluator("Pendulum-v1", pendulum_policy(), num_workers=0, num_trajectories=1) as ev:
        ev.load_state_dict(state)
        assert ev.evaluate()["eval/step"] == 2


def test_gymenv_fast_path_gives_the_torchrl_path_numbers(ray_local):
    policy = pendulum_policy()
    env_maker = functools.partial(GymEnv, "Pendulum-v1")
    results = {}
    for fast in (True, False):
        with Evaluator(
            env_maker,
            policy,
            num_workers=0,
            num_trajectories=4,
            seed=5,
            fast_path=fast,
            envs_per_worker=4,
        ) as ev:
            results[fast] = ev.evaluate(step=2)
            results[fast, "loop"] = ev.workers[0].rollouts[""]
    assert (
        results[True, "loop"] == "GymnasiumRollout" and results[False, "loop"] == "TorchRLRollout"
    )
    np.testing.assert_array_equal(results[True].episodes.returns, results[False].episodes.returns)
    np.testing.assert_array_equal(results[True].episodes.lengths, results[False].episodes.lengths)


def test_torchrl_env_with_transforms_and_a_probabilistic_actor(ray_local):
    from tensordict.nn import NormalParamExtractor
    from torchrl.envs import StepCounter, TransformedEnv
    from torchrl.modules import ProbabilisticActor, TanhNormal

    def make_env():
        return TransformedEnv(GymEnv("Pendulum-v1"), StepCounter(max_steps=50))

    net = nn.Sequential(nn.Linear(3, 2), NormalParamExtractor())
    actor = ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        distribution_class=TanhNormal,
        return_log_prob=False,
    )
    with Evaluator(make_env, actor, num_workers=2, num_trajectories=4, envs_per_worker=2) as ev:
        result = ev.evaluate()
        assert ev.workers[0].rollouts[""] == "TorchRLRollout"
    assert result["eval/episode_length"] == 50.0  # the StepCounter transform ended them
    assert result["eval/num_episodes"] == 4


def test_plain_module_and_callable_policies(ray_local):
    with Evaluator("CartPole-v1", nn.Linear(4, 2), num_workers=0, num_trajectories=3) as ev:
        assert ev.evaluate()["eval/num_episodes"] == 3  # logits -> argmax
    with Evaluator(
        "CartPole-v1", lambda obs: (obs[:, 2] > 0).long(), num_workers=1, num_trajectories=3
    ) as ev:
        assert ev.evaluate()["eval/reward"] > 30  # a sensible hand-written controller


def test_policy_factory_called_with_env_when_it_takes_one(ray_local):
    def factory(env):
        return RandomPolicy(env.action_spec)

    with Evaluator(
        functools.partial(GymEnv, "Pendulum-v1"),
        policy_factory=factory,
        num_workers=1,
        num_trajectories=2,
        exploration_type=__import__("torchrl").envs.utils.ExplorationType.RANDOM,
    ) as ev:
        assert ev.evaluate()["eval/num_episodes"] == 2


def test_stochastic_policy_is_reproducible_and_leaves_the_callers_rng_alone(ray_local):
    from torchrl.envs.utils import ExplorationType

    env_maker = functools.partial(GymEnv, "Pendulum-v1")
    policy = RandomPolicy(env_maker().action_spec)
    results = []
    for caller_seed in (123, 456):  # the caller's random state does not matter...
        with Evaluator(
            env_maker,
            policy,
            num_workers=0,
            num_trajectories=3,
            exploration_type=ExplorationType.RANDOM,
        ) as ev:
            torch.manual_seed(caller_seed)
            expected_next = torch.rand(
                1, generator=torch.Generator().manual_seed(caller_seed)
            ).item()
            results.append(ev.evaluate(step=1)["eval/reward"])
            # the in-process rollout did not consume the caller's random numbers
            assert torch.rand(1).item() == expected_next
    assert results[0] == results[1]  # ...the episodes' seeds do
