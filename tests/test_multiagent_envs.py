"""Multi-agent TorchRL envs: nested keys (``("agents", "action")``), agent groups, per-agent returns.

VMAS navigation (3 agents, a batch of 4) and PettingZoo's ``simple_spread`` (3 agents,
through ``PettingZooWrapper``), each evaluated in-process and on 2 Ray workers with a
deterministic ``MultiAgentMLP`` policy. ``eval/reward`` must be TorchRL's quantity, the
return summed over agents and steps, checked against a plain TorchRL ``env.rollout`` on
the same seeds; ``eval/<group>/reward`` the mean per-agent return.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs import RewardSum, TransformedEnv
from torchrl.modules import MultiAgentMLP

from ray_eval import Evaluator
from ray_eval.planning import episode_seed, episode_seeds
from ray_eval.rollout.vector_loop import SEED_RANGE

pytest.importorskip("vmas")
pytest.importorskip("mpe2")

N_AGENTS = 3
VMAS_STEPS = 8  # VMAS ends every element's episode there: all elements reset together
PZ_CYCLES = 12
GROUP_STATS = (
    "reward",
    "reward_std",
    "reward_min",
    "reward_max",
    "reward_median",
    "reward_ci_low",
    "reward_ci_high",
    "reward_iqm",
    "reward_iqm_ci_low",
    "reward_iqm_ci_high",
)


def make_vmas():
    from torchrl.envs.libs.vmas import VmasEnv

    env = VmasEnv(
        "navigation",
        n_agents=N_AGENTS,
        num_envs=4,
        max_steps=VMAS_STEPS,
        continuous_actions=True,
    )
    # the multi-agent PPO tutorial's transform
    return TransformedEnv(
        env, RewardSum(in_keys=[env.reward_key], out_keys=[("agents", "episode_reward")])
    )


def make_simple_spread():
    from mpe2 import simple_spread_v3
    from torchrl.envs.libs.pettingzoo import PettingZooWrapper

    return PettingZooWrapper(
        simple_spread_v3.parallel_env(N=N_AGENTS, continuous_actions=True, max_cycles=PZ_CYCLES)
    )


def mlp_policy(group: str, inputs: int, outputs: int, squash: nn.Module) -> TensorDictModule:
    torch.manual_seed(0)
    net = MultiAgentMLP(
        n_agent_inputs=inputs,
        n_agent_outputs=outputs,
        n_agents=N_AGENTS,
        centralised=False,
        share_params=True,
        depth=2,
        num_cells=32,
        activation_class=nn.Tanh,
    )
    return TensorDictModule(
        nn.Sequential(net, squash),
        in_keys=[(group, "observation")],
        out_keys=[(group, "action")],
    )


def vmas_policy() -> TensorDictModule:
    return mlp_policy("agents", 18, 2, nn.Tanh())


def spread_policy() -> TensorDictModule:
    return mlp_policy("agent", 18, 5, nn.Sigmoid())  # simple_spread's actions are in [0, 1]


def check_group_keys(result, group: str, per_agent: np.ndarray) -> None:
    for stat in GROUP_STATS:
        assert isinstance(result[f"eval/{group}/{stat}"], float), stat
    agent_returns = result.episodes.agent_returns[group]
    assert agent_returns.shape == per_agent.shape
    np.testing.assert_allclose(agent_returns, per_agent, rtol=1e-5, atol=1e-6)
    assert result[f"eval/{group}/reward"] == pytest.approx(per_agent.mean(1).mean(), rel=1e-6)
    assert result[f"eval/{group}/reward_ci_low"] <= result[f"eval/{group}/reward"]
    assert result[f"eval/{group}/reward"] <= result[f"eval/{group}/reward_ci_high"]
    # eval/reward is the sum over agents (TorchRL's quantity), not their mean
    assert result["eval/reward"] == pytest.approx(per_agent.sum(1).mean(), rel=1e-5)


def vmas_reference(seed: int, step: int, episodes: int) -> np.ndarray:
    """Per episode, per agent: returns of a plain TorchRL rollout, chunk by chunk (one
    chunk per batch of 4, seeded as ray_eval seeds a batched env's chunk)."""
    env, policy = make_vmas(), vmas_policy()
    rows = []
    with torch.no_grad():
        for start in range(0, episodes, 4):
            env.set_seed(episode_seed(seed, step, start) % SEED_RANGE)
            td = env.reset()
            rollout = env.rollout(100, policy, auto_reset=False, tensordict=td)
            assert rollout.shape == (4, VMAS_STEPS)
            rows.append(rollout.get(("next", "agents", "reward")).sum(1).squeeze(-1).double())
    return torch.cat(rows).numpy()[:episodes]


def spread_reference(seed: int, step: int, episodes: int) -> np.ndarray:
    env, policy = make_simple_spread(), spread_policy()
    rows = []
    with torch.no_grad():
        for s in episode_seeds(seed, step, episodes):
            env.set_seed(int(s))
            rollout = env.rollout(100, policy, auto_reset=False, tensordict=env.reset())
            assert rollout.shape == (PZ_CYCLES,)
            rows.append(rollout.get(("next", "agent", "reward")).sum(0).squeeze(-1).double())
    env.close()
    return torch.stack(rows).numpy()


def test_vmas_navigation_in_process_and_on_two_workers(ray_local):
    common = {
        "num_trajectories": 8,
        "max_steps": 100,
        "seed": 5,
        "reward_keys": ("next", "agents", "reward"),  # as TorchRL's Evaluator is told
    }
    with Evaluator(make_vmas, vmas_policy(), num_workers=0, **common) as ev:
        in_process = ev.evaluate(step=2)
    with Evaluator(make_vmas, vmas_policy(), num_workers=2, **common) as ev:
        assert {w.rollouts[""] for w in ev.workers} == {"BatchedRollout"}
        on_ray = ev.evaluate(step=2)
    with Evaluator(make_vmas(), vmas_policy(), num_workers=0, **common) as ev:
        live = ev.evaluate(step=2)  # a live batched env: copied whole
    expected = vmas_reference(5, 2, 8)
    for result in (in_process, on_ray, live):
        assert result["eval/num_episodes"] == 8
        np.testing.assert_array_equal(result.episodes.lengths, VMAS_STEPS)
        check_group_keys(result, "agents", expected)
        np.testing.assert_allclose(result.episodes.returns, expected.sum(1), rtol=1e-5)
    np.testing.assert_array_equal(on_ray.episodes.returns, in_process.episodes.returns)
    np.testing.assert_array_equal(live.episodes.returns, in_process.episodes.returns)
    assert on_ray["eval/agents/reward_ci_low"] == in_process["eval/agents/reward_ci_low"]


def test_pettingzoo_simple_spread_in_process_and_on_two_workers(ray_local):
    # The env's own reward keys by default: every group's, summed over agents.
    common = {"num_trajectories": 4, "seed": 1}
    with Evaluator(make_simple_spread, spread_policy(), num_workers=0, **common) as ev:
        in_process = ev.evaluate(step=0)
    with Evaluator(make_simple_spread, spread_policy(), num_workers=2, **common) as ev:
        on_ray = ev.evaluate(step=0)
    expected = spread_reference(1, 0, 4)
    for result in (in_process, on_ray):
        assert result["eval/num_episodes"] == 4
        np.testing.assert_array_equal(result.episodes.lengths, PZ_CYCLES)
        check_group_keys(result, "agent", expected)
    np.testing.assert_array_equal(on_ray.episodes.returns, in_process.episodes.returns)
    assert len(set(in_process.episodes.returns.tolist())) > 1  # the seeds matter


@pytest.mark.parametrize("argument", ["reward_keys", "done_keys"])
def test_reward_and_done_keys_that_the_env_lacks_are_named(argument):
    kind = argument.split("_")[0]  # "reward" or "done"
    with pytest.raises(ValueError, match=rf"no {kind} key \('next', 'agents', '{kind}'\)"):
        Evaluator(
            make_simple_spread,
            spread_policy(),
            num_workers=0,
            num_trajectories=2,
            **{argument: ("next", "agents", kind)},
        )
