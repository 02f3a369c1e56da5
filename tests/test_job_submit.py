"""``ray job submit -- ray-eval run ...`` against a real Ray head started by this test.

The head runs as ``ray start --head --block`` in a session of its own, on free
local ports and its own temp dir; the test stops it (and only it) by pid and
checks that none of its processes is left. Ray 2.60 turns on token auth for
the dashboard, so the submitting client runs with ``RAY_AUTH_MODE=token``.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ray_eval.results.results_file import read_results
from tests.procs import BIN, ROOT, RayHead, env_for_subprocess

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


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    # A short temp dir: Ray's socket paths must stay under the 107-character limit.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayev-", dir="/tmp"))
    head = RayHead(temp_dir)
    try:
        head.start(["--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1"])
        yield head
    finally:
        head.stop()


def submit_job(
    head: RayHead, cwd: Path, options: list[str], entrypoint: list[str]
) -> subprocess.CompletedProcess:
    """``ray job submit --address <head> <options> -- <entrypoint>``, waited for (bounded)."""
    return subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            head.dashboard,
            *options,
            "--",
            *entrypoint,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=cwd,
        env=env_for_subprocess(RAY_AUTH_MODE="token"),
    )


def test_ray_job_submit_runs_the_pendulum_config(ray_head, tmp_path):
    output = tmp_path / "results.jsonl"
    submit = submit_job(
        ray_head,
        tmp_path,
        ["--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"excludes": EXCLUDES})],
        [
            *("ray-eval", "run", "configs/pendulum.yaml", "--output", str(output)),
            *("num_trajectories=4", "max_steps=50", "workers.num_workers=2", "loggers=[]"),
        ],
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
    submit = submit_job(
        ray_head, tmp_path, ["--working-dir", str(job_dir)], ["python", "failing_job.py"]
    )
    elapsed = time.monotonic() - started
    logs = submit.stdout + submit.stderr
    assert submit.returncode != 0, logs[-4000:]
    assert "evaluated 4" in logs, logs[-4000:]
    assert "ValueError: the job's own bug" in logs and "failed" in logs.lower(), logs[-4000:]
    print(f"\n[failing job] reported failed {elapsed:.1f} s after submission")
