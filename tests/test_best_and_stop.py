"""Best checkpoint, early stopping and the per-episode record (ray_eval.integrations),
on real evaluations: reloading the best reproduces its number, the env-part
statistics saved are the ones evaluated, and an async stop arrives at the
documented delay."""

from __future__ import annotations

import functools
import json
import logging
import time

import gymnasium as gym
import numpy as np
import pytest
import ray
import torch

import tests.envs as envs
import tests.torchrl_parts as parts
from ray_eval import Evaluator
from ray_eval.integrations import (
    EpisodeRecord,
    EvalSchedule,
    KeepBest,
    StopOnNoImprovement,
    StopOnThreshold,
    load_best,
)
from tests.checks import fresh_weights, small_policy
from tests.conftest import NUM_CPUS

ray.cloudpickle.register_pickle_by_value(parts)
ray.cloudpickle.register_pickle_by_value(envs)


def _perturbed(policy, scale: float) -> torch.nn.Module:
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale)
    return policy


# -- keep the best, with the env parts it was evaluated with (SB3 #1556) ---------------------


def test_reloaded_best_reproduces_its_number_with_its_normalization(ray_local, tmp_path):
    """The best is saved with the VecNormV2 statistics it was evaluated with; reloading
    both into an Evaluator gives its number to the last bit, while the trainer's later
    statistics give another number."""
    keep = KeepBest(tmp_path / "best", metric="reward")
    policy = parts.pendulum_policy()
    stats_seen = {}
    with Evaluator(
        parts.vecnorm_env,
        parts.pendulum_policy(),
        num_workers=2,
        num_trajectories=4,
        max_steps=40,
    ) as ev:
        for step, (scale, feed) in enumerate([(0.0, 30), (0.3, 300), (-0.4, 60)]):
            _perturbed(policy, scale)
            vecnorm = parts.fed_vecnorm(feed, seed=step)
            result = ev.evaluate(policy, step=step, weights_dict={"env.transform[0]": vecnorm})
            if keep.update(result, policy, weights_dict={"env.transform[0]": vecnorm}):
                stats_seen = {k: v.clone() for k, v in vecnorm.state_dict()["_extra_state"].items()}
                best_result = dict(result)
        best = load_best(tmp_path / "best")
        again = ev.evaluate(best.weights, step=best.step, weights_dict=best.weights_dict)
        # The same weights with the trainer's current statistics: another number.
        other = ev.evaluate(
            best.weights,
            step=best.step,
            weights_dict={"env.transform[0]": parts.fed_vecnorm(900, seed=7)},
        )
    assert best.step == best_result["eval/step"] and best.value == best_result["eval/reward"]
    assert best.result["eval/reward"] == best_result["eval/reward"]
    saved = best.weights_dict["env.transform[0]"]["_extra_state"]
    assert saved.keys() == stats_seen.keys()
    assert all(torch.equal(saved[k], v) for k, v in stats_seen.items())
    for key in ("eval/reward", "eval/reward_std", "eval/reward_ci_low", "eval/reward_iqm"):
        assert again[key] == best_result[key], key
    assert other["eval/reward"] != best_result["eval/reward"]
    assert [p.name for p in (tmp_path / "best").iterdir() if p.name.startswith("best-")] == [
        best.path.name
    ]
    summary = json.loads((tmp_path / "best" / "best.json").read_text())
    assert summary["checkpoint"] == best.path.name and summary["step"] == best.step


