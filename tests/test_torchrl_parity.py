"""TorchRL's Evaluator arguments, with TorchRL's meaning: weights_dict, frozen
normalization whose statistics travel with the weights, dump_video, metrics_fn on
trajectories, init_fn, num_gpus, ray_kwargs, and TorchRL's rules and wording."""

from __future__ import annotations

import functools
import re
import warnings

import numpy as np
import pytest
import ray
import torch
from tensordict import TensorDict

import tests.torchrl_parts as parts
from ray_eval import (
    Evaluator,
    EvaluatorBusyError,
    ResourceUnavailableError,
    WeightsMismatchError,
)

ray.cloudpickle.register_pickle_by_value(parts)


# -- weights_dict ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_weights_dict_policy_is_the_same_as_weights(ray_local, num_workers):
    trained = parts.pendulum_policy()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.3)
    with Evaluator(
        functools.partial(parts.GymEnv, "Pendulum-v1"),
        parts.pendulum_policy(),
        num_workers=num_workers,
        num_trajectories=4,
        max_steps=30,
    ) as ev:
        via_weights = ev.evaluate(weights=trained, step=3)
        via_dict = ev.evaluate(weights_dict={"policy": trained}, step=3)
        merged = ev.evaluate(weights=trained, weights_dict={}, step=3)
        initial = ev.evaluate(step=3)
        with pytest.raises(ValueError, match=r"weights_dict key 'critic'"):
            ev.evaluate(weights_dict={"critic": trained})
        bad = TensorDict({"module": {"0": {"weight": torch.zeros(16, 5)}}}, [])
        with pytest.raises(WeightsMismatchError):
            ev.evaluate(weights_dict={"policy": bad})
    returns = [r.episodes.returns.tolist() for r in (via_weights, via_dict, merged)]
    assert returns[0] == returns[1] == returns[2]
    assert initial.episodes.returns.tolist() != returns[0]


# -- frozen normalization, statistics in weights_dict ---------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_normalization_is_frozen_and_its_statistics_travel_in_weights_dict(ray_local, num_workers):
    stats_a, stats_b = parts.fed_vecnorm(40, seed=1), parts.fed_vecnorm(400, seed=2)
    trainer_state = {k: v.clone() for k, v in stats_a.state_dict()["_extra_state"].items()}
    with Evaluator(
        parts.vecnorm_env,
        parts.pendulum_policy(),
        num_workers=num_workers,
        num_trajectories=4,
        max_steps=50,
    ) as ev:
        a1 = ev.evaluate(weights_dict={"env.transform[0]": stats_a}, step=0)
        a2 = ev.evaluate(step=0)  # the same statistics, not updated by a1's episodes
        b = ev.evaluate(weights_dict={"env.transform[0]": stats_b}, step=0)
        with pytest.raises(ValueError, match=re.escape("the env (TransformedEnv) has no [7]")):
            ev.evaluate(weights_dict={"env.transform[7]": stats_a})
    np.testing.assert_array_equal(a1.episodes.returns, a2.episodes.returns)
    assert not np.array_equal(a1.episodes.returns, b.episodes.returns)
    # The trainer's own statistics were copied, not touched.
    after = stats_a.state_dict()["_extra_state"]
    assert not stats_a.frozen and after.keys() == trainer_state.keys()
    assert all(torch.equal(after[k], v) for k, v in trainer_state.items())


