"""RayEvalHook on real TorchRL Trainer runs (A2C on Pendulum with a running VecNormV2):
logged at the frames of the weights, the best kept with its statistics and reproduced,
EarlyStopping and torchrl.checkpoint alongside, and a stop at the documented delay."""

from __future__ import annotations

import csv

import pytest
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
from ray_eval.integrations import KeepBest, RayEvalHook, StopOnThreshold, load_best
from ray_eval.jobs.checkpoints import load_weights

FRAMES_PER_BATCH = 50
INTERVAL = 100


def make_env() -> TransformedEnv:
    return TransformedEnv(GymEnv("Pendulum-v1"), Compose(VecNormV2(in_keys=["observation"])))


def make_actor() -> ProbabilisticActor:
    torch.manual_seed(0)
    net = nn.Sequential(MLP(in_features=3, out_features=2, num_cells=[16]), NormalParamExtractor())
    return ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        distribution_class=TanhNormal,
        distribution_kwargs={"low": -2.0, "high": 2.0},
        return_log_prob=True,
    )


def make_trainer(env, actor, total_frames: int, **kwargs) -> Trainer:
    critic = ValueOperator(
        MLP(in_features=3, out_features=1, num_cells=[16]), in_keys=["observation"]
    )
    loss = A2CLoss(actor, critic)
    return Trainer(
        collector=Collector(
            env, actor, frames_per_batch=FRAMES_PER_BATCH, total_frames=total_frames
        ),
        total_frames=total_frames,
        frame_skip=1,
        optim_steps_per_batch=1,
        loss_module=loss,
        optimizer=torch.optim.Adam(loss.parameters(), 1e-2),
        progress_bar=False,
        **kwargs,
    )


class _Stats:
    """A post_steps_log op run before the hook: the training VecNormV2's state at each frame count."""

    def __init__(self, trainer, env) -> None:
        self.trainer, self.env, self.by_frames = trainer, env, {}

    def __call__(self, batch):
        state = self.env.transform[0].state_dict()["_extra_state"]
        self.by_frames[int(self.trainer.collected_frames)] = {
            k: v.clone() for k, v in state.items()
        }


def _csv(path) -> list[tuple[int, float]]:
    with open(path) as handle:
        return [(int(row[0]), float(row[1])) for row in csv.reader(handle)]


def test_hook_logs_keeps_best_and_runs_with_early_stopping_and_checkpoints(ray_local, tmp_path):
    env, actor = make_env(), make_actor()
    ckpts = tmp_path / "ckpt"
    rotation = CheckpointRotation(ckpts, keep_last=2, keep_best=("eval/reward", "max"))
    evaluator = Evaluator(make_env, make_actor(), num_workers=1, num_trajectories=3, max_steps=60)
    hook = RayEvalHook(
        evaluator,
        policy=actor,
        interval=INTERVAL,
        env_parts={"env.transform[0]": env.transform[0]},
        keep_best=KeepBest(tmp_path / "best", metric="reward"),
    )
    trainer = make_trainer(
        env,
        actor,
        400,
        logger=CSVLogger("run", log_dir=str(tmp_path)),
        checkpoint=Checkpoint(),
        checkpoint_rotation=rotation,
        checkpoint_metadata=hook.checkpoint_metadata,
        save_trainer_interval=INTERVAL,
    )
    stats = _Stats(trainer, env)
    trainer.register_op("post_steps_log", stats)
    hook.register(trainer)
    early = EarlyStopping(monitor="r_evaluation", patience=10**6, wait_for=0)
    early.register(trainer)  # reads the metric from the first iteration on: it is there
    try:
        trainer.train()
        history = hook.schedule.history
        assert [d.step for d in history] == [50, 100, 200, 300, 400]
        assert all(d.lag <= INTERVAL for d in history)
        logged = _csv(tmp_path / "run" / "scalars" / "eval" / "reward.csv")
        assert logged == [(d.step, d.result["eval/reward"]) for d in history]
        per_step = _csv(tmp_path / "run" / "scalars" / "r_evaluation.csv")
        for (step, value), d in zip(per_step, history):
            episodes = d.result.episodes
            assert step == d.step
            assert value == pytest.approx(episodes.returns.sum() / episodes.lengths.sum())
        assert early.best_score is not None and early.stop_reason is None

        best = load_best(tmp_path / "best")
        assert best.value == max(d.result["eval/reward"] for d in history)
        saved = best.weights_dict["env.transform[0]"]["_extra_state"]
        evaluated = stats.by_frames[best.step]
        assert all(torch.equal(saved[k], v) for k, v in evaluated.items())
        again = evaluator.evaluate(best.weights, step=best.step, weights_dict=best.weights_dict)
        assert again["eval/reward"] == best.value

        # torchrl.checkpoint: ranked by the hook's metadata, read back by ray_eval
        assert rotation.best() is not None and len(rotation.checkpoints()) >= 2
        weights, step = load_weights(rotation.latest())
        assert step == 400
        assert set(weights) == set(actor.state_dict())
        assert all(torch.equal(weights[k], v) for k, v in actor.state_dict().items())
    finally:
        evaluator.shutdown()


def test_hook_stop_reaches_the_trainer_within_one_interval(tmp_path):
    """The stop decided on the weights of frame 200 (the first evaluation with
    eval/step >= 150) stops the trainer by frame 200 + interval, asynchronously."""
    env, actor = make_env(), make_actor()
    with Evaluator(make_env, make_actor(), num_workers=0, num_trajectories=2, max_steps=100) as ev:
        hook = RayEvalHook(
            ev, policy=actor, interval=INTERVAL, stop=StopOnThreshold.parse("eval/step >= 150")
        )
        trainer = make_trainer(env, actor, 5000)
        hook.register(trainer)
        trainer.train()
    assert hook.schedule.stop_step == 200
    assert 200 < trainer.collected_frames == hook.schedule.stop_seen_at <= 200 + INTERVAL
    assert "eval/step" in trainer._stop_reason
    assert [d.step for d in hook.schedule.history] == [50, 100, 200]


def test_hook_must_be_registered():
    hook = RayEvalHook(object(), policy=nn.Linear(1, 1), interval=10)
    with pytest.raises(RuntimeError, match=r"call hook.register\(trainer\)"):
        hook()
