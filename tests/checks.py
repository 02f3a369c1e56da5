"""What is left running: actors (Ray's state API) and the evaluator's threads."""

from __future__ import annotations

import threading
import time

import numpy as np
import ray
import torch
from ray.util.state import list_actors
from tensordict import from_module
from tensordict.nn import TensorDictModule
from torch import nn

from ray_eval.planning import Chunk, episode_seeds

EVALUATOR_THREADS = ("ray-eval-results", "ray-eval-local")


def actor_states() -> dict[str, str]:
    """Every actor of the Ray instance this process is connected to, by id.

    The address is given: other Ray instances may run on the same machine, and
    the state API would refuse to guess between them.
    """
    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,
        limit=10_000,
        raise_on_missing_output=False,
    )
    return {a.actor_id: a.state for a in actors}


def live_actor_ids() -> set[str]:
    """Actors that are not DEAD: alive, starting, restarting or waiting for resources."""
    return {actor_id for actor_id, state in actor_states().items() if state != "DEAD"}


def wait_alive(ids: set[str], timeout: float = 60.0) -> bool:
    """Wait (bounded) until every actor of ``ids`` has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = actor_states()
        if all(states.get(i) == "ALIVE" for i in ids):
            return True
        time.sleep(0.25)
    return False


def wait_until_gone(ids: set[str], timeout: float = 30.0) -> set[str]:
    """Wait (bounded) until none of ``ids`` is a live actor; returns those still live."""
    deadline = time.monotonic() + timeout
    left = ids & live_actor_ids()
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = ids & live_actor_ids()
    return left


def evaluator_threads() -> list[threading.Thread]:
    return [
        t for t in threading.enumerate() if t.name.startswith(EVALUATOR_THREADS) and t.is_alive()
    ]


def wait_no_evaluator_threads(timeout: float = 10.0) -> list[threading.Thread]:
    deadline = time.monotonic() + timeout
    while evaluator_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    return evaluator_threads()


def small_policy(seed: int = 0) -> nn.Module:
    """Observation (2,) -> action (1,), for ``SeedLengthEnv``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))


def pendulum_policy(seed: int = 0) -> TensorDictModule:
    """Pendulum-v1 observation (3,) -> action (1,): a 64-64 tanh MLP, fixed weights."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    return TensorDictModule(net, in_keys=["observation"], out_keys=["action"])


# How conftest's ``pendulum_pool`` is built (with ``pendulum_policy()``): the same
# plan in-process gives the same numbers.
PENDULUM_POOL = dict(num_workers=2, num_trajectories=6, seed=3, envs_per_worker=4)


def fresh_weights(policy: nn.Module, seed: int, scale: float = 0.5):
    gen = torch.Generator().manual_seed(seed)
    weights = from_module(policy).data.clone()
    return weights.apply(lambda p: p + scale * torch.randn(p.shape, generator=gen))


def chunk_of(num_episodes: int, step: int = 5) -> Chunk:
    """Episodes 0 .. num_episodes-1 of evaluation ``step``, for one worker's rollout."""
    return Chunk(
        member="",
        indices=np.arange(num_episodes, dtype=np.int64),
        seeds=episode_seeds(0, step, num_episodes),
        record=np.zeros(num_episodes, dtype=bool),
    )