@pytest.mark.filterwarnings("ignore:This class is to be deprecated:FutureWarning")
def test_vecnorm_v1_statistics_load_without_torchrls_sharing_warning():
    """TorchRL's VecNorm (v1) warns "VecNorm wasn't initialized and the tensordict is not
    shared" when statistics are loaded into a copy that never ran: every env copy would
    print it although ray_eval loaded the trainer's statistics into each one."""
    stats = parts.fed_vecnorm(40, seed=1, make_env=parts.vecnorm_v1_env)
    with Evaluator(
        parts.vecnorm_v1_env,
        parts.pendulum_policy(),
        num_workers=0,  # the same worker code as a Ray worker, in this process's warnings
        num_trajectories=4,
        max_steps=20,
    ) as ev:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = ev.evaluate(weights_dict={"env.transform[0]": stats}, step=0)
        fresh = parts.fed_vecnorm(400, seed=2, make_env=parts.vecnorm_v1_env)
        other = ev.evaluate(weights_dict={"env.transform[0]": fresh}, step=0)
    assert [str(w.message) for w in caught if "VecNorm wasn't initialized" in str(w.message)] == []
    # The statistics did travel: other statistics, other returns.
    assert not np.array_equal(loaded.episodes.returns, other.episodes.returns)
    # A VecNorm loaded outside ray_eval still warns: only ray_eval's loads are silenced.
    with pytest.warns(UserWarning, match="VecNorm wasn't initialized"):
        parts.vecnorm_v1_env().transform[0].load_state_dict(stats.state_dict())


# -- dump_video --------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dump_video_logs_one_video_per_evaluation_at_its_step(ray_local, tmp_path, num_workers):
    with Evaluator(
        functools.partial(parts.video_env, str(tmp_path)),
        parts.pendulum_policy(),
        num_workers=num_workers,
        num_trajectories=4,
        max_steps=10,
    ) as ev:
        ev.evaluate(step=11)
        ev.evaluate(step=22)
        events = parts.video_events(tmp_path)
    assert [e[:2] for e in events] == [["eval_video", "11"], ["eval_video", "22"]]
    assert all(int(e[2]) > 0 for e in events)


def test_dump_video_false_logs_nothing(ray_local, tmp_path):
    with Evaluator(
        functools.partial(parts.video_env, str(tmp_path)),
        parts.pendulum_policy(),
        num_workers=1,
        num_trajectories=2,
        max_steps=5,
        dump_video=False,
    ) as ev:
        ev.evaluate(step=1)
    assert parts.video_events(tmp_path) == []


# -- metrics_fn: TorchRL's contract -------------------------------------------------------------------


