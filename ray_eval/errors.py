"""Exceptions raised by ray_eval.

Every failure an evaluation can meet has its own type, so a training loop can
catch exactly what it can recover from (e.g. retry after ``EvaluationTimeout``,
but stop on ``EnvError``).
"""

from __future__ import annotations


class RayEvalError(RuntimeError):
    """Base class of every error ray_eval raises about an evaluation."""


class EvaluatorBusyError(RayEvalError):
    """``trigger_eval``/``evaluate`` was called while an evaluation was pending
    under ``busy_policy="error"``. Its message is TorchRL 0.14's, word for word
    (``BUSY_MESSAGE``), so code that matches on TorchRL's text keeps working."""


# torchrl/collectors/_evaluator.py, Evaluator.trigger_eval, TorchRL 0.14.1.
BUSY_MESSAGE = (
    "Evaluation already pending. Wait for completion or set "
    "busy_policy='skip' or busy_policy='queue'."
)


class EnvError(RayEvalError):
    """The environment (or the policy) raised while an episode was running.

    Carries the original exception's type name, message and formatted
    traceback, and the seed of the episode, so the failure can be replayed
    in-process with ``backend="local"``.
    """

    def __init__(
        self,
        message: str,
        *,
        exc_type: str = "",
        exc_message: str = "",
        remote_traceback: str = "",
        seed: int | None = None,
        member: str | None = None,
    ) -> None:
        super().__init__(message)
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.remote_traceback = remote_traceback
        self.seed = seed
        self.member = member

    def __reduce__(self):
        return (
            _rebuild_env_error,
            (
                self.args[0],
                self.exc_type,
                self.exc_message,
                self.remote_traceback,
                self.seed,
                self.member,
            ),
        )


def _rebuild_env_error(message, exc_type, exc_message, remote_traceback, seed, member):
    return EnvError(
        message,
        exc_type=exc_type,
        exc_message=exc_message,
        remote_traceback=remote_traceback,
        seed=seed,
        member=member,
    )


class WorkerStartupError(RayEvalError):
    """A worker could not build its env or policy (raised at construction)."""


class WorkerDiedError(RayEvalError):
    """A worker process died more often than ``max_restarts`` allows (or could
    not be restarted). ``worker`` is its index in the pool, ``cause`` Ray's
    account of the death (exit type and detail)."""

    def __init__(self, message: str, *, worker: int | None = None, cause: str = "") -> None:
        super().__init__(message)
        self.worker = worker
        self.cause = cause

    def __reduce__(self):
        return (_rebuild_worker_died, (self.args[0], self.worker, self.cause))


def _rebuild_worker_died(message, worker, cause):
    return WorkerDiedError(message, worker=worker, cause=cause)


class EvaluationTimeout(RayEvalError, TimeoutError):
    """An evaluation ran longer than the evaluator's ``timeout`` (evaluation time: the
    workers' (re)starts count against ``startup_timeout``). ``.step``: the request's step."""


class ResourceUnavailableError(RayEvalError):
    """The cluster cannot host the requested workers (e.g. GPUs on a CPU-only
    cluster, or more CPUs than it has)."""


class ActionMismatchError(RayEvalError, TypeError):
    """The policy's actions do not fit the env's action space (raised at construction)."""


class WeightsMismatchError(ValueError):
    """Weights whose keys or shapes do not fit the policy."""


def remote_cause(error: BaseException) -> BaseException:
    """The exception a worker or the pool raised, without Ray's ``RayTaskError`` wrapper."""
    from ray.exceptions import RayTaskError

    cause = getattr(error, "cause", None)
    if isinstance(error, RayTaskError) and isinstance(cause, BaseException):
        return cause
    return error


def one_line(error: BaseException) -> str:
    """The first line of an error's message (its type name if it has none)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class EvaluationCancelled(RayEvalError):
    """An evaluation's handle was cancelled (``ray.cancel(ref)``); its result is dropped."""
