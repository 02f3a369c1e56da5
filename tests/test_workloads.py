"""Heavy workloads end to end: MuJoCo HalfCheetah-v5 and Atari Pong with a Nature CNN.

Real MuJoCo, real ALE, real Ray (the ``ray_local`` fixture), small episode counts.
MuJoCo observations are float64 and the policies float32: the fast path hands them
over as float32 (``test_halfcheetah_float32_policy_...`` checks the numbers against a
plain gymnasium loop).
"""

from __future__ import annotations

import functools

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
import torch
from torch import nn

from ray_eval import Evaluator
from ray_eval.factories import mujoco_env

CHEETAH = "HalfCheetah-v5"


def cheetah_mlp(seed: int = 0) -> nn.Module:
    """A plain float32 17 -> 256 -> 256 -> 6 tanh MLP (untrained, fixed weights)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(17, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 6), nn.Tanh()
    )


def gymnasium_returns(policy: nn.Module, seeds, dtype: torch.dtype, max_steps=None) -> list:
    """Returns of ``policy`` on HalfCheetah by a plain gymnasium loop, one env, batch of 1,
    observations cast to ``dtype`` by hand, rewards summed as float32 (as TorchRL's spec)."""
    env = gym.make(CHEETAH)
    action_dtype = env.action_space.dtype  # float32: actions are cast to the action space
    returns = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 calls on a busy 2-core machine: 1 thread is 10x faster
    try:
        with torch.no_grad():
            for seed in seeds:
                returns.append(
                    _episode_return(env, policy, int(seed), dtype, action_dtype, max_steps)
                )
    finally:
        torch.set_num_threads(threads)
    return returns


def _episode_return(env, policy, seed, dtype, action_dtype, max_steps) -> float:
    obs, _ = env.reset(seed=seed)
    total, steps, done = 0.0, 0, False
    while not done:
        action = policy(torch.from_numpy(obs).to(dtype)[None])[0].numpy().astype(action_dtype)
        obs, reward, terminated, truncated, _ = env.step(action)
        total += float(np.float32(reward))
        steps += 1
        done = terminated or truncated or steps == max_steps
    return total


# -- MuJoCo: HalfCheetah-v5 -------------------------------------------------------------


def test_halfcheetah_float32_policy_gets_float32_observations_full_episodes():
    policy = cheetah_mlp()
    assert gym.make(CHEETAH).observation_space.dtype == np.float64
    ev = Evaluator(CHEETAH, policy, num_workers=0, num_trajectories=2, envs_per_worker=1, seed=3)
    try:
        result = ev.evaluate()
    finally:
        ev.shutdown()
    episodes = result.episodes
    assert episodes.lengths.tolist() == [1000, 1000]  # HalfCheetah never terminates early
    assert result["eval/env_steps"] == 2000
    assert len(set(episodes.seeds.tolist())) == 2 and episodes.returns[0] != episodes.returns[1]
    # Exactly what a gymnasium loop gives when it casts each observation to float32.
    assert episodes.returns.tolist() == gymnasium_returns(policy, episodes.seeds, torch.float32)

    # A float64 policy keeps float64 observations: the cast follows the policy's dtype.
    policy64 = cheetah_mlp().double()
    ev = Evaluator(CHEETAH, policy64, num_workers=0, num_trajectories=2, envs_per_worker=1, seed=3)
    try:
        result64 = ev.evaluate()
    finally:
        ev.shutdown()
    assert result64.episodes.returns.tolist() == gymnasium_returns(
        policy64, episodes.seeds, torch.float64
    )


def test_halfcheetah_same_returns_in_process_on_1_worker_and_in_a_2_worker_suite(ray_local):
    """Full 1,000-step episodes: the same returns, to the last bit, in-process, on 1 worker
    and as a member of a suite on 2 workers; the suite's other member equals its lone run."""
    policy = cheetah_mlp()
    costly = functools.partial(gym.make, CHEETAH, ctrl_cost_weight=2.0)
    kwargs = dict(num_trajectories=4, envs_per_worker=2, seed=11, timeout=120)
    runs = {
        "in-process": (CHEETAH, 0),
        "costly alone": (costly, 0),
        "1 worker": (CHEETAH, 1),
        "2-worker suite": ({"default": CHEETAH, "costly": costly}, 2),
    }
    results = {}
    for name, (env, workers) in runs.items():
        ev = Evaluator(env, policy, num_workers=workers, **kwargs)
        try:
            results[name] = ev.evaluate(step=5)
        finally:
            ev.shutdown()
    local = results["in-process"].episodes
    assert local.lengths.tolist() == [1000] * 4  # HalfCheetah never terminates early
    assert len(set(local.returns.tolist())) == 4  # each episode its own seed
    suite = results["2-worker suite"]
    assert suite["eval/num_episodes"] == 8 and suite["eval/step"] == 5
    assert set(suite.episodes.workers.tolist()) == {0, 1}  # both workers ran episodes
    for episodes in (results["1 worker"].episodes, suite.episodes.select("default")):
        np.testing.assert_array_equal(episodes.seeds, local.seeds)
        assert episodes.returns.tolist() == local.returns.tolist()  # to the last bit
        assert episodes.lengths.tolist() == local.lengths.tolist()
    assert suite["eval/default/reward"] == results["in-process"]["eval/reward"]
    alone = results["costly alone"]
    assert suite.episodes.select("costly").returns.tolist() == alone.episodes.returns.tolist()
    assert suite["eval/costly/reward"] == alone["eval/reward"]
    # a higher control cost gives lower returns for the same actions (common random numbers)
    assert (suite.episodes.select("costly").returns < local.returns).all()


def test_halfcheetah_video_renders_headless_on_a_worker(ray_local, tmp_path):
    # No display here: mujoco_env picks MuJoCo's EGL backend in the worker (Mesa's llvmpipe
    # renders on the CPU, ~0.1-0.2 s a frame on this machine: the episode is kept short).
    env = functools.partial(mujoco_env, CHEETAH, render_mode="rgb_array", width=96, height=96)
    ev = Evaluator(
        env,
        cheetah_mlp(),
        num_workers=1,
        num_trajectories=2,
        max_steps=20,
        envs_per_worker=2,
        record_video=1,
        video_dir=tmp_path,
        timeout=120,
    )
    try:
        result = ev.evaluate()
    finally:
        ev.shutdown()
    files = sorted(tmp_path.glob("*.mp4"))
    assert [f.name for f in files] == ["eval_step0_episode0.mp4"]
    assert sorted(result.episodes.frames) == [("", 0)]  # only the recorded episode rendered
    frames = result.episodes.frames[("", 0)]
    assert frames.shape == (21, 96, 96, 3) and frames.dtype == np.uint8  # reset + 20 steps
    assert frames.std() > 10  # a rendered scene, not a blank buffer
    assert not np.array_equal(frames[0], frames[-1])  # the cheetah moved
    assert iio.imread(files[0]).shape == (21, 96, 96, 3)
