"""``ray-eval watch`` killed mid-way and restarted matches an uninterrupted run.

A watcher subprocess is killed with SIGKILL while it evaluates a checkpoint,
then restarted on real Ray (its own local instance, one worker); meanwhile
the last checkpoint is half-written on disk and is completed only after the
restarted watcher has had time to see it. The results must equal those of an
uninterrupted run line for line (the numbers depend only on the seeds and the
weights, not on where the episodes run), with no line lost or duplicated and
nothing evaluated twice.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from ray_eval.jobs.cli import main
from ray_eval.results.results_file import read_results
from tests.procs import ROOT, end_session, start
from tests.test_cli import pendulum_weights

# TorchRL's general rollout path (env + transforms) makes an evaluation last about a second:
# long enough for the kill to land in the middle of one.
CONFIG = str(ROOT / "configs" / "pendulum_torchrl.yaml")
STEPS = (0, 100, 200, 300)
OVERRIDES = ["policy.hidden_sizes=[16]", "num_trajectories=8"]
TIMING_KEYS = {"eval/fps", "eval/wall_time"}


class Watcher:
    """A ``ray-eval watch`` subprocess in its own session, its stderr collected line by line."""

    def __init__(self, checkpoints, output, num_workers: int) -> None:
        self.lines: list[str] = []
        self.proc = start(
            [
                sys.executable,
                "-m",
                "ray_eval",
                "watch",
                CONFIG,
                "--checkpoint-dir",
                str(checkpoints),
                "--output",
                str(output),
                "--poll-interval",
                "0.2",
                "--settle",
                "0.2",
                "--max-checkpoints",
                str(len(STEPS)),
                *OVERRIDES,
                f"workers.num_workers={num_workers}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())

    def wait_for(self, predicate, timeout: float = 150.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, "watcher exited early:\n" + "\n".join(self.lines[-30:])
            assert time.monotonic() < deadline, "timed out; watcher log:\n" + "\n".join(
                self.lines[-30:]
            )
            time.sleep(0.02)

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def kill(self) -> None:
        """SIGKILL the watcher, then end what it left behind (its local Ray) by pid."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        end_session(self.proc.pid)
        self._reader.join(timeout=10)

    def finish(self, timeout: float = 120.0) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=30)
            end_session(self.proc.pid)  # nothing may be left behind
            self._reader.join(timeout=10)
        return code


def comparable(records: list[dict]) -> list[tuple]:
    return [
        (
            r["checkpoint"].rsplit("/", 1)[-1],
            r["step"],
            r["config_hash"],
            {k: v for k, v in r["metrics"].items() if k not in TIMING_KEYS},
        )
        for r in records
    ]


def test_watch_resumes_after_a_kill_and_waits_for_half_written_checkpoints(tmp_path, capsys):
    weights = {
        step: pendulum_weights(scale=0.2 * i, seed=i, hidden=(16,)) for i, step in enumerate(STEPS)
    }
    reference_dir, live_dir = tmp_path / "reference", tmp_path / "live"
    reference_dir.mkdir()
    live_dir.mkdir()
    for step, w in weights.items():
        torch.save(w, reference_dir / f"policy_step_{step}.pt")
    for step in STEPS[:-1]:
        shutil.copy(reference_dir / f"policy_step_{step}.pt", live_dir)
    last = f"policy_step_{STEPS[-1]}.pt"
    full = (reference_dir / last).read_bytes()
    (live_dir / last).write_bytes(full[: len(full) // 2])  # a writer still at work

    # The uninterrupted run (in-process: quick, and the numbers do not depend on the workers).
    reference_out = tmp_path / "reference.jsonl"
    code = main(
        [
            "watch",
            CONFIG,
            "--checkpoint-dir",
            str(reference_dir),
            "--output",
            str(reference_out),
            "--settle",
            "0",
            "--poll-interval",
            "0.1",
            "--max-checkpoints",
            str(len(STEPS)),
            *OVERRIDES,
            "workers.num_workers=0",
        ]
    )
    assert code == 0, capsys.readouterr().err
    reference = read_results(reference_out)
    assert [r["step"] for r in reference] == list(STEPS)

    # Killed while it evaluates the second checkpoint (in-process: it starts quickly).
    output = tmp_path / "live.jsonl"
    first = Watcher(live_dir, output, num_workers=0)
    try:
        first.wait_for(lambda: first.logged("evaluating policy_step_100.pt"))
    finally:
        first.kill()
    after_kill = read_results(output)
    assert [r["step"] for r in after_kill] == [0]  # killed mid-evaluation of step 100
    assert output.read_bytes().endswith(b"\n")  # whole lines only

    # Restarted on Ray: resumes (the workers are not part of the config hash), and leaves
    # the half-written checkpoint alone until it is complete.
    second = Watcher(live_dir, output, num_workers=1)
    try:
        second.wait_for(lambda: len(read_results(output)) == 3)
        second.wait_for(lambda: second.logged(f"{last} is not readable yet"))
        time.sleep(1.0)  # several polls and settle times: still not evaluated
        assert len(read_results(output)) == 3
        with (live_dir / last).open("ab") as handle:  # the writer finishes
            handle.write(full[len(full) // 2 :])
        code = second.finish()
    finally:
        if second.proc.poll() is None:
            second.finish(timeout=1)
    assert code == 0, "\n".join(second.lines[-30:])

    results = read_results(output)
    assert len(output.read_text().splitlines()) == len(results) == len(STEPS)
    assert_same(results, reference)
    assert not second.logged("evaluating policy_step_0.pt")  # nothing evaluated twice
    assert second.logged("1 checkpoint(s) of it already in the output")
    assert [r["num_workers"] for r in results] == [0, 1, 1, 1]
    assert [r["cluster"]["nodes"] for r in results] == [0, 1, 1, 1]

    # The plot of this run: one line, four points.
    png = tmp_path / "curve.png"
    assert main(["plot", str(output), "-o", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def assert_same(results: list[dict], reference: list[dict]) -> None:
    """Same checkpoints, steps and config, in order; metrics equal up to float rounding."""
    for got, want in zip(comparable(results), comparable(reference), strict=True):
        assert got[:3] == want[:3]
        assert got[3].keys() == want[3].keys()
        for key, value in want[3].items():
            assert got[3][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
