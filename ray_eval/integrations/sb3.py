"""stable-baselines3's ``EvalCallback``, evaluating on Ray workers in the background.

``EvalCallback`` takes SB3's arguments and keeps what SB3's shows to other
callbacks (``best_mean_reward``, ``last_mean_reward``, ``evaluations_*``,
``evaluations.npz`` under ``log_path``, ``best_model.zip`` under
``best_model_save_path``, ``callback_on_new_best``, ``callback_after_eval``,
the ``eval/mean_reward`` log). What changes:

* Every ``eval_freq`` calls it hands the weights (and the ``VecNormalize``
  statistics, synced from the training env as SB3 does) to a ray_eval pool and
  training goes on; the result is handled, exactly as SB3 would have handled it
  then, at the first ``_on_step`` after it arrives, and logged at the timestep
  of the weights. ``when_busy="wait"`` (default) waits at the next evaluation
  point for an evaluation still running, so a result (and a stop decision from
  ``callback_on_new_best``/``callback_after_eval``) arrives at most
  ``eval_freq`` calls late. ``async_eval=False`` waits for each evaluation
  where SB3 would: SB3's blocking behaviour.
* The best model saved is the one evaluated (not the weights training has
  reached when the result arrives), and beside ``best_model.zip`` the
  ``VecNormalize`` statistics it was evaluated with (``vecnormalize.pkl``,
  loadable with ``VecNormalize.load``) and the result (``best_model.json``):
  reloading both reproduces its number (SB3 issue #1556).
* Episode ``i`` of the evaluation at timestep ``t`` is reset with a seed derived
  from ``(seed, t, i)``: the numbers do not depend on the number of workers, and
  for a given seed they are those of SB3's ``evaluate_policy`` on an env reset
  with that seed (rewards summed as the env returns them, i.e. without
  ``Monitor``'s rounding to 6 decimals).
* ``best_by="reward_ci_low"`` picks the best by the lower bound of the mean's
  95% interval instead of the mean; ``best_mean_reward`` then holds that bound,
  so SB3's ``StopTrainingOnRewardThreshold`` stops on it.

The workers start in the background when each ``learn()`` starts, while the first
``eval_freq`` steps train; the first evaluation waits for the rest of their start (up to
300 s: ``evaluator_kwargs={"startup_timeout": ...}``). They stop at the end of
``learn()``, where the evaluations still running are waited for and handled (also under an
``EventCallback`` such as ``EveryNTimesteps``, which SB3 does not pass the end to).

Not supported: ``render=True`` (the workers have no screen), eval envs other
than a gymnasium env or a ``DummyVecEnv`` under ``VecNormalize``/``VecMonitor``,
recurrent policies.
"""

from __future__ import annotations

import json
import os
import pickle
import time
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.callbacks import BaseCallback, EventCallback
from stable_baselines3.common.callbacks import EvalCallback as SB3EvalCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import VecEnv, VecMonitor, is_vecenv_wrapped
from stable_baselines3.common.vec_env import sync_envs_normalization as _sync_normalization

from ray_eval.integrations.criteria import Criterion
from ray_eval.integrations.sb3_policy import actor_weights, eval_env_parts, worker_actor
from ray_eval.integrations.schedule import EvalSchedule

SUCCESS_KEY = "is_success"
MONITOR_WARNING = (
    "Evaluation environment is not wrapped with a ``Monitor`` wrapper. This may result in "
    "reporting modified episode lengths and rewards, if other wrappers happen to modify "
    "these. Consider wrapping environment first with ``Monitor`` wrapper."
)


