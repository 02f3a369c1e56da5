"""Results come back here: one queue of requests, one thread, in request order.

``Delivery`` owns every piece of state about requests between the façade and
the backend, in five fields behind one lock:

* ``_queue``: requests accepted and not yet taken by the thread, oldest first;
* ``_current``: the request the thread is waiting for or publishing;
* ``_unread``: async results (or errors) delivered and not yet read by
  ``poll``/``wait``, at most ``max_unread`` of them (the oldest is dropped,
  counted in ``dropped``, with one warning);
* ``_thread``: the delivery thread, alive while ``_queue`` is not empty;
* ``_closed``: set once by ``close``; nothing is delivered after it.

The thread takes the oldest request, waits for its handle, and hands its
outcome over: videos are written, ``on_result`` runs, and only then does the
result become visible, to ``poll``/``wait`` or to the ``evaluate`` call
waiting for it. So every result, sync or async, takes the same path, one at a
time, in request order, and ``poll(timeout)``/``wait(timeout)`` never wait
longer than asked (a slow ``on_result`` delays results, not the caller). A
request whose handle was cancelled is dropped: nothing is delivered for it.

The thread cannot lose a request: each one it takes is handed over in a
``finally``, with its result, or with whatever was raised while waiting for it,
so nothing the backend or a callback raises leaves an ``evaluate`` waiting or
the evaluator busy. An error delivered for a request carries its step
(``error.step``), so the caller of ``poll``/``wait`` knows whose error it is. While its result is being published (``on_result``), a
request no longer counts as pending: ``trigger_eval`` from ``on_result`` is
accepted under every ``busy_policy``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray_eval.errors import EvaluationCancelled
from ray_eval.results.metrics import EvalResult
from ray_eval.results.video import publish_videos

log = logging.getLogger("ray_eval")

_NOTHING = object()  # a replaced or cancelled request: nothing to deliver


class Publisher:
    """Hands a finished result to its consumers: video files/logger, then ``on_result``.

    Runs on the delivery thread, before the result is visible to anyone. A
    failure in either is logged with its traceback; the result is kept.
    """

    def __init__(self, on_result: Callable | None, prefix: str, video: dict) -> None:
        self._on_result = on_result
        self._prefix = prefix
        self._video = video  # publish_videos' directory, video_format, fps, logger

    @classmethod
    def from_args(cls, a: dict[str, Any]) -> Publisher:
        """From the Evaluator's arguments (``on_result``, ``log_prefix``, ``video_*``)."""
        video = {"directory": a["video_dir"], "video_format": a["video_format"]}
        video.update(fps=a["video_fps"], logger=a["video_logger"])
        return cls(a["on_result"], a["log_prefix"], video)

    def __call__(self, result: EvalResult) -> None:
        if result.episodes is not None and result.episodes.frames:
            try:
                result.videos = publish_videos(result, prefix=self._prefix, **self._video)
            except BaseException:
                log.exception("writing the evaluation's videos failed; the result is kept")
        if self._on_result is None:
            return
        try:
            import torch
            from tensordict import TensorDict

            # Every value is a plain number: results are checked where they are made.
            flat = TensorDict({k: torch.as_tensor(v) for k, v in result.items()}, batch_size=[])
            self._on_result(flat)
        except BaseException:  # whatever it raises, the result is delivered
            log.exception("on_result callback raised; the result is kept")


@dataclass(eq=False)
class Request:
    """An accepted request, until its outcome is delivered."""

    handle: Any  # ray.ObjectRef or concurrent.futures.Future
    seq: int
    step: int
    sync: bool  # an ``evaluate`` call is waiting for exactly this outcome
    outcome: Any = _NOTHING  # for a sync request: its result or error, once delivered
    delivered: threading.Event = field(default_factory=threading.Event)


