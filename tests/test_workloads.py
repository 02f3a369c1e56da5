"""Heavy workloads end to end: MuJoCo HalfCheetah-v5 and Atari Pong with a Nature CNN.

Real MuJoCo, real ALE, real Ray (the ``ray_local`` fixture), small episode counts.
MuJoCo observations are float64 and the policies float32: the fast path hands them
over as float32 (``test_halfcheetah_float32_policy_...`` checks the numbers against a
plain gymnasium loop). An untrained Nature CNN picks the same action on every Pong
frame, so its scores say nothing; the Atari tests give it weights whose actions follow
what moves on the screen (``motion_cnn_weights``), and compare the recorded frames too,
which show every seed and every action.
"""

from __future__ import annotations

import functools
import json
import subprocess

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from torch import nn

from ray_eval import Evaluator
from ray_eval.factories import (
    AtariEnv,
    MLPPolicy,
    NatureCNN,
    NatureCNNPolicy,
    atari_env,
    atari_torchrl_env,
    mujoco_env,
)
from ray_eval.jobs.cli import main
from ray_eval.jobs.config import ConfigError, NatureCNNPolicyConfig, load_config
from tests.procs import BIN, ROOT, env_for_subprocess

CHEETAH = "HalfCheetah-v5"
PONG = "ALE/Pong-v5"
CONFIGS = ROOT / "configs"


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


def test_plain_gymnasium_ids_work_on_workers_ale_registered_and_mujoco_rendering(
    ray_local, tmp_path
):
    """The ids alone: the worker imports ale_py (which registers "ALE/...") as the driver
    did, and a MuJoCo id made to render gets the off-screen renderer."""
    import ale_py

    gym.register_envs(ale_py)  # what a user does on the driver, as gymnasium documents
    pong = Evaluator(
        "ALE/Pong-v5",
        lambda obs: torch.zeros(obs.shape[0], dtype=torch.long),
        num_workers=1,
        num_trajectories=1,
        max_steps=5,
    )
    cheetah = Evaluator(
        CHEETAH,
        cheetah_mlp(),
        num_workers=1,
        num_trajectories=1,
        max_steps=3,
        record_video=1,
        video_dir=tmp_path,
        timeout=120,
    )
    try:
        assert pong.evaluate()["eval/episode_length"] == 5
        result = cheetah.evaluate()
    finally:
        pong.shutdown()
        cheetah.shutdown()
    assert result.episodes.frames[("", 0)].shape[0] == 4  # reset + 3 steps
    assert [f.name for f in tmp_path.glob("*.mp4")] == ["eval_step0_episode0.mp4"]


# -- Atari: ALE/Pong-v5 with a Nature CNN ------------------------------------------------


def test_atari_factory_gives_standard_dqn_frames():
    env = AtariEnv(PONG)()
    assert env.observation_space.shape == (4, 84, 84)
    assert env.observation_space.dtype == np.uint8
    assert env.unwrapped._frameskip == 1  # frames are skipped (and max-pooled) by the wrapper
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4, 84, 84) and obs.std() > 0
    policy = NatureCNNPolicy(0)(env)
    assert isinstance(policy.module.net, NatureCNN)
    shapes = [tuple(p.shape) for p in policy.module.net.parameters()]
    assert shapes[0] == (32, 4, 8, 8) and (512, 3136) in shapes and shapes[-1] == (6,)
    action = policy.module(torch.from_numpy(obs)[None])
    assert action.dtype == torch.int64 and env.action_space.contains(int(action[0]))


PONG_RUN = dict(num_trajectories=4, max_steps=120, envs_per_worker=2, seed=5, record_video=2)


def motion_cnn_weights(seed: int = 0) -> dict:
    """A state_dict for ``NatureCNNPolicy(0)`` whose actions follow what moves.

    The first conv layer sees the difference of the last two frames (random filters),
    every bias is zero: a still screen gives all-zero outputs, and the ball and paddles
    decide the action. Its Pong scores over 120 steps vary from episode to episode.
    """
    state = NatureCNNPolicy(0)(AtariEnv(PONG)()).state_dict()
    gen = torch.Generator().manual_seed(seed)
    conv = state["module.net.features.0.weight"]
    filters = torch.randn(conv[:, 0].shape, generator=gen)
    conv.zero_()
    conv[:, -1], conv[:, -2] = filters, -filters
    for key, value in state.items():
        if key.endswith("bias"):
            value.zero_()
    return state


