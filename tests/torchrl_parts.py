"""TorchRL envs with stateful parts (normalization, video), loggers and hooks, for tests.

Pickled by value (see test_torchrl_parity), so Ray workers need no tests/ on their path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.data import Unbounded
from torchrl.envs import (
    Compose,
    GymEnv,
    GymWrapper,
    RewardScaling,
    StepCounter,
    Transform,
    TransformedEnv,
    VecNorm,
    VecNormV2,
)
from torchrl.record import VideoRecorder

from tests.envs import SeedLengthEnv


class FileVideoLogger:
    """A TorchRL-style logger: one line ``name:step:frames`` per ``log_video`` call."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir

    def log_video(self, name, video, step=None, **kwargs) -> None:
        with open(Path(self.log_dir) / "videos", "a") as file:
            file.write(f"{name}:{step}:{video.shape[1]}:{os.getpid()}\n")


def video_events(log_dir) -> list[list[str]]:
    path = Path(log_dir) / "videos"
    return [line.split(":") for line in path.read_text().splitlines()] if path.exists() else []


class PixelsFromObservation(Transform):
    """A 3x8x8 "frame" made from the observation, so a VideoRecorder has something to record."""

    def __init__(self) -> None:
        super().__init__(in_keys=["observation"], out_keys=["pixels"])

    def _apply_transform(self, observation: torch.Tensor) -> torch.Tensor:
        return observation[..., :1, None, None].expand(*observation.shape[:-1], 3, 8, 8).clone()

    def _reset(self, tensordict, tensordict_reset):
        return self._call(tensordict_reset)

    def transform_observation_spec(self, observation_spec):
        observation_spec["pixels"] = Unbounded(shape=(3, 8, 8), dtype=torch.float32)
        return observation_spec


def video_env(log_dir: str) -> TransformedEnv:
    return TransformedEnv(
        GymEnv("Pendulum-v1"),
        Compose(
            PixelsFromObservation(),
            VideoRecorder(FileVideoLogger(log_dir), tag="eval_video", in_keys=["pixels"], skip=1),
        ),
    )


def vecnorm_env() -> TransformedEnv:
    """Pendulum with a running observation normalization (``transform[0]``)."""
    return TransformedEnv(
        GymEnv("Pendulum-v1"),
        Compose(VecNormV2(in_keys=["observation"], out_keys=["observation"]), StepCounter()),
    )


def vecnorm_v1_env() -> TransformedEnv:
    """The same with TorchRL's first ``VecNorm``, which TorchRL's PPO MuJoCo script uses."""
    return TransformedEnv(
        GymEnv("Pendulum-v1"),
        Compose(VecNorm(in_keys=["observation"], new_api=False), StepCounter()),
    )


def fed_vecnorm(steps: int, seed: int, make_env=vecnorm_env) -> VecNormV2 | VecNorm:
    """A trainer's normalization (``make_env``'s ``transform[0]``) after ``steps`` random steps."""
    env = make_env()
    env.set_seed(seed)
    td = env.reset()
    for _ in range(steps):
        td = env.rand_step(td)["next"]
    return env.transform[0]


def pendulum_policy(env=None) -> TensorDictModule:
    torch.manual_seed(0)
    return TensorDictModule(
        nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)),
        in_keys=["observation"],
        out_keys=["action"],
    )


def env_var_pendulum() -> GymEnv:
    """Pendulum whose gravity comes from $RAY_EVAL_TEST_G: shows what a worker's env was."""
    return GymEnv("Pendulum-v1", g=float(os.environ.get("RAY_EVAL_TEST_G", "10.0")))


def mark_process(directory: str) -> None:
    """An init_fn: leaves a file named after the process that ran it."""
    Path(directory, f"init-{os.getpid()}").write_text("ran")


def scaled_seed_length_env(**faults) -> TransformedEnv:
    """``SeedLengthEnv`` (rewards that depend on the action) with a ``RewardScaling`` at
    ``env.transform``: scale 1 unless ``weights_dict`` loads another one. ``faults`` go
    to ``SeedLengthEnv`` (crashes, hangs, slow steps)."""
    return TransformedEnv(
        GymWrapper(SeedLengthEnv(action_reward=True, **faults)), RewardScaling(0.0, 1.0)
    )