@pytest.mark.parametrize("traj_format", ["pad", "cat"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_metrics_fn_gets_the_trajectories_tensordict(ray_local, traj_format, num_workers):
    def metrics(td):
        return {
            "rows": td.shape[0],
            "cols": td.shape[1] if traj_format == "pad" else 0,
            "steps": int(td["collector", "mask"].sum()) if traj_format == "pad" else td.numel(),
            "reward_sum": float(td["next", "reward"].sum()),
            "episodes": int(td["collector", "traj_ids"].max()) + 1,
        }

    with Evaluator(
        parts.env_var_pendulum,
        parts.pendulum_policy(),
        num_workers=num_workers,
        num_trajectories=3,
        max_steps=17,
        metrics_fn=metrics,
        collector_kwargs={"traj_format": traj_format},
    ) as ev:
        result = ev.evaluate(step=0)
    assert result["eval/steps"] == 3 * 17 == result["eval/env_steps"]
    assert result["eval/episodes"] == 3
    assert (result["eval/rows"], result["eval/cols"]) == (
        (3, 17) if traj_format == "pad" else (51, 0)
    )
    assert result["eval/reward_sum"] == pytest.approx(result.episodes.returns.sum(), rel=1e-5)


# -- init_fn, num_gpus, ray_kwargs -------------------------------------------------------------------


def test_init_fn_runs_in_every_worker_process(ray_local, tmp_path):
    with Evaluator(
        parts.env_var_pendulum,
        parts.pendulum_policy(),
        num_workers=2,
        num_trajectories=2,
        max_steps=5,
        init_fn=functools.partial(parts.mark_process, str(tmp_path)),
    ) as ev:
        pids = {w.pid for w in ev.workers}
    assert {int(p.name.split("-")[1]) for p in tmp_path.glob("init-*")} == pids


def test_ray_kwargs_reach_the_worker_actors(ray_local):
    results = {}
    for g in ("10.0", "2.0"):
        with Evaluator(
            parts.env_var_pendulum,
            parts.pendulum_policy(),
            num_workers=1,
            num_trajectories=2,
            max_steps=30,
            ray_kwargs={"runtime_env": {"env_vars": {"RAY_EVAL_TEST_G": g}}},
        ) as ev:
            results[g] = ev.evaluate(step=0).episodes.returns.tolist()
    assert results["10.0"] != results["2.0"]


def test_num_gpus_asks_each_worker_for_gpus(ray_local):
    with pytest.raises(ResourceUnavailableError, match="GPU"):
        Evaluator(parts.env_var_pendulum, parts.pendulum_policy(), num_workers=1, num_gpus=1)


# -- TorchRL's rules and wording ------------------------------------------------------------------------


def test_process_backend_needs_factories_in_torchrls_words(ray_local):
    with pytest.raises(ValueError, match="requires `env` to be a callable"):
        Evaluator(parts.vecnorm_env(), policy_factory=parts.pendulum_policy, backend="process")
    with pytest.raises(ValueError, match="requires `policy_factory`"):
        Evaluator(parts.vecnorm_env, parts.pendulum_policy(), backend="process")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"busy_policy": "sometimes"}, "Unknown busy_policy 'sometimes'"),
        ({"backend": "dask"}, "Unknown backend 'dask'"),
        ({"collector_cls": object}, "collector_cls is not supported by ray_eval"),
        ({"weight_sync_schemes": {"policy": object()}}, "weight_sync_schemes is not supported"),
        ({"collector_kwargs": {"split_trajs": True}}, "collector_kwargs ['split_trajs']"),
        ({"collector_kwargs": {"traj_format": "nested"}}, "traj_format'] must be one of"),
        ({"episode_sampling": "shortest"}, "Unknown episode_sampling 'shortest'"),
        ({"frames_per_batch": 0}, "frames_per_batch must be a positive int"),
    ],
)
def test_torchrl_arguments_refused_by_name(ray_local, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Evaluator(parts.env_var_pendulum, parts.pendulum_policy(), **kwargs)


def test_busy_error_has_torchrls_wording():
    """TorchRL 0.14.1's own Evaluator, under busy_policy="error", and ray_eval's say the same."""
    from torchrl.collectors import Evaluator as TorchRLEvaluator

    torchrl_ev = TorchRLEvaluator(
        parts.env_var_pendulum, parts.pendulum_policy(), busy_policy="error", max_steps=20
    )
    try:
        torchrl_ev.trigger_eval()
        with pytest.raises(RuntimeError) as torchrl_error:
            torchrl_ev.trigger_eval()
        torchrl_ev.wait(timeout=60)
    finally:
        torchrl_ev.shutdown()
    with Evaluator(
        parts.env_var_pendulum, parts.pendulum_policy(), num_workers=0, max_steps=20
    ) as ev:
        ev.trigger_eval()
        with pytest.raises(EvaluatorBusyError) as ours:
            ev.trigger_eval()
        ev.wait(timeout=60)
    assert str(ours.value) == str(torchrl_error.value)


def test_missing_policy_in_torchrls_words():
    with pytest.raises(ValueError, match=r"policy.*must be provided"):
        Evaluator(parts.env_var_pendulum)


def test_accepted_torchrl_arguments_run(ray_local):
    with Evaluator(
        parts.env_var_pendulum,
        parts.pendulum_policy(),
        num_workers=0,
        num_trajectories=2,
        max_steps=5,
        frames_per_batch=100,
        done_keys=[("next", "done")],
        episode_sampling="first_done",
        device="cpu",
    ) as ev:
        assert ev.evaluate()["eval/num_episodes"] == 2
