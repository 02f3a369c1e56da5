"""User code the Ray workers cannot import travels by value.

An env class, env factory, policy, policy factory and metrics function defined in
a module that is not installed (here: a helper folder a script puts on its own
``sys.path``, as a notebook does) must work on Ray workers, which could not
import that module by name. The end-to-end test runs a script from a folder
outside the project, with the project's Python.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import tests.envs  # noqa: F401  (is_user_module looks at imported modules)
from ray_eval import Evaluator, WorkerStartupError
from ray_eval.backends import pickling
from ray_eval.backends.pickling import check_picklable, is_user_module, register_user_modules

USER_MODULE = '''
"""A user's helper module: nothing of it is installed."""
import gymnasium as gym
import numpy as np
import torch
from torch import nn


class CountdownEnv(gym.Env):
    """Episode length 1 + seed % 9; reward 1 + the action."""

    observation_space = gym.spaces.Box(-10.0, 10.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._length, self._t = 1 + (seed or 0) % 9, 0
        return np.array([self._length, 0.0], np.float32), {}

    def step(self, action):
        self._t += 1
        obs = np.array([self._length, self._t], np.float32)
        return obs, 1.0 + float(action[0]), self._t >= self._length, False, {}


def make_env():
    return CountdownEnv()


class TanhPolicy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 1)
        nn.init.constant_(self.net.weight, 0.1)
        nn.init.constant_(self.net.bias, -0.3)

    def forward(self, obs):
        return torch.tanh(self.net(obs))


def make_policy():
    return TanhPolicy()


def episode_count(data):
    return {"episodes_seen": float(len(data))}
