"""TorchRL's Trainer with ray_eval's hook: background evaluation, the best kept, early stop.

A2C on Pendulum-v1 with a running observation normalization (``VecNormV2``) in
the training env. ``RayEvalHook`` takes the place of TorchRL's
``LogValidationReward``: every ``--interval`` frames it hands the actor's weights
and the VecNorm statistics to a pool of Ray workers and training goes on. Each
result is logged (CSV, at the frames of the weights it evaluated), the best is
kept with the statistics it was evaluated with, and the run stops once the
lower bound of the reward's 95% interval reaches ``--target``. TorchRL's own
``EarlyStopping`` and ``CheckpointRotation`` run alongside, fed by the hook.

At the end the best checkpoint is reloaded and evaluated again: the same number.

Run:  python examples/torchrl_trainer.py [--frames 10000] [--out outputs/torchrl_trainer]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.checkpoint import Checkpoint, CheckpointRotation
from torchrl.collectors import Collector
from torchrl.envs import Compose, GymEnv, TransformedEnv, VecNormV2
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives import A2CLoss
from torchrl.record import CSVLogger
from torchrl.trainers import EarlyStopping, Trainer

from ray_eval import Evaluator
from ray_eval.integrations import (
    EpisodeRecord,
    KeepBest,
    RayEvalHook,
    StopOnThreshold,
    load_best,
)


def make_env() -> TransformedEnv:
    return TransformedEnv(GymEnv("Pendulum-v1"), Compose(VecNormV2(in_keys=["observation"])))


def make_actor() -> ProbabilisticActor:
    torch.manual_seed(0)
    net = nn.Sequential(
        MLP(in_features=3, out_features=2, num_cells=[64, 64]), NormalParamExtractor()
    )
    return ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        distribution_class=TanhNormal,
        distribution_kwargs={"low": -2.0, "high": 2.0},
        return_log_prob=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--interval", type=int, default=2_000, help="frames between evaluations")
    parser.add_argument("--episodes", type=int, default=16, help="episodes per evaluation")
    parser.add_argument(
        "--workers", type=int, default=None, help="Ray workers (default: free CPUs)"
    )
    parser.add_argument(
        "--target", type=float, default=-300.0, help="stop at reward_ci_low >= this"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/torchrl_trainer"))
    args = parser.parse_args()

    env, actor = make_env(), make_actor()
    critic = ValueOperator(
        MLP(in_features=3, out_features=1, num_cells=[64, 64]), in_keys=["observation"]
    )
    loss = A2CLoss(actor, critic, entropy_coeff=1e-3)
    evaluator = Evaluator(
        make_env,
        make_actor(),
        num_workers=args.workers,
        num_trajectories=args.episodes,
        startup_timeout=300,  # a busy machine starts workers slowly: wait rather than fail
        wait_for_workers=False,  # they start while the first batches train
    )
    hook = RayEvalHook(
        evaluator,
        policy=actor,
        interval=args.interval,
        env_parts={"env.transform[0]": env.transform[0]},  # the statistics travel with the weights
        keep_best=KeepBest(args.out / "best"),  # by reward_ci_low, the interval's lower bound
        stop=StopOnThreshold(args.target, "reward_ci_low"),
        record=EpisodeRecord(args.out / "episodes.jsonl"),
    )
    trainer = Trainer(
        collector=Collector(env, actor, frames_per_batch=200, total_frames=args.frames),
        total_frames=args.frames,
        frame_skip=1,
        optim_steps_per_batch=1,
        loss_module=loss,
        optimizer=torch.optim.Adam(loss.parameters(), 3e-3),
        logger=CSVLogger("run", log_dir=str(args.out)),
        progress_bar=False,
        log_interval=args.interval,
        checkpoint=Checkpoint(),
        checkpoint_rotation=CheckpointRotation(
            args.out / "checkpoints", keep_last=2, keep_best=("eval/reward", "max")
        ),
        checkpoint_metadata=hook.checkpoint_metadata,
        save_trainer_interval=args.interval,
    )
    hook.register(trainer)
    EarlyStopping(monitor="r_evaluation", patience=10 * args.interval, wait_for=0).register(trainer)
    try:
        trainer.train()
        for item in hook.schedule.history:
            r = item.result
            print(
                f"frames {item.step:>6}: reward {r['eval/reward']:8.1f}  95% CI "
                f"[{r['eval/reward_ci_low']:7.1f}, {r['eval/reward_ci_high']:7.1f}]  "
                f"(read at {item.seen_at})"
            )
        if hook.schedule.should_stop:
            print(
                f"stopped early at {trainer.collected_frames} frames: {hook.schedule.stop_reason}"
            )
        best = load_best(args.out / "best")
        again = evaluator.evaluate(best.weights, step=best.step, weights_dict=best.weights_dict)
        print(
            f"best: frames {best.step}, {best.metric} = {best.value:.2f}; reloaded and evaluated "
            f"again: {again[best.metric]:.2f} ({'the same' if again[best.metric] == best.value else 'DIFFERENT'})"
        )
        print(f"kept in {best.path}; TorchRL checkpoints in {args.out / 'checkpoints'}")
    finally:
        evaluator.shutdown()


if __name__ == "__main__":
    main()
