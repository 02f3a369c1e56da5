"""The evaluation worker: env copies and a policy, built once, reused for every evaluation.

``EvalWorker`` is a plain class: the in-process backend uses it as it is, the
Ray backend runs ``RemoteWorker`` as an actor. Loading weights from the object
store is the only Ray-specific step, and it lives in the actor subclass.

This module imports torch, TorchRL and the envs only when a worker is built,
so the pool actor, which creates workers but runs no rollout, starts fast.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import ray

from ray_eval.errors import EnvError, WorkerStartupError
from ray_eval.planning import Chunk
from ray_eval.results.episodes import EpisodeBatch

ParamSpec = dict[str, tuple[tuple[int, ...], str]]


@dataclass
class WorkerConfig:
    """Everything a worker needs to build itself, but the policy."""

    env_factories: dict[str, Any]  # suite member -> env factory ("" for a single env)
    policy_factory: Any = None
    exploration_type: str = "DETERMINISTIC"  # a torchrl ExplorationType name
    envs_per_worker: int = 64
    # Env slots per suite member, which is the policy's batch: envs_per_worker, or
    # the member's episode count if smaller (see ``slots_for``).
    slots: dict[str, int] = field(default_factory=dict)
    # slots of a member found to be a native vector env when built (its factory returned
    # a gymnasium VectorEnv): what envs_per_worker gives vector envs
    vector_slots: int = 64
    max_steps: int | None = None
    fast_path: bool = True
    device: str | None = None  # None: the GPU Ray assigned, else the CPU
    info_keys: tuple[str, ...] = ()
    torch_threads: int | None = 1
    render: bool = False  # build envs that can render frames (video)
    init_fn: Any = None  # TorchRL's init_fn: called first thing in each worker process
    record_trajectories: bool = False  # keep every step of every episode (TorchRL's metrics_fn)
    reward_keys: Any = None  # TorchRL's reward_keys: what a return sums (TorchRL envs)
    done_keys: Any = None  # TorchRL's done_keys: what ends an episode (TorchRL envs)


@dataclass
class WorkerInfo:
    """What a started worker reports about itself."""

    pid: int
    node_id: str
    device: str
    param_spec: ParamSpec
    rollouts: dict[str, str] = field(default_factory=dict)  # member -> loop used
    dumps_video: bool = False  # some env has a video transform to dump after each evaluation
    env_parts: dict[str, Any] = field(default_factory=dict)  # member -> EnvParts (weights_dict)
    # member -> its batch, for members that are batched TorchRL envs (the plan cuts their
    # episodes as a native vector env's, with the env's own batch; see planning)
    batches: dict[str, int] = field(default_factory=dict)


class EvalWorker:
    """Builds env copies and the policy, loads weights, runs chunks of episodes.

    Construction never raises: a failure is kept and re-raised by ``describe``,
    so a broken env factory surfaces as a clear error rather than an actor that
    Ray keeps restarting.
    """

    def __init__(
        self, config: WorkerConfig | None, policy=None, *, failed: Exception | None = None
    ) -> None:
        self._config = config
        self._init_error: Exception | None = failed  # failed: what went wrong before the build
        self._loaded: object = None  # identity of the weights now in the policy
        self._targets: dict = {}
        self._initial: dict | None = None  # the built policy's weights, once overwritten
        self.weights_loads = 0  # weights payloads read into the policy (compared or copied)
        self.weights_loaded_bytes = 0  # bytes written into the policy's tensors
        self._env_state: dict | None = None  # env parts' states to load (weights_dict)
        self._env_state_in: set[int] = set()  # ids of the env copies that have it
        self.rollouts: dict = {}
        self._found_vector: set[str] = set()  # members found to be vector factories when built
        # The policy (or env) drew from torch's generator or read TorchRL's exploration
        # type in its first call: see process_state (what in-process evaluation may touch).
        self.touches_process_state = False
        if failed is not None:
            return
        try:
            self._build(config, policy)
        except Exception as error:
            self._init_error = _startup_error(error)

    def _build(self, config: WorkerConfig, policy) -> None:
        import torch
        from tensordict.nn import InteractionType as ExplorationType  # TorchRL's, the same

        from ray_eval.results.video import check_renders
        from ray_eval.rollout.adapters import build_env, check_action, make_rollout
        from ray_eval.rollout.env_parts import FrozenNormalization, freeze_normalization
        from ray_eval.rollout.policies import build_policy, prepare_policy
        from ray_eval.rollout.vector_sources import VectorEnvSpaces, is_vector_source
        from ray_eval.weights import module_params

        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self._exploration = ExplorationType[config.exploration_type]
        self.device = torch.device(config.device or _assigned_device())
        self.policy = None
        for member, factory in config.env_factories.items():
            env = build_env(factory)
            if not is_vector_source(factory) and isinstance(env, VectorEnvSpaces):
                self._found_vector.add(member)  # a vector factory, by what it returned
            freeze_normalization(env)  # evaluating never updates normalization statistics
            if self.policy is None:
                self.policy = prepare_policy(
                    build_policy(policy, config.policy_factory, env), self.device
                )
            rollout = make_rollout(
                FrozenNormalization(factory),
                env,
                self.policy,
                batch_size=config.vector_slots
                if member in self._found_vector
                else config.slots.get(member, config.envs_per_worker),
                max_steps=config.max_steps,
                device=self.device,
                fast_path=config.fast_path,
                info_keys=config.info_keys,
                record_trajectories=config.record_trajectories,
                reward_keys=config.reward_keys,
                done_keys=config.done_keys,
            )
            with torch.no_grad(), self._probing() as probe:
                check_action(rollout, member or _env_name(factory))
            self.touches_process_state |= probe.touched
            if config.render:
                check_renders(env, member or _env_name(factory))
            self.rollouts[member] = rollout
        if isinstance(self.policy, torch.nn.Module):
            self._targets = module_params(self.policy)

    def describe(self) -> WorkerInfo:
        from ray_eval.rollout.env_parts import video_dumpers

        if self._init_error is not None:
            raise self._init_error
        return WorkerInfo(
            pid=os.getpid(),
            node_id=_node_id(),
            device=str(self.device),
            param_spec={k: (tuple(v.shape), str(v.dtype)) for k, v in self._targets.items()},
            rollouts={m: type(r).__name__ for m, r in self.rollouts.items()},
            dumps_video=any(video_dumpers(e) for e in self._env_copies()),
            env_parts={member: _env_parts(r) for member, r in self.rollouts.items()},
            batches={
                member: r.batch_size
                for member, r in self.rollouts.items()
                if type(r).__name__ == "BatchedRollout" or member in self._found_vector
            },
        )

    def _env_copies(self) -> list:
        return [env for rollout in self.rollouts.values() for env in rollout._envs]

    def load_env_state(self, env_state: dict | None) -> None:
        """Load env parts' states (``weights_dict``) into every env copy, now and later.

        Every request carries the evaluator's current env state (``None``: it never
        had any), so a worker that is new, restarted or replaced computes the same
        numbers as one that saw every earlier request. The same state again loads
        nothing.
        """
        if env_state is not None and env_state is not self._env_state:
            self._env_state, self._env_state_in = env_state, set()

    def _apply_env_state(self) -> None:
        from ray_eval.weights import load_env_state

        if self._env_state is None:
            return
        for env in self._env_copies():
            if id(env) not in self._env_state_in:
                load_env_state(env, self._env_state)
                self._env_state_in.add(id(env))

    def dump_videos(self, step: int, members: list[str]) -> None:
        """After an evaluation: copy 0 of each member in ``members`` dumps its video
        at ``step``; every other copy drops what it buffered."""
        from ray_eval.rollout.env_parts import discard_videos, dump_videos

        for member, rollout in self.rollouts.items():
            for slot, env in enumerate(rollout._envs):
                if slot == 0 and member in members:
                    dump_videos(env, step)
                else:
                    discard_videos(env)

    def load_weights(self, payload: dict | None, identity: object = None) -> None:
        """Load ``payload`` (``None``: the weights the policy was built with).

        Nothing is read when the weights in the policy are these already: the
        same ``identity`` (an earlier chunk of this evaluation), or ``None``
        after ``None``. Otherwise only the bytes that differ are written
        (``weights_loaded_bytes`` counts them), so equal weights write nothing.
        """
        from ray_eval.weights import check_payload, load_payload

        if payload is None:
            if self._loaded is None:
                return  # the initial weights are in
            payload, identity = self._initial_payload(), None
        elif identity is not None and identity == self._loaded:
            return  # this evaluation's weights are already in (an earlier chunk)
        check_payload(payload, {k: (tuple(v.shape), "") for k, v in self._targets.items()})
        if self._loaded is None:
            self._keep_initial()  # before anything overwrites them
        self.weights_loaded_bytes += load_payload(self._targets, payload)
        self.weights_loads += 1
        self._loaded = identity

    def _keep_initial(self) -> None:
        """Keep the built policy's weights for ``weights=None``: a private copy
        in-process (``RemoteWorker`` keeps none in its own memory)."""
        if self._initial is None:
            self._initial = {k: v.detach().cpu().clone().numpy() for k, v in self._targets.items()}

    def _initial_payload(self) -> dict:
        return self._initial

    def run(self, chunk: Chunk) -> EpisodeBatch:
        import torch

        if self._init_error is not None:
            raise self._init_error
        if self._env_state is not None:
            rollout = self.rollouts[chunk.member]
            rollout._env_copies(rollout.copies_for(chunk))
            self._apply_env_state()
        with torch.no_grad(), self._chunk_state(chunk):
            return self.rollouts[chunk.member].run(chunk)

    def _probing(self):
        """Around the first policy call: the exploration type set, and a probe of
        what the call touched (``process_state.probed``)."""
        from ray_eval.backends.process_state import probed

        return probed(self._exploration)

    def _chunk_state(self, chunk: Chunk):
        """Around a chunk: a stochastic policy draws from torch's global generator,
        so it is seeded from the chunk, and the exploration type set; both restored
        after (``process_state.seeded``; the in-process worker overrides this)."""
        from ray_eval.backends.process_state import seeded

        return seeded(int(chunk.seeds[0]), self._exploration)

    def close(self) -> None:
        for rollout in self.rollouts.values():
            rollout.close()


class RemoteWorker(EvalWorker):
    """The Ray actor. Its config and policy arrive pickled, so that the pool
    actor can pass them on without importing what they are made of. They are
    asked from the pool, which keeps them: a restarted worker rebuilds from them."""

    def __init__(self, pool, index: int = 0) -> None:
        from ray_eval.memory import release_store_pages

        # Refs to the pickled config and policy: the pool keeps them for its whole
        # life, and weights=None reads the built policy's weights back from them.
        self._pool = pool
        self._index = index
        self._steps = 0  # policy calls of the chunks run so far (see _watch)
        self._chunk_running = False
        self._watcher: threading.Thread | None = None
        self._startup_refs = ray.get(pool.startup_args.remote())
        config_blob, policy_blob = ray.get(self._startup_refs)
        self._env_state_id = ""
        self._initial_ref: ray.ObjectRef | None = None  # the built weights, in the store
        self._from_blob = policy_blob is not None
        try:
            config = _unpickle(config_blob, "the env factories and functions")
            if config.init_fn is not None:
                config.init_fn()  # TorchRL's init_fn: before the env and policy are built
            policy = _unpickle(policy_blob, "the policy") if policy_blob is not None else None
        except Exception as error:
            # Kept for describe(), like a build error: a constructor that raises would
            # read as a dead actor, and Ray does not restart one whose constructor failed.
            super().__init__(None, failed=_startup_error(error))
            return
        finally:
            del config_blob, policy_blob
        super().__init__(config, policy)
        release_store_pages()  # the pages of the pickled policy, read above
        for rollout in self.rollouts.values():
            rollout._act = self._counted(rollout._act)

    def _counted(self, act):
        """``act``, counting its calls (the pool's sign of progress), and stopping the
        chunk between two steps once the pool cancelled it (``ray.cancel``, after a
        timeout: this worker is not stuck, so it is kept, and must be free soon)."""
        worker = ray._private.worker.global_worker

        def counted(obs):
            if worker.is_canceled:
                raise ChunkCancelled("the pool cancelled this chunk (its evaluation ended)")
            self._steps += 1
            return act(obs)

        return counted

    def _watch(self) -> None:
        """While a chunk runs, tell the pool every ``BEAT_SECONDS`` that it progresses
        (the policy was called since the last beat). A worker whose env or policy
        hangs stops beating; after a timeout, the pool replaces only such workers."""
        seen = -1
        while True:
            time.sleep(BEAT_SECONDS)
            steps = self._steps
            if self._chunk_running and steps != seen:
                seen = steps
                try:
                    self._pool.beat.remote(self._index)
                except Exception:
                    return  # the pool is gone: so is this worker, soon

    def load_weights(self, payload: dict | None, identity: object = None) -> None:
        from ray_eval.memory import release_heap, release_store_pages

        loads = self.weights_loads
        super().load_weights(payload, identity)
        if self.weights_loads != loads:
            release_store_pages()  # the weights object's pages just read
            if payload is None and self._from_blob:
                release_heap()  # what unpickling the policy again left in the C heap

    def _keep_initial(self) -> None:
        """No private copy. A factory-built policy's weights go to the object
        store before anything overwrites them; a policy that came pickled has
        them in the pool's copy already (see ``_initial_payload``)."""
        if not self._from_blob and self._initial_ref is None:
            self._put_initial({k: v.detach().cpu().numpy() for k, v in self._targets.items()})

    def _initial_payload(self) -> dict:
        from ray_eval.weights import to_payload

        if self._initial_ref is None and self._from_blob:
            # Every worker was built from the same pickled policy: the pool puts its
            # weights once for all of them (one object in the store, not one each).
            boxed = ray.get(self._pool.initial_weights.remote())
            if boxed is not None:
                (self._initial_ref,) = boxed
        if self._initial_ref is not None:
            return ray.get(self._initial_ref)
        # The first time weights=None follows other weights, where the pool could not
        # read the policy: unpickle it again here (about as long as building it), and
        # keep its weights in the object store, so that the next time costs a load only.
        payload = to_payload(pickle.loads(ray.get(self._startup_refs[1])), copy=False)
        self._put_initial(payload)
        return payload

    def _put_initial(self, payload: dict) -> None:
        from ray_eval.memory import release_store_pages

        self._initial_ref = ray.put(payload)
        release_store_pages()  # the pages just written: the store has them, not this worker

    def ping(self) -> tuple[int, str]:
        """(pid, node id): answers once the actor is up (e.g. after a restart)."""
        return os.getpid(), _node_id()

    def run_chunk(
        self, chunk: Chunk, boxed_weights: list | None, boxed_env_state: list | None = None
    ) -> EpisodeBatch:
        if self._init_error is not None:
            raise self._init_error
        # The ref arrives boxed in a list so that Ray does not fetch it for every
        # chunk: a worker fetches and loads an evaluation's weights only once.
        loads, loaded_bytes = self.weights_loads, self.weights_loaded_bytes
        if boxed_weights is None:
            self.load_weights(None)
        else:
            (ref,) = boxed_weights
            if ref.hex() != self._loaded:
                self.load_weights(ray.get(ref), identity=ref.hex())
        if boxed_env_state is not None:
            (ref,) = boxed_env_state
            if ref.hex() != self._env_state_id:
                self.load_env_state(ray.get(ref))
                self._env_state_id = ref.hex()
        if self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch, name="ray-eval-worker-beat", daemon=True
            )
            self._watcher.start()
        self._chunk_running = True
        try:
            batch = self.run(chunk)
        finally:
            self._chunk_running = False
        batch.weights_id = self._loaded or ""
        batch.weights_loads = self.weights_loads - loads
        batch.weights_loaded_bytes = self.weights_loaded_bytes - loaded_bytes
        return batch