@pytest.fixture(scope="module")
def pong_in_process():
    """Pong through the gymnasium factory, in-process, with a plain ``NatureCNN`` module
    that has ``motion_cnn_weights``: 4 episodes, the first 2 recorded."""
    env = AtariEnv(PONG, render_mode="rgb_array")
    net = NatureCNNPolicy(0)(env()).module.net
    prefix = "module.net."
    net.load_state_dict({k.removeprefix(prefix): v for k, v in motion_cnn_weights().items()})
    ev = Evaluator(env, net, num_workers=0, **PONG_RUN)
    try:
        return ev.evaluate(step=3)
    finally:
        ev.shutdown()


def assert_same_pong_episodes(result, reference) -> None:
    a, b = result.episodes, reference.episodes
    np.testing.assert_array_equal(a.seeds, b.seeds)
    assert a.returns.tolist() == b.returns.tolist()
    assert a.lengths.tolist() == b.lengths.tolist()
    assert sorted(a.frames) == sorted(b.frames) == [("", 0), ("", 1)]
    for key in a.frames:
        np.testing.assert_array_equal(a.frames[key], b.frames[key])


def test_pong_factory_nature_cnn_same_episodes_on_2_workers_with_video(
    ray_local, tmp_path, pong_in_process
):
    local = pong_in_process
    assert local.episodes.lengths.tolist() == [120] * 4
    assert len(set(local.episodes.returns.tolist())) > 1  # scores that depend on the play
    frames = local.episodes.frames[("", 0)]
    assert frames.shape == (121, 210, 160, 3)  # full-size colour screens for the video
    # the episodes' seeds reach the env: no-op starts and sticky actions differ
    assert not np.array_equal(frames, local.episodes.frames[("", 1)])

    ev = Evaluator(
        AtariEnv(PONG, render_mode="rgb_array"),
        policy_factory=NatureCNNPolicy(0),
        num_workers=2,
        video_dir=tmp_path,
        timeout=120,
        **PONG_RUN,
    )
    try:
        result = ev.evaluate(weights=motion_cnn_weights(), step=3)
    finally:
        ev.shutdown()
    assert set(result.episodes.workers.tolist()) == {0, 1}
    assert_same_pong_episodes(result, local)
    files = sorted(f.name for f in tmp_path.glob("*.mp4"))
    assert files == ["eval_step3_episode0.mp4", "eval_step3_episode1.mp4"]
    assert iio.imread(tmp_path / files[0]).shape[:1] == (121,)


def test_pong_torchrl_env_with_transforms_matches_the_gymnasium_factory(ray_local, pong_in_process):
    env = functools.partial(atari_torchrl_env, PONG, render_mode="rgb_array")
    built = env()
    assert type(built).__name__ == "TransformedEnv"  # TorchRL's general loop, not the fast path
    assert tuple(built.observation_spec["observation"].shape) == (4, 84, 84)
    results = {}
    for workers in (0, 2):
        ev = Evaluator(
            env, policy_factory=NatureCNNPolicy(0), num_workers=workers, timeout=120, **PONG_RUN
        )
        try:
            results[workers] = ev.evaluate(weights=motion_cnn_weights(), step=3)
        finally:
            ev.shutdown()
    assert set(results[2].episodes.workers.tolist()) == {0, 1}
    assert_same_pong_episodes(results[2], results[0])
    # TorchRL's CatFrames stacks what FrameStackObservation stacks: the same episodes.
    assert_same_pong_episodes(results[0], pong_in_process)


# -- ray-eval configs ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["halfcheetah", "pong"])
def test_heavy_configs_validate(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.name == name and len(config.config_hash()) == 16
    env = config.env.build()
    if name == "halfcheetah":
        assert env == CHEETAH
        assert config.policy.type == "mlp" and list(config.policy.hidden_sizes) == [256, 256]
    else:
        assert isinstance(config.policy, NatureCNNPolicyConfig)
        built = env()
        assert built.observation_space.shape == (4, 84, 84)
        assert built.unwrapped.spec.id == PONG


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("policy.init_sed=1", "policy.init_sed: unknown key (did you mean 'init_seed'?)"),
        ("policy.hidden_sizes=[8]", "policy.hidden_sizes: unknown key"),
        ("policy.type=cnn", "policy.type must be 'mlp' or 'factory', or 'nature_cnn'"),
    ],
)
def test_nature_cnn_policy_config_errors_name_the_key(override, expected):
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "pong.yaml", [override])
    assert expected in str(error.value)


