"""``success_rate`` and ``info_keys`` on the TorchRL loop, as on the gymnasium one.

Two sources: a TorchRL env that writes ``is_success`` (and other keys) to its
step TensorDict, and a gymnasium env behind TorchRL's ``GymWrapper`` that
reports them in ``info`` only, with or without an info-dict reader set.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs import GymWrapper, TransformedEnv, default_info_dict_reader
from torchrl.envs.transforms import StepCounter

from ray_eval import Evaluator
from tests.envs import SeededCountdownEnv, SuccessInfoEnv


def linear_policy(obs_dim: int) -> TensorDictModule:
    return TensorDictModule(nn.Linear(obs_dim, 1), in_keys=["observation"], out_keys=["action"])


def run(env, policy, **kwargs):
    with Evaluator(env, policy, num_trajectories=10, timeout=120, **kwargs) as evaluator:
        result = evaluator.evaluate()
        return result, evaluator.last_episodes, evaluator.workers[0].rollouts[""]


def test_success_and_info_keys_from_a_torchrl_envs_tensordict(ray_local):
    result, episodes, loop = run(
        SeededCountdownEnv(), linear_policy(3), num_workers=2, info_keys=("speed", "sped")
    )
    assert loop == "TorchRLRollout"
    assert np.isnan(result["eval/info/sped"])  # never reported: NaN, not 0.0
    # SeededCountdownEnv succeeds when its episode's length is even.
    assert result["eval/success_rate"] == pytest.approx((episodes.lengths % 2 == 0).mean())
    assert 0 < result["eval/success_rate"] < 1
    assert result["eval/info/speed"] == pytest.approx(2.0)


def expected_success(episodes) -> float:
    lengths = np.array([SuccessInfoEnv.length_for(s) for s in episodes.seeds])
    np.testing.assert_array_equal(episodes.lengths, lengths)
    return float((lengths % 2 == 1).mean())  # SuccessInfoEnv succeeds on odd lengths


def test_success_and_info_keys_from_a_wrapped_gymnasium_envs_info(ray_local):
    # Transformed: the TorchRL loop; no info-dict reader: info reaches no TensorDict.
    env = TransformedEnv(GymWrapper(SuccessInfoEnv()), StepCounter())
    result, episodes, loop = run(env, linear_policy(2), num_workers=1, info_keys=("speed",))
    assert loop == "TorchRLRollout"
    assert result["eval/success_rate"] == pytest.approx(expected_success(episodes))
    assert 0 < result["eval/success_rate"] < 1
    assert result["eval/info/speed"] == pytest.approx(3.0)


def test_success_from_an_info_dict_reader_on_the_torchrl_loop(ray_local):
    env = GymWrapper(SuccessInfoEnv())
    env.set_info_dict_reader(default_info_dict_reader(["is_success", "speed"]))
    result, episodes, loop = run(
        env, linear_policy(2), num_workers=0, fast_path=False, info_keys=("speed",)
    )
    assert loop == "TorchRLRollout"
    assert result["eval/success_rate"] == pytest.approx(expected_success(episodes))
    assert result["eval/info/speed"] == pytest.approx(3.0)
    # The same env on the fast path (a bare wrapper) reads info itself: same numbers.
    fast, fast_episodes, fast_loop = run(env, linear_policy(2), num_workers=0, info_keys=("speed",))
    assert fast_loop == "GymnasiumRollout"
    assert fast["eval/success_rate"] == result["eval/success_rate"]
    np.testing.assert_array_equal(fast_episodes.lengths, episodes.lengths)


# -- an info key the env never reports -----------------------------------------------------------


def cartpole_policy() -> nn.Module:
    return nn.Linear(4, 2)


@pytest.mark.parametrize(
    ("env", "policy", "loop"),
    [
        (SuccessInfoEnv, linear_policy(2), "GymnasiumRollout"),
        (SeededCountdownEnv, linear_policy(3), "TorchRLRollout"),
        ("vector:CartPole-v1", cartpole_policy(), "VectorRollout"),
    ],
    ids=["gymnasium", "torchrl", "vector"],
)
def test_an_info_key_never_reported_is_nan_with_one_warning(env, policy, loop):
    """A typo in info_keys must not read as zeros: NaN, and one warning per evaluator."""
    with Evaluator(
        env, policy, num_workers=0, num_trajectories=6, info_keys=("sped",), max_steps=20
    ) as evaluator:
        with pytest.warns(RuntimeWarning, match=r"never reported 'sped'.*eval/info/sped is NaN"):
            first = evaluator.evaluate()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second evaluation warns no more
            second = evaluator.evaluate()
        assert evaluator.workers[0].rollouts[""] == loop
    for result in (first, second):
        assert np.isnan(result["eval/info/sped"])
        assert np.isnan(result.episodes.infos["sped"]).all()