'''

SCRIPT = """
import json
import os
import sys

# A helper folder on the script's own path, as a notebook would add it: the Ray
# workers get the script's folder and the current folder, not this one.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))

import ray
import user_code
from ray_eval import Evaluator


def run(env, **kwargs):
    out = {}
    for workers in (0, 2):
        with Evaluator(env, num_workers=workers, num_trajectories=8, timeout=120, **kwargs) as ev:
            result = ev.evaluate()
            episodes = ev.last_episodes
            out[workers] = {
                "seeds": episodes.seeds.tolist(),
                "lengths": episodes.lengths.tolist(),
                "returns": episodes.returns.tolist(),
                "workers": sorted(set(episodes.workers.tolist())),
                "episodes_seen": result.get("eval/episodes_seen"),
            }
    return out


if __name__ == "__main__":
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(json.dumps({
        "factory": run(user_code.make_env, policy=user_code.TanhPolicy(),
                       metrics_fn=user_code.episode_count),
        "instance": run(user_code.CountdownEnv(), policy_factory=user_code.make_policy),
    }))
"""


@pytest.fixture
def outside_project(tmp_path_factory):
    """A folder outside the project with a script and, in helpers/, the user's module."""
    folder = tmp_path_factory.mktemp("user_project")
    (folder / "helpers").mkdir()
    (folder / "helpers" / "user_code.py").write_text(textwrap.dedent(USER_MODULE))
    (folder / "evaluate.py").write_text(textwrap.dedent(SCRIPT))
    return folder


def test_user_module_objects_work_on_ray_workers_from_outside_the_project(outside_project):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    done = subprocess.run(
        [sys.executable, "evaluate.py"],
        cwd=outside_project,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for case in ("factory", "instance"):
        local, remote = report[case]["0"], report[case]["2"]
        assert remote["workers"] == [0, 1]  # both Ray workers ran episodes
        assert remote["seeds"] == local["seeds"]
        assert remote["lengths"] == local["lengths"] == [1 + s % 9 for s in local["seeds"]]
        assert remote["returns"] == local["returns"]
    assert report["factory"]["2"]["episodes_seen"] == 8  # the metrics function ran


# -- which modules go by value --------------------------------------------------------------


def load_module(path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def user_modules(tmp_path):
    """Two not-installed modules: ``helper_a`` uses ``helper_b`` through a global."""
    (tmp_path / "helper_b.py").write_text("def scale(x):\n    return 2 * x\n")
    (tmp_path / "helper_a.py").write_text(
        "import threading\nimport helper_b\nLOCK = threading.Lock()\n\n"
        "class Env:\n    def make(self):\n        return helper_b.scale(1)\n\n"
        "def factory(n=1):\n    return helper_b.scale(n)\n\n"
        "def locked():\n    with LOCK:\n        return 1\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        b = load_module(tmp_path / "helper_b.py", "helper_b")
        a = load_module(tmp_path / "helper_a.py", "helper_a")
        yield a, b
    finally:
        sys.path.remove(str(tmp_path))
        pickling._unregister(["helper_a", "helper_b"])
        for name in ("helper_a", "helper_b"):
            sys.modules.pop(name, None)


def test_installed_modules_and_ray_eval_are_not_shipped(user_modules):
    assert is_user_module("helper_a") and is_user_module("helper_b")
    assert is_user_module("tests.envs")  # a project folder that is not installed
    for name in ("torch.nn", "json", "gymnasium.envs", "ray_eval.rollout.adapters", "__main__"):
        assert not is_user_module(name), name  # ray_eval: an editable install


def test_modules_are_found_through_partials_globals_classes_and_instances(user_modules):
    a, _ = user_modules
    found = register_user_modules(functools.partial(a.factory, 3))
    assert found == ["helper_a", "helper_b"]  # helper_b: a global module of factory
    pickling._unregister(found)
    assert register_user_modules({"env": a.Env()}) == ["helper_a", "helper_b"]
    pickling._unregister(found)
    policy = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert register_user_modules(policy) == []


def test_user_modules_are_found_in_a_policy_of_any_size(tmp_path):
    """1,200 layers and a layer of the user's own class: the old walk stopped silently
    after 20,000 objects, so the user's module was not shipped and the workers failed
    with ModuleNotFoundError."""
    (tmp_path / "helper_layers.py").write_text(
        "import torch\n\nclass Scale(torch.nn.Module):\n"
        "    def forward(self, x):\n        return 2 * x\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        layers = load_module(tmp_path / "helper_layers.py", "helper_layers")
        big = [torch.nn.Linear(2, 2) for _ in range(1200)]
        for policy in (
            torch.nn.Sequential(layers.Scale(), *big),
            torch.nn.Sequential(*big, layers.Scale()),
            {"deep": [[[torch.nn.Sequential(*big[:600])]]], "last": layers.Scale},
        ):
            assert register_user_modules(policy) == ["helper_layers"]
            pickling._unregister(["helper_layers"])
    finally:
        sys.path.remove(str(tmp_path))
        pickling._unregister(["helper_layers"])
        sys.modules.pop("helper_layers", None)


def test_by_reference_is_kept_when_by_value_cannot_pickle(user_modules):
    a, _ = user_modules
    check_picklable(a.locked, "env")  # its module's lock cannot be pickled by value
    assert "helper_a" not in pickling._registered  # pickled by name, as before
    lock = threading.Lock()
    with pytest.raises(TypeError, match=r"env cannot be pickled.*_thread\.lock"):
        check_picklable(functools.partial(a.factory, lock), "env")


def test_a_module_that_cannot_ship_is_named_as_an_import_problem(ray_local, tmp_path, caplog):
    """A module whose function uses a module-level lock cannot be pickled by value: it
    goes by name, a warning names it, and the workers, which cannot import it, fail
    with an error that names it and says it is an import problem (the worker's
    constructor raised: nothing was restarted, whatever max_restarts says)."""
    (tmp_path / "helper_locked.py").write_text(
        "import threading\nimport gymnasium as gym\nLOCK = threading.Lock()\n\n"
        "def make_env():\n    with LOCK:\n        return gym.make('CartPole-v1')\n"
    )
    sys.path.insert(0, str(tmp_path))  # the driver's path only: the workers lack it
    try:
        helper = load_module(tmp_path / "helper_locked.py", "helper_locked")
        with pytest.raises(WorkerStartupError) as failure:
            Evaluator(helper.make_env, torch.nn.Linear(4, 2), num_workers=1, startup_timeout=120)
    finally:
        sys.path.remove(str(tmp_path))
        pickling._unregister(["helper_locked"])
        sys.modules.pop("helper_locked", None)
    message = str(failure.value)
    assert "module 'helper_locked' cannot be imported" in message
    assert "import problem, not a crash" in message and "max_restarts" not in message
    assert any("helper_locked cannot be pickled by value" in r.message for r in caplog.records)