# How often a worker running a chunk tells the pool it progresses (``RemoteWorker._watch``).
BEAT_SECONDS = 0.25


class ChunkCancelled(Exception):
    """A chunk the pool gave up on (its evaluation timed out or was cancelled)."""


def _assigned_device() -> str:
    import torch

    gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs, so the first is cuda:0.
    return "cuda:0" if gpus and torch.cuda.is_available() else "cpu"


def _node_id() -> str:
    if ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return "local"


def _env_parts(rollout):
    """What weights_dict may load into the env copies of ``rollout`` (``EnvParts``)."""
    from ray_eval.rollout.env_part_names import EnvParts
    from ray_eval.rollout.env_parts import env_parts_of

    loop = type(rollout).__name__
    if rollout._envs:
        return env_parts_of(rollout._envs[0], loop)
    spaces = getattr(rollout, "spaces", None)  # a native vector env: no per-slot copies
    return EnvParts(getattr(spaces, "name", "a native vector env"), loop, {})


def _env_name(factory) -> str:
    return str(getattr(factory, "env_id", None) or getattr(factory, "__qualname__", factory))


class _UnpicklingError(Exception):
    """What the worker was unpickling when it failed (``what``), and why (the cause)."""

    def __init__(self, what: str, cause: Exception) -> None:
        super().__init__(what)
        self.what, self.cause = what, cause


