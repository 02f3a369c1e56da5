"""``ray-eval watch``: evaluate each checkpoint of a directory once, in step order, resumably.

The results file is the only state. At start the watcher reads which
checkpoints it already holds for this config (by config hash and path) and
skips them, so a restarted watcher (after a crash, or a resubmitted job)
neither re-evaluates nor duplicates a line; a checkpoint whose evaluation was
cut off has no line yet and is evaluated again, with the same seeds.

A checkpoint is evaluated once it has been quiet (no size or mtime change)
for ``settle`` seconds and it loads; a half-written one is waited for. One that
stays unreadable, unchanged, for ``unreadable_timeout`` seconds is corrupt and
stops the watch. Checkpoints are taken strictly in step order: a later one
waits for an earlier one still being written.

As the evaluation side of a training run: ``keep_best`` saves the best
checkpoint's weights (and env parts) with ``KeepBest``, resuming from the
best already there; ``stop_when`` (``"eval/reward_ci_low >= 450"``) ends the
watch once a result meets it, after writing ``stop_file`` (JSON: the reason,
the checkpoint, its step) for the trainer to poll. The results already in the
output count: a restarted watcher that finds the condition met stops at once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ray_eval.integrations.best import KeepBest
from ray_eval.integrations.criteria import DEFAULT_METRIC
from ray_eval.integrations.stopping import StopOnThreshold
from ray_eval.jobs.checkpoints import (
    Checkpoint,
    CheckpointError,
    WithEnvParts,
    find_checkpoints,
    quiet_for,
    signature,
)
from ray_eval.jobs.runner import EvalJob
from ray_eval.results.results_file import append_result, read_results

log = logging.getLogger("ray_eval")
STOP_FILE = "ray_eval_stop.json"


@dataclass
class WatchOptions:
    checkpoint_dir: Path
    output: Path
    poll_interval: float = 5.0
    settle: float = 1.0
    max_checkpoints: int | None = None  # stop once this many of the directory's are in the output
    until_step: int | None = None  # stop once a checkpoint at or past this step is in the output
    idle_timeout: float | None = None  # stop after this long with nothing new to evaluate
    unreadable_timeout: float = 60.0
    keep_best: Path | None = None  # save the best checkpoint here (KeepBest)
    best_by: str = DEFAULT_METRIC  # the metric that decides "best" (keep_best, the summary)
    best_mode: str = "max"
    stop_when: str | None = None  # "eval/reward_ci_low >= 450": stop once a result meets it
    stop_file: Path | None = None  # written when stop_when is met (default: in checkpoint_dir)

    @property
    def stop_marker(self) -> Path:
        return self.stop_file or self.checkpoint_dir / STOP_FILE


@dataclass
class _Unreadable:
    signature: tuple
    since: float
    reason: str


class Watcher:
    """Polls a checkpoint directory and appends one result line per checkpoint."""

    def __init__(self, job: EvalJob, options: WatchOptions) -> None:
        self.job = job
        self.options = options
        self.directory = options.checkpoint_dir.resolve()
        self.done: dict[str, int | None] = {}  # checkpoint path -> step, for this config
        self.written: list[dict] = []  # records appended by this run
        self._unreadable: dict[Path, _Unreadable] = {}
        self._warned: set[Path] = set()
        prefix = job.config.log_prefix
        self.keep_best = (
            KeepBest(
                options.keep_best,
                options.best_by,
                mode=options.best_mode,
                prefix=prefix,
                resume=True,
            )
            if options.keep_best is not None
            else None
        )
        self.stopper = (
            StopOnThreshold.parse(options.stop_when, prefix=prefix) if options.stop_when else None
        )
        self.stop_record: dict | None = None
        self.records: list[dict] = []  # this config's records of this directory, old and new
        for record in read_results(options.output):
            if record.get("config_hash") == job.config_hash and record.get("checkpoint"):
                self.done[record["checkpoint"]] = record.get("step")
                if Path(record["checkpoint"]).parent == self.directory:
                    self.records.append(record)
        for record in sorted(self.records, key=lambda r: r.get("step") or 0):
            self._check_stop(record)  # met by a previous run: stop at once

    def finished(self) -> bool:
        """Whether a stop condition (``max_checkpoints``, ``until_step``, ``stop_when``) is met."""
        if self.stop_record is not None:
            return True
        mine = {p: s for p, s in self.done.items() if Path(p).parent == self.directory}
        if self.options.max_checkpoints is not None and len(mine) >= self.options.max_checkpoints:
            return True
        until = self.options.until_step
        return until is not None and any(s is not None and s >= until for s in mine.values())

    def run(self) -> list[dict]:
        """Watch until the stop condition, the idle timeout, or an error; the new records."""
        opts = self.options
        already = sum(1 for p in self.done if Path(p).parent == self.directory)
        log.info(
            "watching %s -> %s (%d checkpoint(s) of it already in the output)",
            self.directory,
            opts.output,
            already,
        )
        last_progress = time.monotonic()
        while not self.finished():
            if self._scan_once():
                last_progress = time.monotonic()
                continue
            if (
                opts.idle_timeout is not None
                and time.monotonic() - last_progress > opts.idle_timeout
            ):
                log.info("no new checkpoint for %.0f s: stopping", opts.idle_timeout)
                break
            time.sleep(opts.poll_interval)
        else:
            log.info("stop condition reached: %d checkpoint(s) done", len(self.done))
        return self.written

    def _scan_once(self) -> bool:
        """Evaluate every ready checkpoint in step order; True if one was evaluated."""
        if not self.directory.is_dir():
            if self.directory not in self._warned:
                log.info("waiting for %s to appear", self.directory)
                self._warned.add(self.directory)
            return False
        found, stepless = find_checkpoints(self.directory)
        for path in stepless:
            if path not in self._warned:
                log.warning(
                    "skipping %s: no step in its name (e.g. policy_step_1000.pt) or in %s.json",
                    path.name,
                    path.name,
                )
                self._warned.add(path)
        progressed = False
        for checkpoint in found:
            if str(checkpoint.path) in self.done:
                continue
            weights = self._ready(checkpoint)
            if weights is None:
                break  # strict step order: later checkpoints wait for this one
            record = self.job.evaluate(checkpoint.path, step=checkpoint.step, weights=weights)
            if append_result(self.options.output, record):
                self.written.append(record)
                self.records.append(record)
                self._keep_if_best(record, weights)
                self._check_stop(record)
            self.done[str(checkpoint.path)] = checkpoint.step
            progressed = True
            if self.finished():
                break
        return progressed

    def _keep_if_best(self, record: dict, weights: Any) -> None:
        if self.keep_best is None or not self.keep_best.is_better(record["metrics"]):
            return
        env_parts = None
        if isinstance(weights, WithEnvParts):
            weights, env_parts = weights.policy, weights.env_parts
        self.keep_best.update(
            record["metrics"], weights, weights_dict=env_parts, source=record["checkpoint"]
        )

    def _check_stop(self, record: dict) -> None:
        if self.stopper is None or self.stop_record is not None:
            return
        if not self.stopper.update(record["metrics"]):
            return
        self.stop_record = record
        marker = self.options.stop_marker
        data = {
            "reason": self.stopper.reason,
            "condition": str(self.stopper),
            "checkpoint": record.get("checkpoint"),
            "step": record.get("step"),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f".{marker.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, marker)
        log.info("stop condition met: %s; wrote %s", self.stopper.reason, marker)

    def best_record(self) -> dict | None:
        """The best of this config's records for the directory, by ``best_by``."""
        key = f"{self.job.config.log_prefix}/{self.options.best_by.split('/')[-1]}"
        scored = [r for r in self.records if isinstance(r["metrics"].get(key), int | float)]
        if not scored:
            return None
        pick = max if self.options.best_mode == "max" else min
        return pick(scored, key=lambda r: (r["metrics"][key], -(r.get("step") or 0)))

    def _ready(self, checkpoint: Checkpoint):
        """The checkpoint's weights if it is complete, ``None`` while it is being written."""
        sig = signature(checkpoint.path)
        if not sig or quiet_for(sig) < self.options.settle:
            return None
        try:
            weights, _ = self.job.load(checkpoint.path)
        except CheckpointError as error:
            return self._still_unreadable(checkpoint.path, sig, str(error))
        self._unreadable.pop(checkpoint.path, None)
        return weights

    def _still_unreadable(self, path: Path, sig: tuple, reason: str) -> None:
        seen = self._unreadable.get(path)
        now = time.monotonic()
        if seen is None or seen.signature != sig:
            log.info("%s is not readable yet (still being written?): %s", path.name, reason)
            self._unreadable[path] = _Unreadable(sig, now, reason)
            return None
        if now - seen.since > self.options.unreadable_timeout:
            raise CheckpointError(
                f"{reason} (unchanged and unreadable for {self.options.unreadable_timeout:g} s)"
            )
        return None