class Delivery:
    """The request queue and the thread that delivers results in order.

    ``backend`` needs ``ready(handles, timeout)``, ``result(handle)`` and
    ``skip(seq)``; ``publish(result)`` writes videos and calls ``on_result``.
    """

    def __init__(
        self,
        backend: Any,
        publish: Callable[[EvalResult], None],
        *,
        max_unread: int | None = 100,
    ) -> None:
        self._backend = backend
        self._publish = publish
        self._max_unread = max_unread
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: deque[Request] = deque()
        self._current: Request | None = None
        self._publishing = False  # _current's result is being published: not pending
        self._unread: deque[EvalResult | BaseException] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.dropped = 0  # unread results dropped to keep at most max_unread
        self.last_result: EvalResult | None = None

    # -- the caller's side -------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while a request is accepted and its outcome not yet delivered.

        The request whose result is being published (``on_result`` runs) is
        done: it no longer counts.
        """
        with self._lock:
            return bool(self._queue) or (self._current is not None and not self._publishing)

    @property
    def unread(self) -> int:
        with self._lock:
            return len(self._unread)

    def add(self, request: Request) -> None:
        """Queue ``request`` for delivery (after every earlier one)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this Evaluator was shut down; create a new one")
            self._queue.append(request)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ray-eval-results", daemon=True
                )
                self._thread.start()

    def on_delivery_thread(self) -> bool:
        """True when called from the delivery thread (from ``on_result``)."""
        return threading.current_thread() is self._thread

    def check_can_wait(self) -> None:
        """Raise if the caller is the delivery thread (``on_result``): it would wait for itself."""
        if self.on_delivery_thread():
            raise RuntimeError(
                "evaluate() cannot be called from on_result (it would wait for itself); "
                "use trigger_eval() there"
            )

    def outcome(self, request: Request) -> EvalResult:
        """Block until the sync ``request`` is delivered; return its result or raise."""
        self.check_can_wait()
        while not request.delivered.wait(0.5):
            pass
        if isinstance(request.outcome, BaseException):
            raise request.outcome
        if request.outcome is _NOTHING:
            raise RuntimeError("this Evaluator was shut down while evaluate() was waiting")
        return request.outcome

    def next_unread(self, timeout: float | None) -> EvalResult | None:
        """The oldest unread async result, waiting up to ``timeout`` s for one.

        ``None`` when none arrives in time, or when none can arrive (no async
        request pending, or closed). A failed evaluation raises its error here.
        From ``on_result`` this never waits: the delivery thread, which would
        deliver what it waits for, is the one waiting.
        """
        if self.on_delivery_thread():
            timeout = 0
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not self._unread:
                if self._closed or not self._async_pending():
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._changed.wait(remaining if remaining is not None else 1.0)
            item = self._unread.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    def _async_pending(self) -> bool:
        current = self._current is not None and not self._current.sync
        return current or any(not r.sync for r in self._queue)

    def close(self) -> list[Request]:
        """Deliver nothing more; wake every waiter. Returns the requests left pending
        (their handles are the backend's to cancel), once: later calls return ``[]``."""
        with self._changed:
            if self._closed:
                return []
            self._closed = True
            pending = ([self._current] if self._current is not None else []) + list(self._queue)
            self._queue.clear()
            self._unread.clear()
            self._changed.notify_all()
        for request in pending:
            request.delivered.set()  # an evaluate() still waiting is told it was shut down
        return pending

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the delivery thread to end (after ``close``)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- the delivery thread --------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed or not self._queue:
                        self._thread = None  # with the check: add() starts a new one
                        return
                    head = self._current = self._queue.popleft()
                    self._publishing = False
                self._deliver(head)
        finally:  # an exit by exception still lets add() start a new thread
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _deliver(self, head: Request) -> None:
        """Wait for ``head``'s outcome and hand it over, whatever is raised on the way."""
        outcome: Any = _NOTHING
        try:
            outcome = self._outcome(head)
        except BaseException as error:  # the request's error, never the thread's end
            outcome = error
            with contextlib.suppress(Exception):
                error.step = head.step  # which request it belongs to (poll/wait raise it)
        finally:
            self._hand_over(head, outcome)

    def _outcome(self, head: Request) -> Any:
        """``head``'s result (published), its error raised, or ``_NOTHING``."""
        while not self._backend.ready([head.handle], 0.2):
            if self._closed:
                return _NOTHING
        try:
            item = self._backend.result(head.handle)
        except EvaluationCancelled:
            with contextlib.suppress(Exception):
                self._backend.skip(head.seq)  # in case it never reached the pool
            return _NOTHING
        if not isinstance(item, EvalResult):
            return _NOTHING  # None: replaced by a newer request (busy_policy="latest")
        with self._lock:
            self._publishing = True
        try:
            self._publish(item)  # videos, then on_result: before anyone sees it
        except BaseException:
            log.exception("publishing the result failed; the result is kept")
        return item

    def _hand_over(self, head: Request, item: Any) -> None:
        with self._changed:
            self._current, self._publishing = None, False
            if not self._closed:  # else close() told every waiter already
                self._deliver_locked(head, item)
            self._changed.notify_all()
        head.delivered.set()

    def _deliver_locked(self, head: Request, item: Any) -> None:
        if isinstance(item, EvalResult):
            self.last_result = item
        if head.sync:
            head.outcome = item
        elif item is not _NOTHING:
            self._unread.append(item)
            if self._max_unread is not None and len(self._unread) > self._max_unread:
                self._unread.popleft()
                self.dropped += 1
                if self.dropped == 1:
                    log.warning(
                        "more than %d async results were never read (poll/wait): the "
                        "oldest are dropped from now on (counted in "
                        "Evaluator.dropped_results; on_result still sees every one). "
                        "Pass max_unread_results=None to keep them all.",
                        self._max_unread,
                    )
