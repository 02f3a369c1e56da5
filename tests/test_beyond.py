"""Suites, statistics, success rate, info keys, episode_metrics_fn, comparisons, video."""

from __future__ import annotations

import functools

import gymnasium as gym
import imageio
import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torchrl.record.loggers.csv import CSVLogger

from ray_eval import Evaluator, compare_results
from ray_eval.results.metrics import BOOTSTRAP_SAMPLES
from tests.envs import SeedLengthEnv


def cartpole_policy():
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def test_suite_member_metrics_match_separate_evaluations(ray_local):
    policy = cartpole_policy()
    short = functools.partial(gym.make, "CartPole-v1", max_episode_steps=20)
    suite = {"short": short, "full": "CartPole-v1"}
    with Evaluator(suite, policy, num_workers=2, num_trajectories=6, seed=4) as ev:
        result = ev.evaluate(step=3)
    assert result["eval/num_episodes"] == 12
    for name, env in suite.items():
        with Evaluator(env, policy, num_workers=0, num_trajectories=6, seed=4) as alone:
            single = alone.evaluate(step=3)
        member = {
            k.removeprefix(f"eval/{name}/"): v
            for k, v in result.items()
            if k.startswith(f"eval/{name}/")
        }
        # every statistic of the lone evaluation, bootstrap intervals included, to the last
        # bit; only what describes the evaluation as a whole (its step, timing, restarts,
        # step count and weight loads) has no per-member key
        whole = {"step", "fps", "wall_time", "worker_restarts", "env_steps"}
        whole |= {"weights_loads", "weights_loaded_bytes"}
        expected = {k.removeprefix("eval/"): v for k, v in single.items()}
        assert set(member) == set(expected) - whole, name
        assert member == {k: v for k, v in expected.items() if k not in whole}, name
        assert "reward_ci_low" in member and "reward_iqm_ci_high" in member
    assert result["eval/short/episode_length"] <= 20
    assert result.episodes.select("short").lengths.max() <= 20
    assert result["eval/reward"] == pytest.approx(
        (result["eval/short/reward"] + result["eval/full/reward"]) / 2
    )


def test_iqm_and_bootstrap_intervals_match_a_direct_computation(ray_local):
    with Evaluator(
        SeedLengthEnv, nn.Linear(2, 1), num_workers=0, num_trajectories=40, seed=2
    ) as ev:
        result = ev.evaluate(step=1)
    r = result.episodes.returns
    assert result["eval/reward_iqm"] == pytest.approx(stats.trim_mean(r, 0.25))
    # rliable's IQM: mean of the middle half of the sorted values (40 -> 20 values)
    assert result["eval/reward_iqm"] == pytest.approx(np.sort(r)[10:30].mean())
    # the same seeded percentile bootstrap, recomputed here with scipy (resamples are drawn
    # as sorted indices into the sorted returns: the same distribution as plain resampling)
    rng = np.random.default_rng([2, 1, 0xB007])
    ordered = np.sort(r)

    def resamples():
        draws = rng.integers(0, len(r), (BOOTSTRAP_SAMPLES, len(r)))
        draws.sort(axis=1)
        return ordered[draws]

    means = resamples().mean(axis=1)
    iqms = stats.trim_mean(resamples(), 0.25, axis=1)
    assert result["eval/reward_ci_low"] == pytest.approx(np.quantile(means, 0.025))
    assert result["eval/reward_ci_high"] == pytest.approx(np.quantile(means, 0.975))
    assert result["eval/reward_iqm_ci_low"] == pytest.approx(np.quantile(iqms, 0.025))
    assert result["eval/reward_iqm_ci_high"] == pytest.approx(np.quantile(iqms, 0.975))


def test_success_rate_info_keys_and_episode_metrics_fn(ray_local):
    def long_fraction(episodes):
        return {"long_fraction": float((episodes.lengths > 18).mean())}

    with Evaluator(
        SeedLengthEnv,
        nn.Linear(2, 1),
        num_workers=1,
        num_trajectories=20,
        info_keys=("speed",),
        episode_metrics_fn=long_fraction,
    ) as ev:
        result = ev.evaluate()
    lengths = result.episodes.lengths
    # SeedLengthEnv reports is_success = (t % 2 == 0) at its last step t = length
    assert result["eval/success_rate"] == pytest.approx((lengths % 2 == 0).mean())
    assert result["eval/info/speed"] == pytest.approx(2.0)
    assert result["eval/long_fraction"] == pytest.approx((lengths > 18).mean())


def test_compare_results_tells_a_real_difference_from_noise(ray_local):
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, 50)
    same = compare_results(a, rng.normal(0, 1, 50))
    better = compare_results(a, rng.normal(1.0, 1, 50))
    assert not same.significant and same.ci_low < 0 < same.ci_high
    assert better.significant and better.difference > 0.5 and better.ci_low > 0
    assert compare_results(a, a + 3, method="bootstrap").significant
    with Evaluator(SeedLengthEnv, nn.Linear(2, 1), num_workers=0, num_trajectories=10) as ev:
        r1, r2 = ev.evaluate(step=0), ev.evaluate(step=1)
    assert "difference of mean return" in str(compare_results(r1, r2))
    with pytest.raises(ValueError, match="method"):
        compare_results(a, a, method="magic")


def test_video_of_the_first_episodes_is_written_and_logged(ray_local, tmp_path):
    logger = CSVLogger(exp_name="video", log_dir=str(tmp_path / "logs"), video_format="pt")
    with Evaluator(
        "CartPole-v1",
        cartpole_policy(),
        num_workers=2,
        num_trajectories=4,
        max_steps=15,
        record_video=2,
        video_dir=tmp_path / "videos",
        video_format="mp4",
        video_logger=logger,
    ) as ev:
        result = ev.evaluate(step=5)
    frames = result.episodes.frames
    assert sorted(frames) == [("", 0), ("", 1)]  # only the first two episodes
    lengths = dict(zip(result.episodes.indices.tolist(), result.episodes.lengths.tolist()))
    for (_, index), video in frames.items():
        assert video.shape[0] == lengths[index] + 1  # reset frame + one per step
        assert video.dtype == np.uint8 and video.shape[-1] == 3
    assert len(result.videos) == 2
    for path in result.videos:
        episode = int(path.split("episode")[1].split(".")[0])
        with imageio.get_reader(path, "ffmpeg") as reader:
            assert reader.count_frames() == frames[("", episode)].shape[0]
    assert list((tmp_path / "logs").rglob("*.pt"))


def test_record_video_needs_a_rendering_env(ray_local):
    with pytest.raises(ValueError, match="render_mode='rgb_array'"):
        Evaluator(
            lambda: gym.make("CartPole-v1"),
            cartpole_policy(),
            num_workers=0,
            num_trajectories=1,
            record_video=1,
        )


@pytest.mark.parametrize(
    "suite", [{}, {"": "CartPole-v1"}, {"a/b": "CartPole-v1"}, {3: "CartPole-v1"}]
)
def test_suite_member_names_are_checked(suite):
    with pytest.raises(ValueError, match="env: "):
        Evaluator(suite, cartpole_policy(), num_workers=0)
