"""Small, real gymnasium envs with known behaviour, for tests.

conftest registers this module to be pickled by value, so Ray workers can
build these envs without the tests directory on their path.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import gymnasium as gym
import numpy as np


class SeedLengthEnv(gym.Env):
    """Episode length and reward are known functions of the reset seed.

    Length = 1 + seed % 37 steps, reward 1 per step (return = length), so a
    test can check every planned episode ran to its end exactly once.
    """

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(
        self, crash_file: str | None = None, raise_at: int | None = None, hang_at: int | None = None
    ):
        self._crash_file = crash_file
        self._raise_at = raise_at
        self._hang_at = hang_at
        self._length = 0
        self._t = 0

    @staticmethod
    def length_for(seed: int) -> int:
        return 1 + int(seed) % 37

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._length = self.length_for(seed)
        self._t = 0
        self._seed = seed
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self._t += 1
        if self._crash_file and not Path(self._crash_file).exists() and self._t == 3:
            Path(self._crash_file).write_text(str(os.getpid()))
            os._exit(17)  # a real process death, once
        if self._raise_at is not None and self._t == self._raise_at:
            raise RuntimeError(f"boom at step {self._t}")
        if self._hang_at is not None and self._t == self._hang_at:
            time.sleep(3600)
        obs = np.array([self._t / 100.0, float(action[0])], np.float32)
        return (
            obs,
            1.0,
            self._t >= self._length,
            False,
            {"is_success": self._t % 2 == 0, "speed": 2.0},
        )
