"""ray_eval.sb3.EvalCallback on real stable-baselines3 training runs and real Ray workers:
SB3's numbers for the same seeds, the best model as evaluated with its VecNormalize
statistics (SB3 #1556), and stops at the documented delay."""

from __future__ import annotations

import json
import pickle

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import DQN, PPO, SAC
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CallbackList,
    EveryNTimesteps,
    StopTrainingOnRewardThreshold,
)
from stable_baselines3.common.envs import BitFlippingEnv
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import (
    DummyVecEnv,
    SubprocVecEnv,
    VecFrameStack,
    VecNormalize,
)

from ray_eval.sb3 import EvalCallback

EVAL_FREQ = 256


def _sb3_returns(model, env_factory, seeds, vec_normalize_path=None) -> list[float]:
    """SB3's ``evaluate_policy``, one episode per seed."""
    returns = []
    for seed in seeds:
        env = DummyVecEnv([env_factory])
        if vec_normalize_path is not None:
            env = VecNormalize.load(vec_normalize_path, env)
            env.training, env.norm_reward = False, False
        env.seed(int(seed))
        rewards, _ = evaluate_policy(
            model, env, n_eval_episodes=1, return_episode_rewards=True, warn=False
        )
        returns.append(rewards[0])
    return returns


class WorkersAtFirstStep(BaseCallback):
    """Records, at training's first step, whether ``eval_callback`` has its evaluator
    (its workers requested) and how many evaluations it has handled."""

    def __init__(self, eval_callback: EvalCallback) -> None:
        super().__init__()
        self.eval_callback, self.seen = eval_callback, []

    def _on_step(self) -> bool:
        if not self.seen:
            self.seen.append(
                (self.eval_callback.evaluator is not None, len(self.eval_callback.results))
            )
        return True


@pytest.mark.parametrize(
    "algo, env_id, kwargs, num_workers",
    [
        (PPO, "CartPole-v1", dict(n_steps=EVAL_FREQ, n_epochs=1), 2),
        (SAC, "Pendulum-v1", dict(learning_starts=100, train_freq=16), 1),
    ],
    ids=["ppo-cartpole", "sac-pendulum"],
)
def test_best_model_gives_evaluate_policys_numbers(
    ray_local, tmp_path, algo, env_id, kwargs, num_workers
):
    model = algo("MlpPolicy", env_id, policy_kwargs=dict(net_arch=[16]), seed=0, **kwargs)
    callback = EvalCallback(
        gym.make(env_id),
        eval_freq=EVAL_FREQ,
        n_eval_episodes=4,
        best_model_save_path=str(tmp_path),
        log_path=str(tmp_path),
        warn=False,
        verbose=0,
        num_workers=num_workers,
    )
    starting = WorkersAtFirstStep(callback)
    model.learn(3 * EVAL_FREQ, callback=CallbackList([callback, starting]))
    # the workers were asked for when learn() started, not at the first evaluation
    assert starting.seen == [(True, 0)]

    steps = [EVAL_FREQ, 2 * EVAL_FREQ, 3 * EVAL_FREQ]
    assert (
        callback.evaluations_timesteps == steps == [int(r["eval/step"]) for r in callback.results]
    )
    saved = np.load(tmp_path / "evaluations.npz")
    assert saved["timesteps"].tolist() == steps
    assert saved["results"].tolist() == [r.episodes.returns.tolist() for r in callback.results]
    means = [float(np.mean(r)) for r in callback.evaluations_results]
    assert callback.best_mean_reward == max(means) and callback.last_mean_reward == means[-1]
    assert callback.evaluator is None, "workers stop at the end of training"

    best_step = json.loads((tmp_path / "best_model.json").read_text())["step"]
    best = next(r for r in callback.results if r["eval/step"] == best_step)
    assert float(np.mean(best.episodes.returns)) == callback.best_mean_reward
    reloaded = algo.load(tmp_path / "best_model")
    sb3 = _sb3_returns(reloaded, lambda: gym.make(env_id), best.episodes.seeds)
    assert sb3 == best.episodes.returns.tolist()  # bit for bit, episode by episode


def _bit_flipping() -> gym.Env:
    return BitFlippingEnv(n_bits=4, max_steps=8)  # Dict of MultiBinary observations


def _taxi() -> gym.Env:
    return gym.make("Taxi-v4", max_episode_steps=40)  # Discrete(500) observations


@pytest.mark.parametrize(
    "make_env, policy",
    [(_bit_flipping, "MultiInputPolicy"), (_taxi, "MlpPolicy")],
    ids=["dict", "discrete"],
)
def test_dict_and_discrete_observations_give_evaluate_policys_numbers(make_env, policy):
    """Observations that are not arrays travel flattened and reach SB3's predict as they
    were: the same returns as evaluate_policy, seed by seed (in-process, blocking)."""
    model = DQN(
        policy, make_env(), learning_starts=10_000, seed=0, policy_kwargs=dict(net_arch=[16])
    )
    callback = EvalCallback(
        make_env(),
        eval_freq=16,
        n_eval_episodes=4,
        async_eval=False,
        num_workers=0,
        warn=False,
        verbose=0,
    )
    model.learn(16, callback=callback)  # no update before learning_starts: the weights evaluated
    result = callback.results[0]
    assert _sb3_returns(model, make_env, result.episodes.seeds) == result.episodes.returns.tolist()


