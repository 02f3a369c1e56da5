"""``ray job submit -- ray-eval run ...`` against a real Ray head started by this test.

The head runs as ``ray start --head --block`` in a session of its own, on free
local ports and its own temp dir; the test stops it (and only it) by pid and
checks that none of its processes is left. Ray 2.60 turns on token auth for
the dashboard, so the submitting client runs with ``RAY_AUTH_MODE=token``.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ray_eval.results import read_results
from tests.procs import BIN, ROOT, end_session, env_for_subprocess, session_pids, start

# What the job does not need from the repository (runtime_env excludes, gitignore syntax).
EXCLUDES = [
    ".venv",
    ".git",
    "outputs",
    "benchmarks/results",
    "**/__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "build",
    "dist",
]


def free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class RayHead:
    """``ray start --head --block`` on free ports, in its own session and temp dir."""

    def __init__(self, temp_dir: Path, log: Path) -> None:
        gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env, node, objects = free_ports(
            9
        )
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        self.log = log
        self.proc = start(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={gcs}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--metrics-export-port={metrics}",
                f"--runtime-env-agent-port={runtime_env}",
                f"--node-manager-port={node}",
                f"--object-manager-port={objects}",
                f"--temp-dir={temp_dir}",
                "--num-cpus=2",
                "--include-dashboard=true",
                "--disable-usage-stats",
            ],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text():
            assert self.proc.poll() is None, f"ray start failed:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"ray start timed out:\n{self.log.read_text()[-3000:]}"
            )
            time.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM to ``ray start`` (it stops what it started), then end any straggler by pid."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        end_session(self.proc.pid)
        assert not session_pids(self.proc.pid)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    # A short temp dir: Ray's socket paths must stay under the 107-character limit.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayev-", dir="/tmp"))
    head = RayHead(temp_dir, tmp_path_factory.mktemp("head") / "head.log")
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def test_ray_job_submit_runs_the_pendulum_config(ray_head, tmp_path):
    output = tmp_path / "results.jsonl"
    submit = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            ray_head.dashboard,
            "--working-dir",
            str(ROOT),
            "--runtime-env-json",
            json.dumps({"excludes": EXCLUDES}),
            "--",
            "ray-eval",
            "run",
            "configs/pendulum.yaml",
            "--output",
            str(output),
            "num_trajectories=4",
            "max_steps=50",
            "workers.num_workers=2",
            "loggers=[]",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env=env_for_subprocess(RAY_AUTH_MODE="token"),
    )
    logs = submit.stdout + submit.stderr
    assert submit.returncode == 0, logs[-4000:]
    assert "succeeded" in logs
    assert "reward (mean ± std)" in logs  # the summary table, in the job's logs
    (record,) = read_results(output)
    assert record["config"] == "pendulum" and record["env"] == "Pendulum-v1"
    assert record["checkpoint"] is None and record["step"] == 0
    assert record["num_workers"] == 2
    assert record["cluster"] == {"nodes": 1, "cpus": 2.0, "gpus": 0}
    metrics = record["metrics"]
    assert metrics["eval/num_episodes"] == 4 and metrics["eval/episode_length"] == 50
    assert metrics["eval/reward_ci_low"] <= metrics["eval/reward"] <= metrics["eval/reward_ci_high"]


FAILING_JOB = """
import ray
from ray_eval import Evaluator


def main():
    ray.init()  # the job's cluster
    evaluator = Evaluator("Pendulum-v1", policy_factory=lambda: (lambda obs: obs[:, :1]),
                          num_workers=2, num_trajectories=4, max_steps=20)
    print("evaluated", evaluator.evaluate()["eval/num_episodes"], flush=True)
    evaluator.trigger_eval()  # still pending when the job dies
    raise ValueError("the job's own bug")


if __name__ == "__main__":
    main()
"""


def test_a_job_that_raises_with_a_live_evaluator_fails_instead_of_hanging(ray_head, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "failing_job.py").write_text(FAILING_JOB)
    started = time.monotonic()
    submit = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            ray_head.dashboard,
            "--working-dir",
            str(job_dir),
            "--",
            "python",
            "failing_job.py",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env=env_for_subprocess(RAY_AUTH_MODE="token"),
    )
    elapsed = time.monotonic() - started
    logs = submit.stdout + submit.stderr
    assert submit.returncode != 0, logs[-4000:]
    assert "evaluated 4" in logs, logs[-4000:]
    assert "ValueError: the job's own bug" in logs and "failed" in logs.lower(), logs[-4000:]
    print(f"\n[failing job] reported failed {elapsed:.1f} s after submission")