class EvalCallback(SB3EvalCallback):
    """SB3's ``EvalCallback`` on a ray_eval pool (see the module docstring).

    Beyond SB3's arguments: ``async_eval`` (default True), ``when_busy``
    (``"wait"`` or ``"skip"``, see ``EvalSchedule``), ``best_by`` (a result
    metric, ``"reward"`` = SB3's mean), ``seed``, ``num_workers`` (``None``: as
    many as there are free CPUs, at most ``n_eval_episodes``; 0: in-process),
    and ``evaluator_kwargs`` (more ``ray_eval.Evaluator`` arguments).
    """

    def __init__(
        self,
        eval_env: gym.Env | VecEnv,
        callback_on_new_best: BaseCallback | None = None,
        callback_after_eval: BaseCallback | None = None,
        n_eval_episodes: int = 5,
        eval_freq: int = 10000,
        log_path: str | None = None,
        best_model_save_path: str | None = None,
        deterministic: bool = True,
        render: bool = False,
        verbose: int = 1,
        warn: bool = True,
        *,
        async_eval: bool = True,
        when_busy: str = "wait",
        best_by: str = "reward",
        seed: int = 0,
        num_workers: int | None = None,
        evaluator_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if render:
            raise ValueError(
                "ray_eval.sb3.EvalCallback evaluates on Ray workers, which have no screen: "
                "render=True is not supported (record videos with "
                "evaluator_kwargs={'record_video': n, 'video_dir': ...})"
            )
        super().__init__(
            eval_env,
            callback_on_new_best=callback_on_new_best,
            callback_after_eval=callback_after_eval,
            n_eval_episodes=n_eval_episodes,
            eval_freq=eval_freq,
            log_path=log_path,
            best_model_save_path=best_model_save_path,
            deterministic=deterministic,
            render=render,
            verbose=verbose,
            warn=warn,
        )
        self._parts = eval_env_parts(self.eval_env)  # unsupported eval envs fail here
        self.async_eval = async_eval
        self.when_busy = when_busy
        self.best_criterion = Criterion(best_by, "max")
        self.seed = seed
        self.num_workers = num_workers
        self.evaluator_kwargs = dict(evaluator_kwargs or {})
        self.evaluator = None
        self.schedule: EvalSchedule | None = None
        self.best_result: dict | None = None  # the result of the best model
        self.last_result = None  # the latest EvalResult
        self.results: list = []  # every EvalResult handled, in order (episodes included)
        # what training waited for the workers to start (each learn() starts them)
        self.startup_seconds = 0.0
        self._workers_up = False
        self._kept: dict[int, tuple[dict, bytes | None]] = {}  # step -> what it evaluated

    # -- lifecycle -------------------------------------------------------------------

    def _init_callback(self) -> None:
        super()._init_callback()
        # SB3's EventCallback (EveryNTimesteps, ...) passes on_step to its child but not
        # on_training_end: the evaluations still running at the end of learn() would be
        # left unhandled and the workers running. Chain ours to the parent's end.
        parent = self.parent
        if isinstance(parent, EventCallback) and not getattr(parent, "_ray_eval_chained", False):
            parent_end = parent._on_training_end

            def _on_training_end() -> None:
                parent_end()
                self.on_training_end()  # idempotent: nothing left if the parent passed it on

            parent._on_training_end = _on_training_end
            parent._ray_eval_chained = True

    def _on_training_start(self) -> None:
        super()._on_training_start()
        if self.eval_freq > 0 and self.evaluator is None:
            self._start_evaluator()  # returns at once: the workers start while training goes on

    def _start_evaluator(self) -> None:
        from ray_eval.evaluator import Evaluator

        kwargs = {
            "num_workers": self.num_workers,
            "num_trajectories": self.n_eval_episodes,
            "seed": self.seed,
            # SB3's batch: one predict() call on all the eval env's copies; the same
            # batch size gives the same bits
            "envs_per_worker": self._parts.num_envs,
            "busy_policy": "queue",
            # a training run would rather wait for workers slow to start on a busy machine
            # than stop with an error (placements that cannot fit still fail at once)
            "startup_timeout": 300.0,
            "wait_for_workers": False,  # waited for at the first evaluation (_await_workers)
            **self.evaluator_kwargs,
        }
        started = time.perf_counter()
        actor = worker_actor(self.model.policy, self._parts, self.deterministic)
        self.evaluator = Evaluator(self._parts.env, actor, **kwargs)
        self._workers_up = False
        self.startup_seconds += time.perf_counter() - started
        self.schedule = EvalSchedule(
            self.evaluator, max(self.eval_freq, 1), when_busy=self.when_busy
        )

    def _await_workers(self) -> None:
        """Wait for the rest of the workers' start; raises what stopped it."""
        if not self._workers_up:
            started = time.perf_counter()
            try:
                self.evaluator.num_workers  # noqa: B018 (waits for the start)
            finally:
                self.startup_seconds += time.perf_counter() - started
            self._workers_up = True

    def _on_training_end(self) -> None:
        """Handle the evaluations still running, then stop the workers (a next ``learn``
        starts them again)."""
        if self.schedule is not None:
            for delivered in self.schedule.finish():
                self._handle(delivered.result)
        self.close()

    def close(self) -> None:
        """Stop the evaluation workers (idempotent). Pending evaluations are dropped."""
        if self.evaluator is not None:
            self.evaluator.shutdown()
        self.evaluator = None
        self.schedule = None
        self._kept.clear()

    # -- steps ----------------------------------------------------------------------

    def _on_step(self) -> bool:
        # Results that arrived since the last step are handled first: a stop they
        # decide starts no further evaluation.
        continue_training = self._handle_all(self._collect())
        delivered = []
        if continue_training and self.eval_freq > 0 and self.n_calls % self.eval_freq == 0:
            self._sync_normalization()
            if self.evaluator is None:  # on_training_start was not called
                self._start_evaluator()
            self._await_workers()
            if self.warn and not self._monitor_wrapped():
                warnings.warn(MONITOR_WARNING, UserWarning, stacklevel=2)
            delivered = self._evaluate_now() if not self.async_eval else self._trigger()
            delivered += self._collect()
        return self._handle_all(delivered) and continue_training

    def _collect(self) -> list:
        return [] if self.schedule is None else [d.result for d in self.schedule.collect()]

    def _handle_all(self, results: list) -> bool:
        continue_training = True
        for result in results:
            continue_training = self._handle(result) and continue_training
        return continue_training

    def _sync_normalization(self) -> None:
        # SB3's own check: the eval env must be wrapped as the training env is.
        if self.model.get_vec_normalize_env() is not None:
            try:
                _sync_normalization(self.training_env, self.eval_env)
            except AttributeError as e:
                raise AssertionError(
                    "Training and eval env are not wrapped the same way, "
                    "see https://stable-baselines3.readthedocs.io/en/master/guide/callbacks.html#evalcallback "
                    "and warning above."
                ) from e

    def _monitor_wrapped(self) -> bool:
        return bool(
            is_vecenv_wrapped(self.eval_env, VecMonitor) or self.eval_env.env_is_wrapped(Monitor)[0]
        )

    def _trigger(self) -> list:
        step = int(self.num_timesteps)
        weights = actor_weights(self.model.policy, self._parts)
        kept = self._keep(weights)
        started = self.schedule.triggered
        waited = self.schedule.trigger(step, weights)
        if self.schedule.triggered > started:
            self._kept[step] = kept
        return [d.result for d in waited]

    def _evaluate_now(self) -> list:
        step = int(self.num_timesteps)
        weights = actor_weights(self.model.policy, self._parts)
        self._kept[step] = self._keep(weights)
        return [d.result for d in self.schedule.evaluate(step, weights)]

    def _keep(self, weights: dict) -> tuple[dict, bytes | None]:
        """What a best model needs of this evaluation: the policy's state, VecNormalize."""
        if self.best_model_save_path is None:
            return {}, None
        state = {
            k.removeprefix("policy."): v.detach().to("cpu", copy=True)
            for k, v in weights.items()
            if k.startswith("policy.")
        }
        vec_normalize = self._parts.vec_normalize
        return state, None if vec_normalize is None else pickle.dumps(vec_normalize)

    # -- results, as SB3 handles them ---------------------------------------------------

    def _handle(self, result) -> bool:
        """What SB3's ``EvalCallback`` does with an evaluation's episodes."""
        continue_training = True
        step = int(result["eval/step"])
        episodes = result.episodes
        episode_rewards = episodes.returns.tolist()
        episode_lengths = episodes.lengths.tolist()
        successes = episodes.infos.get(SUCCESS_KEY)
        self._is_success_buffer = (
            [] if successes is None else [bool(s) for s in successes if not np.isnan(s)]
        )
        self.last_result = result
        self.results.append(result)
        kept = self._kept.pop(step, ({}, None))

        if self.log_path is not None:
            self.evaluations_timesteps.append(step)
            self.evaluations_results.append(episode_rewards)
            self.evaluations_length.append(episode_lengths)
            kwargs = {}
            if len(self._is_success_buffer) > 0:
                self.evaluations_successes.append(self._is_success_buffer)
                kwargs = dict(successes=self.evaluations_successes)
            np.savez(
                self.log_path,
                timesteps=self.evaluations_timesteps,
                results=self.evaluations_results,
                ep_lengths=self.evaluations_length,
                **kwargs,
            )

        mean_reward, std_reward = np.mean(episode_rewards), np.std(episode_rewards)
        mean_ep_length, std_ep_length = np.mean(episode_lengths), np.std(episode_lengths)
        self.last_mean_reward = float(mean_reward)
        if self.verbose >= 1:
            late = (
                f" (read at num_timesteps={self.num_timesteps})"
                if step != self.num_timesteps
                else ""
            )
            print(
                f"Eval num_timesteps={step}, episode_reward={mean_reward:.2f} +/- {std_reward:.2f}{late}"
            )
            print(f"Episode length: {mean_ep_length:.2f} +/- {std_ep_length:.2f}")
        self.logger.record("eval/mean_reward", float(mean_reward))
        self.logger.record("eval/mean_ep_length", mean_ep_length)
        self.logger.record("eval/mean_reward_ci_low", float(result["eval/reward_ci_low"]))
        self.logger.record("eval/mean_reward_ci_high", float(result["eval/reward_ci_high"]))
        if len(self._is_success_buffer) > 0:
            success_rate = np.mean(self._is_success_buffer)
            if self.verbose >= 1:
                print(f"Success rate: {100 * success_rate:.2f}%")
            self.logger.record("eval/success_rate", success_rate)
        # dumped at the timestep of the weights evaluated
        self.logger.record("time/total_timesteps", step, exclude="tensorboard")
        self.logger.dump(step)

        best_value = self.best_criterion.value(result)
        if best_value > self.best_mean_reward:
            if self.verbose >= 1:
                print("New best mean reward!")
            if self.best_model_save_path is not None:
                self._save_best(result, *kept)
            self.best_mean_reward = float(best_value)
            self.best_result = dict(result)
            if self.callback_on_new_best is not None:
                continue_training = self.callback_on_new_best.on_step()
        if self.callback is not None:
            continue_training = continue_training and self._on_event()
        return continue_training

    def _save_best(self, result, policy_state: dict, vec_normalize: bytes | None) -> None:
        """``best_model.zip`` with the weights evaluated, their ``VecNormalize`` and result."""
        path = os.path.join(self.best_model_save_path, "best_model")
        policy = self.model.policy
        current = None
        if policy_state:
            current = {k: v.detach().clone() for k, v in policy.state_dict().items()}
            policy.load_state_dict(policy_state)
        try:
            self.model.save(path)
        finally:
            if current is not None:
                policy.load_state_dict(current)
        if vec_normalize is not None:
            _write_atomically(
                os.path.join(self.best_model_save_path, "vecnormalize.pkl"), vec_normalize
            )
        summary = {
            "step": int(result["eval/step"]),
            "best_by": self.best_criterion.key,
            "value": float(self.best_criterion.value(result)),
            "seed": self.seed,
            "n_eval_episodes": self.n_eval_episodes,
            "result": {k: _plain(v) for k, v in result.items()},
        }
        _write_atomically(
            os.path.join(self.best_model_save_path, "best_model.json"),
            json.dumps(summary, indent=1).encode(),
        )


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and not np.isfinite(value) else value
