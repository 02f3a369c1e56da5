"""TorchRL's "Using the Evaluator" tutorial, run on ray_eval.

Only the import of ``Evaluator`` differs from the tutorial.
Run: python examples/tutorial.py
"""

from functools import partial

import torch
from tensordict import from_module
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.collectors import RandomPolicy
from torchrl.envs import GymEnv

from ray_eval import Evaluator

if __name__ == "__main__":
    # Synchronous evaluation
    env_maker = partial(GymEnv, "Pendulum-v1")
    policy = RandomPolicy(env_maker().action_spec)
    evaluator = Evaluator(env_maker, policy, num_trajectories=1)

    result = evaluator.evaluate()
    print("First eval:", result)
    result = evaluator.evaluate()
    print("Second eval:", result)

    # Asynchronous evaluation
    evaluator.trigger_eval()
    # poll() is non-blocking: returns None if the result isn't ready yet
    result = evaluator.poll()
    print("poll() returned:", result)

    result = evaluator.poll(timeout=30)
    print("poll(timeout=30) returned:", result)

    evaluator.trigger_eval()
    try:
        evaluator.trigger_eval()
    except RuntimeError as e:
        print(f"Errored with: {e}")
    # Clean up
    evaluator.wait(timeout=30)
    evaluator.shutdown()

    # Weight updates
    env = env_maker()
    net = nn.Sequential(
        nn.Linear(env.observation_spec["observation"].shape[-1], 64),
        nn.Tanh(),
        nn.Linear(64, env.action_spec.shape[-1]),
    )
    real_policy = TensorDictModule(net, in_keys=["observation"], out_keys=["action"])
    evaluator_w = Evaluator(env_maker, real_policy, num_trajectories=1)
    print("Before weight update:", evaluator_w.evaluate())

    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    print("After weight update:", evaluator_w.evaluate(weights=real_policy))

    real_weights = from_module(real_policy)
    print("With TensorDict weights:", evaluator_w.evaluate(weights=real_weights))
    evaluator_w.shutdown()

    # Process-based evaluation
    env_maker = partial(GymEnv, "Pendulum-v1")
    action_spec = env_maker().action_spec
    policy_factory = partial(RandomPolicy, action_spec)
    evaluator_proc = Evaluator(
        env_maker,
        policy_factory=policy_factory,
        num_trajectories=1,
        backend="process",
    )
    result = evaluator_proc.evaluate()
    print("Process backend:", result)
    evaluator_proc.shutdown()

    # Logging with callbacks
    import tempfile

    from torchrl.record.loggers.csv import CSVLogger

    log_dir = tempfile.mkdtemp()
    logger = CSVLogger(exp_name="eval_demo", log_dir=log_dir)
    evaluator_log = Evaluator(
        env_maker,
        real_policy,
        num_trajectories=1,
        on_result=lambda result: logger.log_metrics(
            {k: v.item() for k, v in result.items() if k != "eval/step"},
            step=result["eval/step"].item(),
        ),
    )
    for _ in range(3):
        evaluator_log.evaluate(weights=real_policy)
    evaluator_log.shutdown()

    from pathlib import Path

    csv_path = next(Path(log_dir).rglob("*.csv"))
    print(f"Logged to: {csv_path}")
    print(csv_path.read_text())
