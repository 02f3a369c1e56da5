"""The public façade: TorchRL's ``Evaluator`` API over a pool of Ray actors.

Usage is in the docs (``docs/``). This module checks and delegates: ``options`` checks the
arguments, a backend (``ray_backend`` or ``local_backend``) runs evaluations,
``delivery`` hands results back in request order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from tensordict import TensorDict, TensorDictBase
from torch import nn
from torchrl.envs.utils import ExplorationType

from ray_eval.backend_choice import start_backend
from ray_eval.backends import ray_session
from ray_eval.backends.local_backend import LocalBackend
from ray_eval.delivery import Delivery, Publisher, Request
from ray_eval.env_input import EnvLike
from ray_eval.errors import BUSY_MESSAGE, EvaluatorBusyError
from ray_eval.options import BACKENDS, build_configs, check_arguments, check_step, env_factories
from ray_eval.planning import EvalRequest
from ray_eval.results.episodes import EpisodeData
from ray_eval.results.metrics import EvalResult
from ray_eval.torchrl_args import check_torchrl_arguments
from ray_eval.weights import WeightsLike, payloads

log = logging.getLogger("ray_eval")


class Evaluator:
    """Evaluates a policy on a pool of Ray worker actors, in the background or blocking.

    ``env``: a gymnasium id, an env factory, a live gymnasium or TorchRL env, or a
    dict ``{name: env}`` (a suite). ``policy`` (a TensorDict module, an
    ``nn.Module`` or a callable) is shipped to the workers, or ``policy_factory``
    builds it in each one. ``num_workers=0`` runs in-process. Every argument, with
    TorchRL's own, is described in the docs pages "The Evaluator's arguments" and
    "Coming from TorchRL".
    """

    def __init__(
        self,
        env: EnvLike | Mapping[str, EnvLike],
        policy: Any = None,
        *,
        policy_factory: Callable[..., Any] | None = None,
        num_workers: int | None = None,
        num_trajectories: int = 10,
        max_steps: int | None = None,
        seed: int = 0,
        busy_policy: str = "error",
        on_result: Callable[[TensorDictBase], Any] | None = None,
        log_prefix: str = "eval",
        backend: str = "ray",
        exploration_type: ExplorationType = ExplorationType.DETERMINISTIC,
        envs_per_worker: int | None = None,
        num_cpus_per_worker: float = 1,
        num_gpus_per_worker: float = 0,
        resources_per_worker: dict[str, float] | None = None,
        actor_options: dict[str, Any] | None = None,
        max_restarts: int = 3,
        placement: str | None = None,
        timeout: float | None = None,
        startup_timeout: float = 60.0,
        wait_for_workers: bool = True,
        device: str | None = None,
        info_keys: tuple[str, ...] = (),
        metrics_fn: Callable[[EpisodeData], dict] | None = None,
        record_video: int = 0,
        video_dir: str | os.PathLike | None = None,
        video_format: str = "mp4",
        video_fps: int = 30,
        video_logger: Any = None,
        fast_path: bool = True,
        max_unread_results: int | None = 100,
        episode_metrics_fn: Callable[[EpisodeData], dict] | None = None,
        # TorchRL's own arguments (see torchrl_args and the docs' "Coming from TorchRL"):
        dump_video: bool = True,
        reward_keys: Any = None,
        done_keys: Any = None,
        frames_per_batch: int | None = None,
        collector_kwargs: dict[str, Any] | None = None,
        episode_sampling: str = "per_env",
        init_fn: Callable[[], Any] | None = None,
        num_gpus: float | None = None,
        ray_kwargs: dict[str, Any] | None = None,
        collector_cls: Any = None,
        weight_sync_schemes: Any = None,
    ) -> None:
        args = locals()
        check_arguments(args)
        check_torchrl_arguments(args)
        factories = env_factories(env, render=record_video > 0)
        use_ray = BACKENDS[backend] == "ray" and num_workers != 0
        worker_config, plan = build_configs(args, factories, use_ray=use_ray)
        self._busy_policy = busy_policy
        self._submit_lock = threading.Lock()  # numbering, step counter and submission
        self._step_counter = 0
        self._seq = 0
        self._closed = False
        self._backend = start_backend(args, factories, worker_config, plan, use_ray=use_ray)
        self._use_ray = use_ray
        if wait_for_workers:
            self._check_started()  # start-up errors are raised here, by the constructor
        # Env parts' states from weights_dict persist until given again; every request
        # carries them all, so that any worker computes its numbers from the request alone.
        self._env_state: dict | None = None
        publish = Publisher.from_args(args)
        self._delivery = Delivery(self._backend, publish, max_unread=max_unread_results)
        ray_session.close_at_exit(self)

    @property
    def num_workers(self) -> int:
        """The number of Ray workers (0 in-process); waits for the workers to start."""
        return len(self._backend.workers) if self._use_ray else 0

    def _check_started(self) -> None:
        """Wait for the workers to start (at once if they have), raising what stopped them."""
        if not hasattr(self, "_param_spec"):
            first = self._backend.workers[0]
            self._param_spec, self._env_parts = first.param_spec, first.env_parts

    # -- requests ------------------------------------------------------------------

    def evaluate(
        self,
        weights: WeightsLike | None = None,
        step: int | None = None,
        *,
        weights_dict: Mapping[str, WeightsLike] | None = None,
    ) -> dict:
        """Run one evaluation and return its metrics (blocking).

        ``weights_dict`` is TorchRL's ``{model id: weights}``: ``"policy"`` (what
        ``weights`` fills when absent) and env parts such as ``"env.transform[0]"``.
        While async evaluations are pending this waits for its turn (requests
        run in order), or raises under ``busy_policy="error"``.
        """
        return self._delivery.outcome(self._request(weights, weights_dict, step, sync=True))

    def trigger_eval(
        self,
        weights: WeightsLike | None = None,
        step: int | None = None,
        *,
        weights_dict: Mapping[str, WeightsLike] | None = None,
    ):
        """Start an evaluation in the background and return its handle at once.

        Returns a ``ray.ObjectRef`` resolving to the same dict ``poll``/``wait``
        give (a ``concurrent.futures.Future`` in-process), or ``None`` when the
        request was skipped (``busy_policy="skip"``). The weights are copied
        before this returns: the trainer may change them right away.

        In-process, a policy that uses torch's global random generator or
        TorchRL's exploration type (both process-wide) is evaluated before this
        returns, while the caller waits: see the README's "In-process" notes.
        """
        request = self._request(weights, weights_dict, step, sync=False)
        if request is None:
            return None
        if self._backend.waits_for_caller:
            self._backend.ready([request.handle], None)
        return request.handle

    def _request(self, weights, weights_dict, step, *, sync: bool) -> Request | None:
        with self._submit_lock:
            if self._closed:
                raise RuntimeError("this Evaluator was shut down; create a new one")
            if sync:
                self._delivery.check_can_wait()
            if self._delivery.busy and self._busy_policy == "error":
                raise EvaluatorBusyError(BUSY_MESSAGE)
            if self._delivery.busy and self._busy_policy == "skip" and not sync:
                return None
            self._check_started()
            copy = isinstance(self._backend, LocalBackend)
            payload, env_update = payloads(
                weights, weights_dict, self._param_spec, self._env_parts, copy=copy
            )
            env_state = self._env_state
            if env_update:  # a new dict: a request already sent keeps the state it had
                env_state = {**(self._env_state or {}), **env_update}
            counted = step is None  # only a step the evaluator picked advances its counter
            step = self._step_counter if counted else check_step(step)
            # Under "latest" only a request that has to wait may be replaced: one accepted
            # while nothing is pending starts at once, however late its worker picks it up.
            replaceable = self._busy_policy == "latest" and not sync and self._delivery.busy
            request = EvalRequest(seq=self._seq, step=step, replaceable=replaceable)
            handle = self._backend.submit(request, payload, env_state)
            self._env_state = env_state
            self._seq += 1
            self._step_counter += counted
            delivered = Request(handle, request.seq, step, sync)
            self._delivery.add(delivered)
            return delivered

    # -- results -------------------------------------------------------------------

    def poll(self, timeout: float = 0) -> dict | None:
        """The oldest unread async result, or ``None`` if none arrives within ``timeout`` s."""
        return self._delivery.next_unread(timeout)

    def wait(self, timeout: float | None = None) -> dict | None:
        """The oldest unread async result, waiting up to ``timeout`` s (``None``: nothing pending)."""
        return self._delivery.next_unread(timeout)

    @property
    def pending(self) -> bool:
        """True while an evaluation is requested and its result not yet delivered."""
        return self._delivery.busy

    @property
    def last_result(self) -> EvalResult | None:
        """The latest finished evaluation's result, read or not yet, or ``None``."""
        return self._delivery.last_result

    @property
    def last_episodes(self) -> EpisodeData | None:
        """Per-episode returns, lengths and seeds of the latest result."""
        return None if self.last_result is None else self.last_result.episodes

    @property
    def dropped_results(self) -> int:
        """Unread async results dropped to keep at most ``max_unread_results``."""
        return self._delivery.dropped

    # -- lifecycle and state -------------------------------------------------------------

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers; pending and unread results are dropped. Idempotent.

        Every handle still pending settles: an in-process ``Future`` is cancelled,
        a ``ray.ObjectRef`` is cancelled (``TaskCancelledError``; ``RayActorError``
        if the pool's end comes first), and an ``evaluate`` waiting in another
        thread raises.
        """
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
        pending = self._delivery.close()
        self._backend.shutdown(timeout, [request.handle for request in pending])
        self._delivery.join(min(timeout, 2.0))

    def _abandon(self) -> None:
        """Stop without waiting or starting anything: for finalizers and interpreter exit."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        pending = self._delivery.close()
        self._backend.abandon([request.handle for request in pending])

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._abandon()

    @property
    def actor_ids(self) -> list[str]:
        """Ray ids of the pool actor and its workers (empty in-process)."""
        return list(self._backend.actor_ids)

    @property
    def workers(self):
        """What each worker reported at start-up (pid, node, device, rollout loop)."""
        return list(self._backend.workers)

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable progress: the step counter (unread results are not state)."""
        with self._submit_lock:
            return {"step_counter": self._step_counter}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()``: the next evaluation without a ``step`` continues
        the saved step counter."""
        with self._submit_lock:
            self._step_counter = check_step(state_dict.get("step_counter", 0))

    @staticmethod
    def extract_weights(policy: nn.Module) -> TensorDictBase:
        """Detached CPU copy of a module's weights (TorchRL's helper)."""
        return TensorDict.from_module(policy).data.detach().clone().cpu()
