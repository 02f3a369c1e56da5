"""A training loop's side of evaluation: when to evaluate, and what each result does.

``EvalSchedule`` wraps an ``Evaluator``. Call ``step(step, weights)`` once per
training iteration: it starts an evaluation every ``every`` steps (in the
background), reads the results that arrived, and hands each, in order, to
the pieces given: ``keep_best`` (a ``KeepBest``), ``stop`` (stoppers) and
``record`` (an ``EpisodeRecord``). ``should_stop`` then tells the trainer.

How late a decision arrives. A result is about the weights of its step ``s``;
the trainer sees it at a later step, ``seen_at``:

* ``when_busy="wait"`` (default): before starting the next evaluation (at step
  ``s + every`` or the first call past it), the schedule waits for the
  pending one. So the decision on the weights of step ``s`` reaches the trainer
  by the first ``step()`` call at or past ``s + every`` (at most ``every``
  steps late, 0 evaluations started after those weights), and sooner when the
  evaluation is quicker than ``every`` steps of training. Training pauses
  only when an evaluation takes longer than ``every`` steps of training.
* ``when_busy="skip"``: training never waits; an evaluation point that finds
  one pending is skipped. The decision arrives one evaluation's duration
  late, however many steps that is.

Each delivered result is kept in ``history`` with the step it was seen at.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ray_eval.integrations.best import KeepBest, states_of
from ray_eval.integrations.criteria import result_step
from ray_eval.integrations.record import EpisodeRecord

log = logging.getLogger("ray_eval")
WHEN_BUSY = ("wait", "skip")


@dataclass
class Delivered:
    """One result as the trainer saw it."""

    result: Any  # the EvalResult
    step: int  # the step of the weights it evaluated
    seen_at: int  # the training step at which the trainer read it
    new_best: bool

    @property
    def lag(self) -> int:
        """Training steps between the weights and the trainer reading their result."""
        return self.seen_at - self.step


class EvalSchedule:
    """Evaluate every ``every`` steps in the background; best, stop and record on results.

    ``stop``: one stopper or several (``StopOnThreshold``, ``StopOnNoImprovement``,
    anything with ``update(result) -> bool`` and ``reason``); training should
    stop once any says so. ``at_start``: evaluate at the first ``step()`` call
    too (the initial weights). ``prefix``: the evaluator's ``log_prefix``.
    """

    def __init__(
        self,
        evaluator,
        every: int,
        *,
        keep_best: KeepBest | None = None,
        stop: Any = None,
        record: EpisodeRecord | None = None,
        when_busy: str = "wait",
        at_start: bool = False,
        prefix: str = "eval",
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1 (training steps), got {every!r}")
        if when_busy not in WHEN_BUSY:
            raise ValueError(f"when_busy must be one of {WHEN_BUSY}, got {when_busy!r}")
        self.evaluator = evaluator
        self.every = every
        self.keep_best = keep_best
        self.stoppers = _as_list(stop)
        self.record = record
        self.when_busy = when_busy
        self.prefix = prefix
        self.next_due = 0 if at_start else every
        self.current_step = 0
        self.triggered = 0
        self.skipped = 0
        self.history: list[Delivered] = []
        self.should_stop = False
        self.stop_reason: str | None = None
        self.stop_step: int | None = None  # the step of the weights the decision is about
        self.stop_seen_at: int | None = None  # the training step at which it was read
        self._snapshots: deque[tuple[int, dict | None]] = deque()

    # -- the training loop's calls ---------------------------------------------------

    def step(
        self, step: int, weights: Any = None, *, weights_dict: Mapping[str, Any] | None = None
    ) -> list[Delivered]:
        """Once per training iteration: read what arrived, evaluate if due. Returns the
        results read by this call, in order."""
        self.current_step = int(step)
        delivered = self.collect()
        if step >= self.next_due:
            delivered += self.trigger(step, weights, weights_dict=weights_dict)
            self.next_due = (int(step) // self.every + 1) * self.every
        return delivered

    def trigger(
        self, step: int, weights: Any = None, *, weights_dict: Mapping[str, Any] | None = None
    ) -> list[Delivered]:
        """Start an evaluation of ``weights`` at ``step`` now (``when_busy`` applies).
        Returns the results handled first: those that had arrived, and under ``"wait"``
        those it waited for (whether an evaluation is still running or has just
        finished makes no difference to what a trainer sees)."""
        self.current_step = max(self.current_step, int(step))
        if self.should_stop:  # training is to stop: nothing more to evaluate
            return []
        delivered = self.collect()
        if self.evaluator.pending and not self.should_stop:
            if self.when_busy == "skip":
                self.skipped += 1
                return delivered
            delivered += self.drain()
        if self.should_stop:  # decided on what had arrived or was pending: nothing after it
            return delivered
        snapshot = states_of(weights, weights_dict) if self.keep_best is not None else None
        handle = self.evaluator.trigger_eval(weights, step=int(step), weights_dict=weights_dict)
        if handle is None:  # the evaluator's own busy_policy="skip"
            self.skipped += 1
        else:
            self.triggered += 1
            self._snapshots.append((int(step), snapshot))
        return delivered

    def evaluate(
        self, step: int, weights: Any = None, *, weights_dict: Mapping[str, Any] | None = None
    ) -> list[Delivered]:
        """Evaluate ``weights`` at ``step`` and wait for it: the pending results first, then
        this one (the last of the list)."""
        self.current_step = max(self.current_step, int(step))
        delivered = self.drain()
        result = self.evaluator.evaluate(weights, step=int(step), weights_dict=weights_dict)
        snapshot = states_of(weights, weights_dict) if self.keep_best is not None else None
        self.triggered += 1
        return [*delivered, self._deliver(result, snapshot)]

    def collect(self) -> list[Delivered]:
        """Every result that has arrived (without waiting)."""
        delivered = []
        while True:
            result = self.evaluator.poll(0)
            if result is None:
                return delivered
            delivered.append(self._deliver(result))

    def drain(self, timeout: float | None = None) -> list[Delivered]:
        """Wait for every pending evaluation (up to ``timeout`` s for each), and read every
        result that arrived: a finished one waits unread, no longer ``pending``."""
        delivered = []
        while True:
            result = self.evaluator.wait(timeout)  # the oldest unread first, if any
            if result is not None:
                delivered.append(self._deliver(result))
            elif not self.evaluator.pending or timeout is not None:
                return delivered
            # else a sync evaluate() of another thread is ahead: ours follow

    def finish(self, timeout: float | None = None) -> list[Delivered]:
        """At the end of training: wait for the pending evaluations and handle them."""
        return self.drain(timeout)

    # -- results ---------------------------------------------------------------------

    def _deliver(self, result, snapshot: dict | None = None) -> Delivered:
        step = result_step(result, self.prefix)
        if snapshot is None:
            snapshot = self._snapshot_for(step)
        seen_at = max(self.current_step, step)
        if self.record is not None:
            self.record.append(result, seen_at_step=seen_at)
        new_best = False
        if self.keep_best is not None and self.keep_best.is_better(result):
            if snapshot is None:
                log.warning("no weights kept for the result of step %d: best not saved", step)
            else:
                self.keep_best.save(result, snapshot)
                new_best = True
        for stopper in self.stoppers:
            if stopper.update(result) and not self.should_stop:
                self.should_stop = True
                self.stop_reason = stopper.reason
                self.stop_step = step
                self.stop_seen_at = seen_at
                log.info(
                    "stop: %s; seen at step %d (%d steps later)",
                    stopper.reason,
                    seen_at,
                    seen_at - step,
                )
        delivered = Delivered(result, step, seen_at, new_best)
        self.history.append(delivered)
        return delivered

    def _snapshot_for(self, step: int) -> dict | None:
        """The weights kept for the request of ``step``; older ones never delivered (replaced
        under ``busy_policy="latest"``) are dropped."""
        while self._snapshots:
            kept_step, snapshot = self._snapshots.popleft()
            if kept_step == step:
                return snapshot
        return None

    # -- state -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The next evaluation point, the stop decision, the evaluator's and the pieces'
        state: what a resumed run needs (results still pending are not in it)."""
        state: dict[str, Any] = {
            "next_due": self.next_due,
            "should_stop": self.should_stop,
            "stop_reason": self.stop_reason,
            "evaluator": self.evaluator.state_dict(),
        }
        if self.keep_best is not None:
            state["keep_best"] = self.keep_best.state_dict()
        for i, stopper in enumerate(self.stoppers):
            if hasattr(stopper, "state_dict"):
                state[f"stop_{i}"] = stopper.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` saved."""
        self.next_due = int(state.get("next_due", self.next_due))
        self.should_stop = bool(state.get("should_stop", False))
        self.stop_reason = state.get("stop_reason")
        if "evaluator" in state:
            self.evaluator.load_state_dict(state["evaluator"])
        if self.keep_best is not None and "keep_best" in state:
            self.keep_best.load_state_dict(state["keep_best"])
        for i, stopper in enumerate(self.stoppers):
            if f"stop_{i}" in state and hasattr(stopper, "load_state_dict"):
                stopper.load_state_dict(state[f"stop_{i}"])


def _as_list(stop: Any) -> list:
    if stop is None:
        return []
    if isinstance(stop, Iterable) and not isinstance(stop, str | Mapping):
        stoppers = list(stop)
    else:
        stoppers = [stop]
    for stopper in stoppers:
        if not callable(getattr(stopper, "update", None)):
            raise TypeError(
                f"stop must be stoppers with update(result) -> bool (StopOnThreshold, "
                f"StopOnNoImprovement), got {type(stopper).__name__}"
            )
    return stoppers