def _unpickle(blob: bytes, what: str):
    try:
        return pickle.loads(blob)
    except Exception as error:
        raise _UnpicklingError(what, error) from error


def _startup_error(error: Exception) -> Exception:
    cause = error.cause if isinstance(error, _UnpicklingError) else error
    if isinstance(cause, ImportError):
        wrapped = WorkerStartupError(_import_problem(cause, error))
    elif isinstance(error, EnvError | TypeError | ValueError):
        error.remote_traceback = "".join(traceback.format_exception(error))
        return error
    elif isinstance(error, _UnpicklingError):
        wrapped = WorkerStartupError(
            f"worker could not unpickle {error.what}: {type(cause).__name__}: {cause}"
        )
    else:
        wrapped = WorkerStartupError(
            f"worker could not build its env or policy: {type(error).__name__}: {error}"
        )
    wrapped.remote_traceback = "".join(traceback.format_exception(cause))
    return wrapped


def _import_problem(cause: ImportError, error: Exception) -> str:
    """The message for a module a worker cannot import: an import problem, not a crash."""
    module = getattr(cause, "name", None) or "?"
    doing = (
        f"unpickle {error.what}"
        if isinstance(error, _UnpicklingError)
        else "build its env or policy"
    )
    return (
        f"worker could not {doing}: module {module!r} cannot be imported on its node "
        f"({type(cause).__name__}: {cause}). This is an import problem, not a crash: "
        f"the worker was not restarted. ray_eval ships the modules of your code that are "
        f"not installed by value, except those that cannot be pickled by value (a warning "
        f"names them when the Evaluator is created); an installed module must be "
        f"installed on every node. Install {module!r} there, or ship it with "
        f"actor_options={{'runtime_env': {{'py_modules': [...]}}}}."
    )