def checkpoint_weights(name: str) -> dict:
    """Weights for the policy a config builds (made as a trainer would), not its initial ones."""
    if name == "pong":
        assert (
            NatureCNNPolicy(0)(atari_env(PONG)).state_dict().keys() == motion_cnn_weights().keys()
        )
        return motion_cnn_weights()
    policy = MLPPolicy((256, 256))(gym.make(CHEETAH))
    gen = torch.Generator().manual_seed(1)
    return {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in policy.state_dict().items()
    }


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("halfcheetah", ["num_trajectories=2", "max_steps=100", "workers.envs_per_worker=2"]),
        ("pong", ["num_trajectories=2", "max_steps=60", "workers.envs_per_worker=2"]),
    ],
)
def test_ray_eval_run_config_with_a_checkpoint(tmp_path, name, overrides):
    overrides = [*overrides, "workers.num_workers=0", "loggers=[]"]
    weights = checkpoint_weights(name)
    checkpoint = tmp_path / "policy_step_2000.pt"
    torch.save(weights, checkpoint)
    output = tmp_path / "results.jsonl"
    argv = ["run", str(CONFIGS / f"{name}.yaml"), "--checkpoint", str(checkpoint),
            "--output", str(output), *overrides]  # fmt: skip
    if name == "halfcheetah":  # the installed command, in a process of its own
        proc = subprocess.run(
            [str(BIN / "ray-eval"), *argv], capture_output=True, text=True, timeout=180,
            cwd=tmp_path, env=env_for_subprocess(),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:  # the same entry point in this process (saves the imports of a new process)
        assert main(argv) == 0
    lines = output.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["config"] == name and record["step"] == 2000
    assert record["checkpoint"] == str(checkpoint)
    assert record["metrics"]["eval/num_episodes"] == 2

    # The same evaluation by hand, with the checkpoint's weights: the same numbers.
    config = load_config(CONFIGS / f"{name}.yaml", overrides)
    ev = Evaluator(
        config.env.build(),
        policy_factory=config.policy.build(),
        num_workers=0,
        num_trajectories=config.num_trajectories,
        max_steps=config.max_steps,
        seed=config.seed,
        envs_per_worker=config.workers.envs_per_worker,
    )
    try:
        expected = ev.evaluate(weights=weights, step=2000)
        initial = ev.evaluate(step=2000)
    finally:
        ev.shutdown()
    assert record["metrics"]["eval/reward"] == expected["eval/reward"]
    if name == "halfcheetah":  # the checkpoint's weights, not the initial ones, were evaluated
        assert expected["eval/reward"] != initial["eval/reward"]
    # (two short Pong games can end with the same score for both policies; a checkpoint
    # that does not fit the CNN is refused: test_ray_eval_run_rejects_...)


def test_ray_eval_run_rejects_a_checkpoint_for_the_other_config(tmp_path, capsys):
    checkpoint = tmp_path / "cheetah.pt"
    torch.save(checkpoint_weights("halfcheetah"), checkpoint)
    code = main(
        ["run", str(CONFIGS / "pong.yaml"), "--checkpoint", str(checkpoint),
         "workers.num_workers=0", "num_trajectories=1", "max_steps=5", "loggers=[]"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 3, err
    assert "does not fit the policy" in err


@pytest.mark.parametrize("name", ["halfcheetah", "pong"])
def test_ray_eval_run_config_as_shipped(tmp_path, capsys, name):
    output = tmp_path / "out.jsonl"
    code = main(
        ["run", str(CONFIGS / f"{name}.yaml"), "--output", str(output), "num_trajectories=2",
         "max_steps=50", "workers.num_workers=0", "workers.envs_per_worker=2", "loggers=[]"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (record,) = [json.loads(line) for line in output.read_text().splitlines()]
    assert record["checkpoint"] is None
    assert record["metrics"]["eval/episode_length"] == 50
