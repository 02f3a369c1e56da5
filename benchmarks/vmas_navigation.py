"""VMAS navigation (3 agents, a batched env) through ray_eval, beside one-process TorchRL loops.

    python benchmarks/vmas_navigation.py            # a few minutes on 2 cores
    python benchmarks/vmas_navigation.py --quick    # a smoke run

The workload is the TorchRL multi-agent PPO tutorial's: ``VmasEnv("navigation",
n_agents=3, num_envs=--num-envs, max_steps=100)`` with its ``RewardSum``, and a
deterministic ``MultiAgentMLP`` policy (2 x 256 tanh, shared parameters, as the
tutorial's), called once per step on the whole batch. ``--num-envs`` defaults to
60, the tutorial's own batch (``frames_per_batch / max_steps``). Runners, side by
side in one run:

* ray_eval, 2 workers: each worker steps its own copy of the batched env, one chunk
  of ``--num-envs`` episodes after another (``rollout.batched_loop``);
* a one-process TorchRL loop: ``env.reset()`` then ``env.rollout(100, policy)`` on
  the same batched env, as many times as it takes to run the same episodes, one
  torch thread (as each worker has);
* TorchRL's own ``Evaluator`` (thread backend) on the same factory and policy, with
  ``reward_keys=("next", "agents", "reward")``.

(Not ``vmas.py``: a script of that name would shadow the ``vmas`` package for itself and
for the Ray workers, which put the driver's directory on their path.)

Steps are element steps (one step of one batch element, i.e. of 3 agents). Each
figure is the median over ``--repeats`` runs after a warm-up, the runners taking
turns run by run; the load average is printed. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

import ray
import torch
from harness import Rate, fmt_rate, load_average, print_table, ratio, start_ray, timed
from tensordict.nn import TensorDictModule
from torch import nn

MAX_STEPS = 100
N_AGENTS = 3
WORKERS = 2


def make_env(num_envs: int = 60):
    """The tutorial's env: VMAS navigation, 3 agents, with its RewardSum."""
    from torchrl.envs import RewardSum, TransformedEnv
    from torchrl.envs.libs.vmas import VmasEnv

    env = VmasEnv(
        "navigation",
        n_agents=N_AGENTS,
        num_envs=num_envs,
        max_steps=MAX_STEPS,
        continuous_actions=True,
    )
    return TransformedEnv(
        env, RewardSum(in_keys=[env.reward_key], out_keys=[("agents", "episode_reward")])
    )


def make_policy() -> TensorDictModule:
    """The tutorial's policy network (its loc half, deterministic), seeded."""
    from torchrl.modules import MultiAgentMLP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = MultiAgentMLP(
            n_agent_inputs=18,
            n_agent_outputs=2,
            n_agents=N_AGENTS,
            centralised=False,
            share_params=True,
            depth=2,
            num_cells=256,
            activation_class=nn.Tanh,
        )
    return TensorDictModule(
        nn.Sequential(net, nn.Tanh()),
        in_keys=[("agents", "observation")],
        out_keys=[("agents", "action")],
    )


class TorchRLLoop:
    """``env.rollout`` on one batched env, in this process, until ``episodes`` have run."""

    def __init__(self, num_envs: int, episodes: int) -> None:
        self.env = make_env(num_envs)
        self.policy = make_policy()
        self.rounds = math.ceil(episodes / num_envs)
        self.num_envs = num_envs

    def __call__(self) -> int:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        steps = 0
        try:
            with torch.no_grad():
                for _ in range(self.rounds):
                    td = self.env.reset()
                    rollout = self.env.rollout(
                        MAX_STEPS, self.policy, auto_reset=False, tensordict=td
                    )
                    steps += self.num_envs * rollout.shape[1]
        finally:
            torch.set_num_threads(threads)
        return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small, 1 repeat")
    parser.add_argument("--num-envs", type=int, default=60)
    parser.add_argument("--episodes", type=int, default=None, help="default: 8 x --num-envs")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-torchrl-evaluator", action="store_true")
    args = parser.parse_args(argv)
    num_envs = args.num_envs if not args.quick else min(args.num_envs, 8)
    episodes = args.episodes or 8 * num_envs
    repeats = args.repeats or (1 if args.quick else 5)
    warnings.filterwarnings("ignore")

    import functools
    from importlib.metadata import version

    import torchrl

    from ray_eval import Evaluator

    print(
        f"VMAS navigation, {N_AGENTS} agents, batch {num_envs}, {MAX_STEPS} steps per "
        f"episode, {episodes} episodes per evaluation; MultiAgentMLP 2 x 256; "
        f"{os.cpu_count()} CPUs, load average {load_average()}"
    )
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, torchrl "
        f"{torchrl.__version__}, vmas {version('vmas')}, ray {ray.__version__}"
    )
    factory = functools.partial(make_env, num_envs)
    start_ray()
    rates: dict[str, Rate] = {}
    torchrl_evaluator = None
    try:
        with Evaluator(
            factory,
            make_policy(),
            num_workers=WORKERS,
            num_trajectories=episodes,
            max_steps=MAX_STEPS,
            reward_keys=("next", "agents", "reward"),
        ) as evaluator:
            runners = {
                "ray_eval, 2 workers": lambda: int(evaluator.evaluate()["eval/env_steps"]),
                "TorchRL env.rollout, 1 process": TorchRLLoop(num_envs, episodes),
            }
            if not args.no_torchrl_evaluator:
                from torchrl.collectors import Evaluator as TorchRLEvaluator

                torchrl_evaluator = TorchRLEvaluator(
                    factory,
                    make_policy(),
                    num_trajectories=episodes,
                    max_steps=MAX_STEPS,
                    reward_keys=("next", "agents", "reward"),
                    busy_policy="queue",
                )

                def torchrl_run() -> int:
                    result = torchrl_evaluator.evaluate()
                    return round(result["eval/num_episodes"] * result["eval/episode_length"])

                runners["TorchRL Evaluator (thread)"] = torchrl_run
            rates = timed(runners, repeats)
    finally:
        if torchrl_evaluator is not None:
            torchrl_evaluator.shutdown()
        ray.shutdown()
    loop = rates["TorchRL env.rollout, 1 process"]
    print_table(
        f"element steps per second (median of {repeats} runs after a warm-up)",
        ["runner", "steps/s", "best run", "vs env.rollout loop", "load average"],
        [
            [name, fmt_rate(rate), f"{rate.best:,.0f}", ratio(rate, loop), rate.load]
            for name, rate in rates.items()
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
