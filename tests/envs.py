"""Small, real gymnasium and TorchRL envs with known behaviour, for tests.

The Ray workers need no tests directory on their path: ray_eval pickles this
module by value, as it does any module that is not installed.
"""

from __future__ import annotations

import os
import time

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase


def take_fault(path: str | None, times: int = 1) -> bool:
    """True the first ``times`` times any process asks for ``path``, then False.

    Each fault claims a marker file ``path`` (then ``path.1``, ``path.2``, ...)
    with ``O_EXCL``, so processes racing for it never both win, and a
    restarted worker (a new process) sees the faults already spent.
    """
    if not path:
        return False
    for k in range(times):
        marker = path if k == 0 else f"{path}.{k}"
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


class SeedLengthEnv(gym.Env):
    """Episode length and reward are known functions of the reset seed.

    Length = 1 + seed % 37 steps, reward 1 per step (return = length), so a
    test can check every planned episode ran to its end exactly once.

    Faults, each at step ``fault_step`` of an episode: ``crash_file`` kills the
    process with ``os._exit`` (``crash_times`` times in all, across processes);
    ``raise_at`` raises at that step of every episode, ``raise_file`` once;
    ``hang_at`` sleeps an hour at that step of every episode, ``hang_file``
    ``hang_times`` times in all, for ``hang_seconds`` (an hour by default).
    ``step_sleep`` slows every step; ``action_reward`` makes the reward depend
    on the policy's action (so a result shows which weights ran).
    """

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(
        self,
        crash_file: str | None = None,
        raise_at: int | None = None,
        hang_at: int | None = None,
        *,
        crash_times: int = 1,
        raise_file: str | None = None,
        hang_file: str | None = None,
        hang_times: int = 1,
        hang_seconds: float = 3600.0,
        fault_step: int = 3,
        step_sleep: float = 0.0,
        action_reward: bool = False,
    ):
        self._crash_file = crash_file
        self._crash_times = crash_times
        self._raise_at = raise_at
        self._raise_file = raise_file
        self._hang_at = hang_at
        self._hang_file = hang_file
        self._hang_times = hang_times
        self._hang_seconds = hang_seconds
        self._fault_step = fault_step
        self._step_sleep = step_sleep
        self._action_reward = action_reward
        self._length = 0
        self._t = 0

    @staticmethod
    def length_for(seed: int) -> int:
        return 1 + int(seed) % 37

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._length = self.length_for(seed or 0)  # TorchRL's action check resets unseeded
        self._t = 0
        self._seed = seed
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self._t += 1
        if self._step_sleep:
            time.sleep(self._step_sleep)
        at_fault_step = self._t == self._fault_step
        if at_fault_step and take_fault(self._crash_file, self._crash_times):
            os._exit(17)  # a real process death
        if self._raise_at is not None and self._t == self._raise_at:
            raise RuntimeError(f"boom at step {self._t}")
        if at_fault_step and take_fault(self._raise_file):
            raise RuntimeError(f"boom at step {self._t} (seed {self._seed})")
        if self._hang_at is not None and self._t == self._hang_at:
            time.sleep(3600)
        if at_fault_step and take_fault(self._hang_file, self._hang_times):
            time.sleep(self._hang_seconds)
        obs = np.array([self._t / 100.0, float(action[0])], np.float32)
        reward = 1.0 + 0.5 * float(np.tanh(action[0])) if self._action_reward else 1.0
        return (
            obs,
            reward,
            self._t >= self._length,
            False,
            {"is_success": self._t % 2 == 0, "speed": 2.0},
        )


class NotAnEnv:
    """What a broken env factory returns."""


# -- TorchRL-native envs ------------------------------------------------------------------


class SeededCountdownEnv(EnvBase):
    """A TorchRL-native env seeded only through ``set_seed``, as TorchRL's own envs are.

    ``_reset`` takes no ``seed`` (it would swallow one in ``**kwargs``): each
    reset draws the episode's length (1..20), its start observation and its
    reward scale from the generator that ``_set_seed`` made. With the same
    ``set_seed`` before each reset, an episode is a function of its seed and the
    policy's actions only. The step TensorDict carries ``is_success`` (the
    episode's length is even) and ``speed`` (always 2.0).
    """

    def __init__(self, max_length: int = 20) -> None:
        super().__init__(batch_size=torch.Size([]))
        self.max_length = max_length
        self.observation_spec = Composite(
            observation=Unbounded((3,), dtype=torch.float32),
            is_success=Categorical(2, (1,), dtype=torch.bool),
            speed=Unbounded((1,), dtype=torch.float32),
        )
        self.action_spec = Bounded(-1.0, 1.0, (1,), dtype=torch.float32)
        self.reward_spec = Unbounded((1,), dtype=torch.float32)
        self._set_seed(0)

    def _set_seed(self, seed: int | None) -> None:
        self._rng = np.random.default_rng(seed)

    def _reset(self, tensordict=None, **kwargs):
        self._length = int(self._rng.integers(1, self.max_length + 1))
        self._scale = float(self._rng.uniform(0.5, 1.5))
        self._t = 0
        self._obs = torch.as_tensor(self._rng.normal(size=3), dtype=torch.float32)
        return TensorDict(
            {
                "observation": self._obs.clone(),
                "is_success": torch.zeros(1, dtype=torch.bool),
                "speed": torch.full((1,), 2.0),
                "done": torch.zeros(1, dtype=torch.bool),
                "terminated": torch.zeros(1, dtype=torch.bool),
            },
            batch_size=[],
        )

    def _step(self, tensordict):
        action = tensordict.get("action")
        self._t += 1
        self._obs = 0.9 * self._obs + 0.1 * action
        reward = self._scale * (1.0 - float(self._obs.abs().sum()))
        done = self._t >= self._length
        return TensorDict(
            {
                "observation": self._obs.clone(),
                "reward": torch.tensor([reward], dtype=torch.float32),
                "is_success": torch.tensor([done and self._length % 2 == 0]),
                "speed": torch.full((1,), 2.0),
                "done": torch.tensor([done]),
                "terminated": torch.tensor([done]),
            },
            batch_size=[],
        )


class SuccessInfoEnv(gym.Env):
    """A gymnasium env reporting ``is_success`` and ``speed`` only in ``info``.

    Length = 1 + seed % 7 steps; ``is_success`` is true at the last step when
    that length is odd; ``speed`` is 3.0 at every step.
    """

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    @staticmethod
    def length_for(seed: int) -> int:
        return 1 + int(seed) % 7

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._length = self.length_for(seed or 0)
        self._t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self._t += 1
        done = self._t >= self._length
        # numpy scalars, which TorchRL's default_info_dict_reader can read
        info = {"is_success": np.bool_(done and self._length % 2 == 1), "speed": np.float32(3)}
        return np.full(2, self._t / 10, np.float32), 1.0, done, False, info


class Float64ObservationEnv(gym.Env):
    """A gymnasium env with float64 observations (as MuJoCo's), 5 steps an episode;
    the reward is the action, so a result shows the policy ran."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return self.np_random.normal(size=3), {}

    def step(self, action):
        self._t += 1
        obs = self.np_random.normal(size=3)
        return obs, float(action[0]), self._t >= 5, False, {}