class GainNoiseEnv(gym.Env):
    """One-step episodes: reward = a0 + a1 * (+1 if the seed is even else -1). A policy's
    bias sets a0 (the mean) and a1 (the spread across episodes)."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-10.0, 10.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._sign = 1.0 if (seed or 0) % 2 == 0 else -1.0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), float(action[0] + action[1] * self._sign), True, False, {}


def _bias_policy(a0: float, a1: float) -> torch.nn.Module:
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.copy_(torch.tensor([a0, a1]))
    return net


def test_best_by_interval_lower_bound_differs_from_best_by_mean(tmp_path):
    """A noisy checkpoint with the higher mean and a steady one with the higher lower
    bound of the interval: each criterion picks its own."""
    with Evaluator(GainNoiseEnv, _bias_policy(0, 0), num_workers=0, num_trajectories=12) as ev:
        signs = np.sign(ev.evaluate(_bias_policy(0.0, 1.0), step=2).episodes.returns).mean()
        steady = ev.evaluate(_bias_policy(1.0, 0.0), step=1)
        noisy = ev.evaluate(_bias_policy(1.2, 3.0 * (1 if signs >= 0 else -1)), step=2)
    assert noisy["eval/reward"] > steady["eval/reward"]
    assert noisy["eval/reward_ci_low"] < steady["eval/reward_ci_low"] == 1.0
    picked = {}
    for metric in ("reward", "reward_ci_low"):
        keep = KeepBest(tmp_path / metric, metric=metric)
        for r in (steady, noisy):
            keep.update(r, {"w": torch.zeros(1)})
        picked[metric] = keep.best_step
    assert picked == {"reward": 2, "reward_ci_low": 1}
    assert KeepBest(tmp_path / "default").criterion.key == "eval/reward_ci_low"
    keep_min = KeepBest(tmp_path / "min", metric="reward", mode="min")
    for r in (noisy, steady):
        keep_min.update(r, {"w": torch.zeros(1)})
    assert keep_min.best_step == 1


def test_keep_best_resume_keeps_a_better_old_best(tmp_path):
    results = [{"eval/reward": 5.0, "eval/step": 10}, {"eval/reward": 3.0, "eval/step": 20}]
    first = KeepBest(tmp_path, metric="reward")
    first.update(results[0], {"w": torch.ones(2)})
    resumed = KeepBest(tmp_path, metric="reward", resume=True)
    assert resumed.best_step == 10 and not resumed.update(results[1], {"w": torch.zeros(2)})
    fresh = KeepBest(tmp_path, metric="reward")
    assert fresh.update(results[1], {"w": torch.zeros(2)})
    best = load_best(tmp_path)
    assert best.step == 20 and torch.equal(best.weights["w"], torch.zeros(2))


def test_bad_criteria_fail_at_the_call():
    with pytest.raises(ValueError, match="mode must be 'max' or 'min'"):
        KeepBest("x", mode="best")
    with pytest.raises(KeyError, match=r"no 'eval/success'.*'eval/reward'"):
        StopOnThreshold(0.5, "success").update({"eval/reward": 1.0, "eval/step": 0})
    with pytest.raises(ValueError, match="must look like 'METRIC OP NUMBER'"):
        StopOnThreshold.parse("reward is high")
    with pytest.raises(ValueError, match="patience must be an int >= 1"):
        StopOnNoImprovement(0)
    with pytest.raises(ValueError, match="KeepBest needs the evaluated weights"):
        KeepBest("x", metric="reward").update({"eval/reward": 1.0, "eval/step": 0})


# -- stopping -------------------------------------------------------------------------------


def test_stop_on_threshold_parses_and_reads_on_result_tensordicts():
    stop = StopOnThreshold.parse("eval/reward_ci_low >= 450")
    assert str(stop) == "eval/reward_ci_low >= 450"
    flat = {"eval/reward_ci_low": torch.tensor(449.0), "eval/step": torch.tensor(3)}
    assert not stop.update(flat)
    assert stop.update({"eval/reward_ci_low": 450.0, "eval/step": 4})
    assert stop.step == 4 and "450" in stop.reason
    assert stop.update({"eval/reward_ci_low": 0.0, "eval/step": 5}), "a stop is final"
    lower = StopOnThreshold.parse("eval/episode_length < 20")
    assert lower.update({"eval/episode_length": 19.5, "eval/step": 1})


def test_stop_on_no_improvement_counts_evaluations():
    stop = StopOnNoImprovement(patience=2, metric="reward", min_delta=0.5, min_evals=1)
    values = [1.0, 0.0, 1.2, 1.4, 1.6, 0.9]  # 1.2, 1.4: not better by more than 0.5
    decisions = [stop.update({"eval/reward": v, "eval/step": i}) for i, v in enumerate(values)]
    # 0: best; 1: first eval past min_evals without improvement; 2: improves (1.2 > 1.5? no)
    assert decisions == [False, False, True, True, True, True]
    assert stop.step == 2 and stop.best == 1.0
    state = stop.state_dict()
    again = StopOnNoImprovement(patience=2, metric="reward")
    again.load_state_dict(state)
    assert again.stopped and again.best_step == 0


# -- async schedule: the stop's delay ---------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_evaluator():
    """One pool for this module's async tests: 2 workers, episodes of 1-37 steps of 3 ms,
    rewards that depend on the weights."""
    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=NUM_CPUS, logging_level=logging.WARNING, log_to_driver=False
        )
    env = functools.partial(envs.SeedLengthEnv, action_reward=True, step_sleep=0.003)
    ev = Evaluator(env, small_policy(), num_workers=2, num_trajectories=4, envs_per_worker=2)
    yield ev
    ev.shutdown()


@pytest.mark.parametrize("when_busy", ["wait", "skip"])
def test_async_stop_arrives_at_the_documented_delay(slow_evaluator, tmp_path, when_busy):
    """A fast training loop, slow evaluations (~0.1 s, several iterations): training goes
    on while they run; the stop decided on the weights of step s reaches the trainer by
    step s + every under "wait" and no evaluation starts after it."""
    every, per_iteration = 300, 100
    policy = small_policy()
    schedule = EvalSchedule(
        slow_evaluator,
        every,
        stop=StopOnThreshold(0.0, "reward"),
        record=EpisodeRecord(tmp_path / "episodes.jsonl"),
        when_busy=when_busy,
    )
    step = 0
    while not schedule.should_stop and step < 100 * every:
        step += per_iteration
        schedule.step(step, policy)
        time.sleep(0.01)
    schedule.finish()
    first = schedule.history[0]
    assert schedule.stop_step == every == first.step
    assert schedule.stop_seen_at > schedule.stop_step, "training went on during the evaluation"
    if when_busy == "wait":
        assert schedule.stop_seen_at - schedule.stop_step <= every
        assert schedule.triggered == 1 and schedule.skipped == 0
    else:  # no waiting: evaluation points passed while the first one ran were skipped
        assert schedule.triggered == 1
        assert schedule.skipped == len(range(2 * every, schedule.stop_seen_at, every))
    lines = [json.loads(line) for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == every and lines[0]["seen_at_step"] == schedule.stop_seen_at


def test_schedule_keeps_the_weights_evaluated_not_the_later_ones(slow_evaluator, tmp_path):
    """Async: the weights change right after each trigger; the best saved are those of the
    result's step, and they reproduce it."""
    policy = small_policy()
    ev = slow_evaluator
    schedule = EvalSchedule(ev, 10, keep_best=KeepBest(tmp_path, metric="reward"), at_start=True)
    kept = {}
    for step in range(0, 60, 10):
        weights = fresh_weights(small_policy(), seed=step, scale=1.5)
        weights.to_module(policy)
        kept[step] = {k: v.clone() for k, v in policy.state_dict().items()}
        schedule.step(step, policy)
        _perturbed(policy, 5.0)  # the trainer moves on at once
    schedule.finish()
    best = load_best(tmp_path)
    again = ev.evaluate(best.weights, step=best.step)
    steps = [d.step for d in schedule.history]
    assert steps == list(range(0, 60, 10))
    assert all(torch.equal(best.weights[k], v) for k, v in kept[best.step].items())
    assert best.value == max(d.result["eval/reward"] for d in schedule.history)
    assert again["eval/reward"] == best.value


