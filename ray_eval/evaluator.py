"""The public façade: TorchRL's ``Evaluator`` API over a pool of Ray actors.

Example::

    from functools import partial
    from torchrl.envs import GymEnv
    from ray_eval import Evaluator

    evaluator = Evaluator(partial(GymEnv, "Pendulum-v1"), policy, num_trajectories=16)
    print(evaluator.evaluate(weights=policy))      # blocking
    ref = evaluator.trigger_eval(weights=policy)   # a ray.ObjectRef; returns at once
    ...                                            # keep training
    result = evaluator.poll()                      # None until it is done
    evaluator.shutdown()
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ray
import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torchrl.envs.utils import ExplorationType

from ray_eval.backends import LocalBackend, RayBackend, ensure_ray
from ray_eval.envs import EnvLike, as_env_factory
from ray_eval.episodes import EpisodeData
from ray_eval.errors import EvaluatorBusyError
from ray_eval.metrics import EvalResult
from ray_eval.pickling import check_picklable
from ray_eval.pool import PLACEMENT_STRATEGIES, EvalRequest, PoolConfig
from ray_eval.video import VIDEO_FORMATS, publish_videos
from ray_eval.weights import WeightsLike, check_payload, to_payload
from ray_eval.worker import WorkerConfig

log = logging.getLogger("ray_eval")

BUSY_POLICIES = ("error", "skip", "queue", "latest")
# "process" and "thread" are TorchRL's names: every Ray worker is its own process,
# and the in-process backend runs on a background thread.
BACKENDS = {"ray": "ray", "process": "ray", "local": "local", "thread": "local"}


@dataclass
class _Pending:
    """An accepted async request, until its result is delivered."""

    handle: Any
    step: int


class Evaluator:
    """Evaluates a policy on a pool of Ray worker actors, in the background or blocking.

    Args:
        env: a gymnasium id, or a zero-argument callable returning a
            ``gymnasium.Env`` or a TorchRL ``EnvBase``. A dict ``{name: env}``
            makes an evaluation suite: every member is evaluated on the same
            pool, with per-member metrics under ``<prefix>/<name>/...``.
        policy: a TensorDict module, a plain ``nn.Module`` (observation tensor
            to action tensor) or a callable. Sent once to every worker.
        policy_factory: builds the policy inside each worker instead; called
            with the env if it has a required positional parameter.
        num_workers: worker actors; default: as many as the cluster has CPUs
            for (at least 1, at most ``num_trajectories``). ``0`` runs in-process.
        num_trajectories: episodes per evaluation (per suite member).
        max_steps: cut episodes at this many steps (default: the env's own end).
        seed: episode ``i`` of the evaluation at step ``s`` is reset with a seed
            derived from ``(seed, s, i)`` only, whatever the number of workers.
        busy_policy: what a request does while another is pending: ``"error"``
            raises, ``"skip"`` returns ``None``, ``"queue"`` runs every request
            in order, ``"latest"`` lets a newer request replace a waiting one.
        on_result: called with a flat TensorDict of the metrics after every
            evaluation (async ones from the evaluator's background thread); an
            exception in it is logged, not raised.
        log_prefix: prefix of the result keys.
        backend: ``"ray"`` (default; ``"process"`` is an alias) or ``"local"``
            (in-process, no Ray; ``"thread"`` is an alias).
        exploration_type: TorchRL exploration type during rollouts
            (default: deterministic).
        envs_per_worker: env copies each worker steps as one batch, with one
            policy call per step.
        num_cpus_per_worker, num_gpus_per_worker, resources_per_worker:
            Ray resources of each worker (fractional GPUs allowed). A worker
            with a GPU runs its policy there.
        actor_options: extra ``.options()`` for the worker actors
            (e.g. ``{"runtime_env": {...}}``).
        max_restarts: times a worker process may die and be restarted; its
            episodes are re-run with the same seeds.
        placement: ``None`` (Ray's default), ``"pack"``, ``"spread"``,
            ``"strict_pack"`` or ``"strict_spread"`` (a placement group).
        timeout: seconds an evaluation may take before it fails with
            ``EvaluationTimeout`` and its stuck workers are replaced.
        startup_timeout: seconds to wait for the workers to start before
            failing with ``ResourceUnavailableError``.
        info_keys: scalar ``info`` keys to average per episode
            (reported as ``<prefix>/info/<key>``); ``is_success`` is always read.
        metrics_fn: ``fn(EpisodeData) -> dict`` of extra scalars.
        record_video: record the first this-many episodes of each evaluation
            (per suite member) as RGB frames, on ``result.episodes.frames``.
        video_dir: write each recorded episode there as a video file
            (``video_format`` ``"mp4"`` or ``"gif"``, at ``video_fps``).
        video_logger: a TorchRL logger whose ``log_video`` gets the frames.
        fast_path: run a bare TorchRL ``GymEnv`` on the vectorized gymnasium
            loop (same numbers, about 10x faster).
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
        envs_per_worker: int = 64,
        num_cpus_per_worker: float = 1,
        num_gpus_per_worker: float = 0,
        resources_per_worker: dict[str, float] | None = None,
        actor_options: dict[str, Any] | None = None,
        max_restarts: int = 3,
        placement: str | None = None,
        timeout: float | None = None,
        startup_timeout: float = 60.0,
        device: str | None = None,
        info_keys: tuple[str, ...] = (),
        metrics_fn: Callable[[EpisodeData], dict] | None = None,
        record_video: int = 0,
        video_dir: str | os.PathLike | None = None,
        video_format: str = "mp4",
        video_fps: int = 30,
        video_logger: Any = None,
        fast_path: bool = True,
    ) -> None:
        _check_int("num_trajectories", num_trajectories, minimum=1)
        _check_int("envs_per_worker", envs_per_worker, minimum=1)
        _check_int("max_restarts", max_restarts, minimum=0)
        _check_int("seed", seed, minimum=None)
        if num_workers is not None:
            _check_int("num_workers", num_workers, minimum=0)
        if max_steps is not None:
            _check_int("max_steps", max_steps, minimum=1)
        if busy_policy not in BUSY_POLICIES:
            raise ValueError(f"busy_policy must be one of {BUSY_POLICIES}, got {busy_policy!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {backend!r}")
        if placement is not None and placement not in PLACEMENT_STRATEGIES:
            raise ValueError(
                f"placement must be None or one of {tuple(PLACEMENT_STRATEGIES)}, got {placement!r}"
            )
        if policy is not None and policy_factory is not None:
            raise ValueError("pass either policy or policy_factory, not both")
        if policy is None and policy_factory is None:
            raise ValueError(
                "a policy is needed: pass policy=... (a TensorDict module, an nn.Module or a "
                "callable) or policy_factory=... (built inside each worker)"
            )
        if policy_factory is not None and not callable(policy_factory):
            raise TypeError(f"policy_factory must be callable, got {type(policy_factory).__name__}")
        for name, value in (("timeout", timeout), ("startup_timeout", startup_timeout)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if num_cpus_per_worker < 0 or num_gpus_per_worker < 0:
            raise ValueError("num_cpus_per_worker and num_gpus_per_worker must be >= 0")
        _check_int("record_video", record_video, minimum=0)
        if video_format not in VIDEO_FORMATS:
            raise ValueError(f"video_format must be one of {VIDEO_FORMATS}, got {video_format!r}")
        if video_logger is not None and not callable(getattr(video_logger, "log_video", None)):
            raise TypeError("video_logger must have a log_video(name, video, step=...) method")
        if on_result is not None and not callable(on_result):
            raise TypeError(f"on_result must be callable, got {type(on_result).__name__}")

        is_suite = isinstance(env, Mapping)
        members = dict(env) if is_suite else {"": env}
        if not members:
            raise ValueError("env: an evaluation suite needs at least one member")
        factories = {}
        for name, member_env in members.items():
            if is_suite and (not isinstance(name, str) or not name or "/" in name):
                raise ValueError(
                    f"env: suite member names must be non-empty strings without '/', got {name!r}"
                )
            factories[name] = as_env_factory(
                member_env, render_mode="rgb_array" if record_video else None
            )

        self._log_prefix = log_prefix
        self._busy_policy = busy_policy
        self._on_result = on_result
        self._step_counter = 0
        self._seq = 0
        self._lock = threading.RLock()  # guards the request bookkeeping below
        self._delivered = threading.Condition(self._lock)
        self._pending: deque[_Pending] = deque()
        self._ready: deque[EvalResult | BaseException] = deque()
        self._sync_running = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._backend = None
        self.last_result: EvalResult | None = None

        backend = BACKENDS[backend] if num_workers != 0 else "local"
        worker_config = WorkerConfig(
            env_factories=factories,
            policy_factory=policy_factory,
            exploration_type=ExplorationType(exploration_type).name,
            envs_per_worker=envs_per_worker,
            max_steps=max_steps,
            fast_path=fast_path,
            device=device,
            info_keys=tuple(info_keys),
            render=record_video > 0,
            torch_threads=1 if backend == "ray" else None,
        )
        resources = {
            "CPU": num_cpus_per_worker,
            "GPU": num_gpus_per_worker,
            **(resources_per_worker or {}),
        }
        pool_config = PoolConfig(
            num_workers=1,
            worker_resources=resources,
            actor_options=dict(actor_options or {}),
            max_restarts=max_restarts,
            startup_timeout=startup_timeout,
            timeout=timeout,
            placement=placement,
            members={name: num_trajectories for name in factories},
            envs_per_worker=envs_per_worker,
            seed=seed,
            prefix=log_prefix,
            metrics_fn=metrics_fn,
            record_episodes=record_video,
        )
        self._video = {
            "directory": video_dir,
            "video_format": video_format,
            "fps": video_fps,
            "logger": video_logger,
        }
        if backend == "ray":
            for what, obj in (
                ("env", factories),
                ("policy", policy),
                ("policy_factory", policy_factory),
                ("metrics_fn", metrics_fn),
            ):
                check_picklable(obj, what)
            ensure_ray()
            pool_config.num_workers = num_workers or _default_num_workers(
                num_cpus_per_worker, num_trajectories * len(factories)
            )
            self._backend = RayBackend(pool_config, worker_config, policy)
        else:
            self._backend = LocalBackend(pool_config, worker_config, policy)
        self._param_spec = self._backend.workers[0].param_spec
        self.num_workers = len(self._backend.workers) if backend == "ray" else 0

    # -- the synchronous API ---------------------------------------------------

    def evaluate(self, weights: WeightsLike | None = None, step: int | None = None) -> dict:
        """Run one evaluation and return its metrics (blocking).

        While an async evaluation is pending this waits for its turn (requests
        run in order), or raises under ``busy_policy="error"``.
        """
        with self._lock:
            self._check_open()
            if self._busy_policy == "error":
                self._raise_if_busy()
            handle, step = self._submit(weights, step, replaceable=False)
            self._sync_running += 1
        try:
            result = self._backend.get(handle)
        finally:
            with self._lock:
                self._sync_running -= 1
        self.last_result = result
        self._publish(result)
        return result

    # -- the asynchronous API ----------------------------------------------------

    def trigger_eval(self, weights: WeightsLike | None = None, step: int | None = None):
        """Start an evaluation in the background and return its handle at once.

        Returns a ``ray.ObjectRef`` resolving to the same dict ``poll``/``wait``
        give (a ``concurrent.futures.Future`` in-process), or ``None`` when the
        request was skipped (``busy_policy="skip"``). The weights are copied
        before this returns: the trainer may change them right away.
        """
        with self._lock:
            self._check_open()
            if self.pending:
                if self._busy_policy == "error":
                    self._raise_if_busy()
                if self._busy_policy == "skip":
                    return None
            handle, step = self._submit(weights, step, replaceable=self._busy_policy == "latest")
            self._pending.append(_Pending(handle, step))
            self._start_delivery_thread()
        return handle

    def poll(self, timeout: float = 0) -> dict | None:
        """The oldest finished async result, or ``None`` if none is ready within ``timeout`` s."""
        return self._next_result(timeout)

    def wait(self, timeout: float | None = None) -> dict | None:
        """Block until the oldest pending async evaluation finishes and return its result."""
        return self._next_result(timeout)

    @property
    def pending(self) -> bool:
        """True while an evaluation is requested and not finished."""
        with self._lock:
            if self._sync_running:
                return True
            handles = [p.handle for p in self._pending]
        return len(self._backend.ready(handles, 0)) < len(handles) if handles else False

    # -- results -----------------------------------------------------------------

    @property
    def last_episodes(self) -> EpisodeData | None:
        """Per-episode returns, lengths and seeds of the latest result."""
        return None if self.last_result is None else self.last_result.episodes

    def _next_result(self, timeout: float | None) -> dict | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                head = self._pending[0].handle if not self._ready and self._pending else None
            # Wait on the handle itself (ray.wait), then for the delivery thread to
            # hand the result over, which follows within milliseconds.
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if head is not None and not self._backend.ready([head], remaining):
                return None
            with self._delivered:
                if head is not None:
                    self._delivered.wait_for(
                        lambda head=head: (
                            self._ready or head not in [p.handle for p in self._pending]
                        ),
                        timeout=30,
                    )
                if not self._ready:
                    if head is not None and self._pending and not self._closed:
                        continue  # the head was replaced ("latest"): wait for the next one
                    return None
                item = self._ready.popleft()
            if isinstance(item, BaseException):
                raise item
            return item

    def _start_delivery_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._deliver, name="ray-eval-results", daemon=True
            )
            self._thread.start()

    def _deliver(self) -> None:
        """Background thread: hands each finished async result over, in request order,
        and calls ``on_result`` even if nobody polls."""
        while True:
            with self._lock:
                if self._closed or not self._pending:
                    self._thread = None
                    return
                head = self._pending[0]
            if not self._backend.ready([head.handle], 0.1):
                continue
            try:
                item = self._backend.get(head.handle)
            except BaseException as error:  # delivered to poll/wait, which raise it
                item = error
            if isinstance(item, EvalResult):
                self.last_result = item
                self._publish(item)
            with self._delivered:
                if self._pending and self._pending[0] is head:
                    self._pending.popleft()
                if item is not None:  # None: replaced by a newer request ("latest")
                    self._ready.append(item)
                self._delivered.notify_all()

    def _publish(self, result: EvalResult) -> None:
        """Hand a finished result to its consumers: video files/logger, then ``on_result``."""
        if result.episodes is not None and result.episodes.frames:
            try:
                result.videos = publish_videos(result, prefix=self._log_prefix, **self._video)
            except Exception:
                log.exception("writing the evaluation's videos failed; the result is kept")
        if self._on_result is None:
            return
        try:
            self._on_result(
                TensorDict({k: torch.as_tensor(v) for k, v in result.items()}, batch_size=[])
            )
        except Exception:
            log.exception("on_result callback raised; the result is kept")

    # -- requests ------------------------------------------------------------------

    def _submit(self, weights, step, *, replaceable: bool):
        payload = None
        if weights is not None:
            payload = to_payload(weights, copy=isinstance(self._backend, LocalBackend))
            check_payload(payload, self._param_spec)
        if step is None:
            step = self._step_counter
            self._step_counter += 1
        elif not isinstance(step, int | torch.SymInt) or isinstance(step, bool):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        request = EvalRequest(seq=self._seq, step=int(step), weights=None, replaceable=replaceable)
        handle = self._backend.submit(request, payload)
        self._seq += 1
        return handle, step

    def _raise_if_busy(self) -> None:
        if self.pending:
            raise EvaluatorBusyError(
                "Evaluation already pending. Wait for completion or set busy_policy='queue'."
            )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Evaluator was shut down; create a new one")

    # -- lifecycle and state ----------------------------------------------------------

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers (pending evaluations are dropped). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pending.clear()
            self._delivered.notify_all()
            thread = self._thread
        if self._backend is not None:
            self._backend.shutdown(timeout)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            if not getattr(self, "_closed", True):
                self.shutdown(timeout=2.0)
        except Exception:
            pass

    @property
    def actor_ids(self) -> list[str]:
        """Ray ids of the pool actor and its workers (empty in-process)."""
        return list(self._backend.actor_ids)

    @property
    def workers(self):
        """What each worker reported at start-up (pid, node, device, rollout loop)."""
        return list(self._backend.workers)

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable progress: the step counter."""
        with self._lock:
            if self._pending or self._ready:
                raise RuntimeError("state_dict() needs no pending or unread evaluation results")
            return {"step_counter": self._step_counter}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        with self._lock:
            if self._pending or self._ready:
                raise RuntimeError(
                    "load_state_dict() needs no pending or unread evaluation results"
                )
            self._step_counter = int(state_dict.get("step_counter", 0))

    @staticmethod
    def extract_weights(policy: nn.Module) -> TensorDictBase:
        """Detached CPU copy of a module's weights (TorchRL's helper)."""
        return TensorDict.from_module(policy).data.detach().clone().cpu()


def _check_int(name: str, value, *, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _default_num_workers(cpus_per_worker: float, episodes: int) -> int:
    available = ray.available_resources().get("CPU", os.cpu_count() or 1)
    fit = int(available // cpus_per_worker) if cpus_per_worker > 0 else (os.cpu_count() or 1)
    return max(1, min(fit, episodes))
