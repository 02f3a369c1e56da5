"""``ray-eval`` as the evaluation side of a training run: it reads torchrl.checkpoint
checkpoints, keeps the best, stops on a condition with a marker file, and the plot
marks the best. In-process evaluations (``workers.num_workers=0``): quick."""

from __future__ import annotations

import json

import gymnasium as gym
import torch
from torchrl.checkpoint import Checkpoint

from ray_eval.factories import MLPPolicy
from ray_eval.integrations import load_best
from ray_eval.results.plotting import best_points
from ray_eval.results.results_file import read_results
from tests.test_cli import PENDULUM, QUICK, pendulum_weights, run_cli

STEPS = (0, 100, 200, 300)


def _write_checkpoints(directory) -> dict[int, dict]:
    directory.mkdir()
    weights = {step: pendulum_weights(0.4 * k, seed=k) for k, step in enumerate(STEPS)}
    for step, state in weights.items():
        torch.save(state, directory / f"policy_step_{step}.pt")
    return weights


def test_run_reads_torchrl_checkpoints(capsys, tmp_path):
    """A TorchRL checkpoint directory (step from its rotation name) and archive (step from
    its manifest) give the numbers of the same weights saved as a .pt."""
    policy = MLPPolicy((64, 64))(gym.make("Pendulum-v1"))
    policy.load_state_dict(pendulum_weights(0.5))
    Checkpoint(policy=policy).save(tmp_path / "checkpoint-000000000500")
    Checkpoint(policy=policy, format="archive").save(
        tmp_path / "trainer.torchrl", metadata={"collected_frames": 700}
    )
    torch.save(policy.state_dict(), tmp_path / "policy_step_500.pt")
    out = tmp_path / "r.jsonl"
    for name in ("checkpoint-000000000500", "trainer.torchrl", "policy_step_500.pt"):
        code, _, err = run_cli(
            capsys, "run", PENDULUM, "--checkpoint", tmp_path / name, "--output", out, *QUICK
        )
        assert code == 0, err
    records = read_results(out)
    assert [r["step"] for r in records] == [500, 700, 500]
    rewards = [r["metrics"]["eval/reward"] for r in records]
    assert rewards[0] == rewards[2]
    Checkpoint(critic=policy).save(tmp_path / "no-policy-000000000001")
    code, _, err = run_cli(
        capsys, "run", PENDULUM, "--checkpoint", tmp_path / "no-policy-000000000001", *QUICK
    )
    assert code == 3 and "has no component 'policy'" in err and "['critic']" in err


def test_watch_keeps_the_best_stops_on_a_condition_and_says_so(capsys, tmp_path):
    checkpoints = tmp_path / "ckpt"
    weights = _write_checkpoints(checkpoints)
    watch = ["watch", PENDULUM, "--checkpoint-dir", checkpoints, "--poll-interval", "0.05"]
    watch += ["--settle", "0", "--idle-timeout", "0.5", *QUICK]
    code, _, err = run_cli(capsys, *watch, "--output", tmp_path / "all.jsonl")
    assert code == 0, err
    everything = {
        r["step"]: r["metrics"]["eval/reward"] for r in read_results(tmp_path / "all.jsonl")
    }
    assert sorted(everything) == list(STEPS)
    threshold = sorted(everything.values())[-2]  # met by the two best
    stop_at = next(step for step in STEPS if everything[step] >= threshold)

    out, best_dir = tmp_path / "r.jsonl", tmp_path / "best"
    args = [*watch, "--output", out, "--keep-best", best_dir, "--best-by", "reward"]
    args += ["--stop-when", f"eval/reward >= {threshold!r}"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    written = [r["step"] for r in read_results(out)]
    assert written == [s for s in STEPS if s <= stop_at], "nothing is evaluated after the stop"
    marker = json.loads((checkpoints / "ray_eval_stop.json").read_text())
    assert marker["step"] == stop_at and marker["checkpoint"].endswith(f"policy_step_{stop_at}.pt")
    best_step = max(written, key=lambda s: (everything[s], -s))
    best = load_best(best_dir)
    assert best.step == best_step and best.value == everything[best_step]
    assert best.source.endswith(f"policy_step_{best_step}.pt")
    assert all(torch.equal(best.weights[k], v) for k, v in weights[best_step].items())
    assert "best checkpoint" in stdout and f"policy_step_{best_step}.pt" in stdout

    # The best checkpoint, read back by `ray-eval run`, gives the same number.
    code, _, err = run_cli(
        capsys,
        "run",
        PENDULUM,
        "--checkpoint",
        best.path,
        "--output",
        tmp_path / "again.jsonl",
        *QUICK,
    )
    assert code == 0, err
    again = read_results(tmp_path / "again.jsonl")[0]
    assert again["step"] == best_step and again["metrics"]["eval/reward"] == best.value

    # Restarted after the stop: the condition is met by the results already there.
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert [r["step"] for r in read_results(out)] == written


def test_watch_rejects_a_bad_condition(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "watch", PENDULUM, "--checkpoint-dir", tmp_path, "--stop-when", "reward is high"
    )
    assert code == 2 and "must look like 'METRIC OP NUMBER'" in err


def test_plot_marks_the_best_checkpoint(capsys, tmp_path):
    records = [
        {
            "config": "c",
            "env": "e",
            "step": s,
            "metrics": {"eval/reward": r, "eval/reward_ci_low": lo},
        }
        for s, r, lo in [(0, 1.0, 0.5), (10, 3.0, 0.2), (20, 2.0, 1.5)]
    ]
    assert best_points(records, "reward", "reward_ci_low") == {"c (e)": (20, 2.0)}
    assert best_points(records, "reward", "reward") == {"c (e)": (10, 3.0)}
    assert best_points(records, "reward", "reward", "min") == {"c (e)": (0, 1.0)}
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    for best_by in ("reward_ci_low", "none"):
        png = tmp_path / f"{best_by}.png"
        code, _, err = run_cli(capsys, "plot", results, "-o", png, "--best-by", best_by)
        assert code == 0, err
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