class _TrainingStats(BaseCallback):
    """Copies the training env's VecNormalize statistics at each evaluation point."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every, self.stats = every, {}

    def _on_step(self) -> bool:
        if self.n_calls % self.every == 0:
            rms = self.model.get_vec_normalize_env().obs_rms
            self.stats[self.num_timesteps] = (rms.mean.copy(), rms.var.copy())
        return True


def test_vecnormalize_statistics_saved_are_the_ones_evaluated(ray_local, tmp_path):
    make = lambda: gym.make("CartPole-v1")  # noqa: E731
    train_env = VecNormalize(DummyVecEnv([make]))
    eval_env = VecNormalize(DummyVecEnv([make]), training=False, norm_reward=False)
    model = PPO(
        "MlpPolicy",
        train_env,
        n_steps=EVAL_FREQ,
        n_epochs=1,
        seed=1,
        policy_kwargs=dict(net_arch=[16]),
    )
    stats = _TrainingStats(EVAL_FREQ)
    callback = EvalCallback(
        eval_env,
        eval_freq=EVAL_FREQ,
        n_eval_episodes=4,
        best_model_save_path=str(tmp_path),
        warn=False,
        verbose=0,
        num_workers=1,
    )
    model.learn(3 * EVAL_FREQ, callback=[stats, callback])

    best_step = json.loads((tmp_path / "best_model.json").read_text())["step"]
    with open(tmp_path / "vecnormalize.pkl", "rb") as handle:
        saved = pickle.load(handle)
    mean, var = stats.stats[best_step]
    np.testing.assert_array_equal(saved.obs_rms.mean, mean)
    np.testing.assert_array_equal(saved.obs_rms.var, var)
    others = [m for step, (m, _) in stats.stats.items() if step != best_step]
    assert others and all(not np.array_equal(m, mean) for m in others), "each step's differ"
    # Reloading the best model with its statistics reproduces its evaluation (SB3 #1556).
    best = next(r for r in callback.results if r["eval/step"] == best_step)
    reloaded = PPO.load(tmp_path / "best_model")
    sb3 = _sb3_returns(reloaded, make, best.episodes.seeds, tmp_path / "vecnormalize.pkl")
    assert sb3 == best.episodes.returns.tolist()


@pytest.mark.parametrize("async_eval", [True, False])
def test_stop_on_threshold_arrives_within_one_eval_freq(ray_local, async_eval):
    """StopTrainingOnRewardThreshold on the first evaluation (any return passes -1): SB3's
    blocking callback stops at that evaluation's step; the async one at most eval_freq
    calls later, without a second evaluation."""
    model = PPO(
        "MlpPolicy", "CartPole-v1", n_steps=64, n_epochs=1, seed=0, policy_kwargs=dict(net_arch=[8])
    )
    callback = EvalCallback(
        gym.make("CartPole-v1"),
        callback_on_new_best=StopTrainingOnRewardThreshold(reward_threshold=-1),
        eval_freq=EVAL_FREQ,
        n_eval_episodes=2,
        warn=False,
        verbose=0,
        async_eval=async_eval,
        num_workers=1 if async_eval else 0,  # blocking: in-process
        best_by="reward" if async_eval else "reward_ci_low",
    )
    model.learn(20 * EVAL_FREQ, callback=callback)
    assert callback.evaluations_timesteps == []
    result = callback.results[0]
    assert result["eval/step"] == EVAL_FREQ
    key = "eval/reward" if async_eval else "eval/reward_ci_low"
    assert callback.best_mean_reward == max(r[key] for r in callback.results)
    if async_eval:
        # The stop comes with the first result, one evaluation's duration late. When that
        # evaluation (with its worker's start-up) outlasts eval_freq steps on a loaded
        # machine, the evaluation due meanwhile was already triggered: it may report too,
        # but training stops at the first step after the deciding result is handled.
        steps = [r["eval/step"] for r in callback.results]
        assert steps == sorted(set(steps)) and all(s % EVAL_FREQ == 0 for s in steps)
        assert model.num_timesteps >= EVAL_FREQ
        if len(steps) == 1:
            assert model.num_timesteps <= 2 * EVAL_FREQ
    else:
        assert len(callback.results) == 1 and model.num_timesteps == EVAL_FREQ


def test_under_an_event_callback_the_last_evaluations_are_handled_at_the_end():
    """SB3's EveryNTimesteps passes on_step to its child but not on_training_end: the
    evaluations still running when learn() ends are handled all the same, and the workers
    stop, as SB3's blocking callback leaves nothing pending (async, in-process)."""
    model = PPO(
        "MlpPolicy", "CartPole-v1", n_steps=64, n_epochs=1, seed=0, policy_kwargs=dict(net_arch=[8])
    )
    callback = EvalCallback(
        gym.make("CartPole-v1"),
        eval_freq=1,
        n_eval_episodes=2,
        warn=False,
        verbose=0,
        num_workers=0,
    )
    every = EveryNTimesteps(n_steps=64, callback=callback)
    model.learn(4 * 64, callback=every)
    assert callback.evaluations_timesteps == []  # no log_path: SB3 keeps no lists
    assert [int(r["eval/step"]) for r in callback.results] == [64, 128, 192, 256]
    assert callback.evaluator is None, "the workers stop at the end of learn()"
    model.learn(64, callback=every, reset_num_timesteps=False)  # chained once, not twice
    assert [int(r["eval/step"]) for r in callback.results] == [64, 128, 192, 256, 320]
    assert callback.evaluator is None


def test_unsupported_eval_envs_fail_at_construction():
    with pytest.raises(ValueError, match="render=True is not supported"):
        EvalCallback(gym.make("CartPole-v1"), render=True)
    stacked = VecFrameStack(DummyVecEnv([lambda: gym.make("CartPole-v1")]), 2)
    with pytest.raises(TypeError, match="wrapped in VecFrameStack"):
        EvalCallback(stacked)
    subproc = SubprocVecEnv([lambda: gym.make("CartPole-v1")], start_method="fork")
    try:
        with pytest.raises(TypeError, match="eval_env is a SubprocVecEnv"):
            EvalCallback(subproc)
    finally:
        subproc.close()