def test_keep_best_in_a_relative_directory_keeps_the_new_best(tmp_path, monkeypatch):
    """A relative directory (the examples' default): the new best survives the removal of
    the old one."""
    monkeypatch.chdir(tmp_path)
    keep = KeepBest("runs/best", "reward")
    for step, reward in ((1, 0.0), (2, 1.0)):
        assert keep.update(
            {"eval/reward": reward, "eval/step": step}, {"w": torch.full((2,), step)}
        )
    best = load_best("runs/best")
    assert best.step == 2 and torch.equal(best.weights["w"], torch.full((2,), 2))
    assert [p.name for p in (tmp_path / "runs/best").iterdir() if p.is_dir()] == [best.path.name]


def test_finish_reads_results_that_arrived_unread():
    """Results that arrived after the last step() and wait unread (no longer pending) are
    handled by finish(): the last evaluations of a run are not lost (in-process, async)."""
    with Evaluator(
        envs.SuccessInfoEnv, small_policy(), num_workers=0, num_trajectories=2, busy_policy="queue"
    ) as ev:
        schedule = EvalSchedule(ev, 10, stop=StopOnThreshold(1e9, "reward"))

        def until_finished_unread() -> None:
            deadline = time.monotonic() + 60
            while ev.pending and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not ev.pending, "the evaluation finished, unread"

        assert schedule.trigger(10) == []
        until_finished_unread()
        # Arrived unread before the next point (on a loaded machine it may still be
        # running): handled there, first, either way.
        assert [d.step for d in schedule.trigger(20)] == [10]
        until_finished_unread()
        assert [d.step for d in schedule.finish()] == [20]
        assert [d.step for d in schedule.history] == [10, 20]


# -- the per-episode record --------------------------------------------------------------------------


def test_episode_record_is_plain_json_lines(tmp_path):
    record = EpisodeRecord(tmp_path / "ep.jsonl")
    with Evaluator(envs.SuccessInfoEnv, small_policy(), num_workers=0, num_trajectories=5) as ev:
        results = [ev.evaluate(step=s) for s in (0, 7)]
    for r in results:
        record.append(r)
    lines = [json.loads(line) for line in (tmp_path / "ep.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 7]
    for line, r in zip(lines, results):
        assert line["returns"] == r.episodes.returns.tolist()
        assert line["lengths"] == r.episodes.lengths.tolist()
        assert line["seeds"] == r.episodes.seeds.tolist()
        lengths = [envs.SuccessInfoEnv.length_for(s) for s in line["seeds"]]
        assert line["successes"] == [n % 2 == 1 for n in lengths]
        assert np.isclose(np.mean(line["returns"]), line["reward"])
    assert record.read() == lines
    with pytest.raises(TypeError, match="needs the result with its episodes"):
        record.append({"eval/reward": 1.0, "eval/step": 1})
