"""The throughput benchmark runs end to end (``--quick``) and prints its tables.

A smoke test: it checks the output's shape, never a speed (CI machines are
shared and noisy; the benchmark itself is run by hand, see docs/performance.md).
"""

from __future__ import annotations

import subprocess
import sys

from tests.procs import ROOT, end_session, start

TITLES = (
    "Pendulum-v1: 16 episodes",
    "CartPole-v1: 16 episodes",
    "Scaling, Pendulum-v1",
    "trigger_eval(weights=policy), 1,006,001-parameter policy: median",
    "Object store per evaluation",
    "Cold start, Pendulum-v1",
)
ROWS = (
    "ray_eval, 2 workers, gymnasium id",
    "TorchRL Evaluator, thread backend",
    "raw loop, 1 process (SyncVectorEnv x64)",
    "raw loop, 2 processes (x32 each)",  # harness.RawLoopInProcesses, the 2-core ceiling
)


def test_quick_benchmark_prints_its_tables(tmp_path):
    # Typically 30-50 s on 2 cores; the limit leaves room for a loaded machine.
    script = ROOT / "benchmarks" / "throughput.py"
    proc = start(
        [sys.executable, str(script), "--quick", "--results", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        end_session(proc.pid)  # its Ray instance, whatever happened
    assert proc.returncode == 0, err[-3000:]
    for text in TITLES + ROWS:
        assert text in out, f"{text!r} missing from the output:\n{out}"
    header = next(line for line in out.splitlines() if "runner" in line)
    assert header.split()[:5] == ["runner", "steps/s", "best", "run", "vs"]
    # one put per evaluation: 2 workers read one object of the weights' size, not a copy each
    assert "one object per evaluation for 2 workers: True" in out
    store_row = next(line for line in out.split("Object store per evaluation")[1].splitlines()
                     if line.split()[:2] == ["2", "1"])  # fmt: skip
    assert int(store_row.split()[2].replace(",", "")) >= 1_006_001 * 4
    assert (tmp_path / "throughput_quick.png").stat().st_size > 0
    assert (tmp_path / "throughput_quick.json").exists()
    assert f"plot: {tmp_path / 'throughput_quick.png'}" in out
