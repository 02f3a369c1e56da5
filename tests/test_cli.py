"""The ``ray-eval`` command in-process: configs, checkpoints, results, loggers, plots.

These run evaluations in-process (``workers.num_workers=0``, the Evaluator's
no-Ray backend) on real envs, so they are quick; the Ray-backed command runs
in test_cli_watch.py and test_job_submit.py.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import gymnasium as gym
import pytest
import torch
from tensordict import TensorDict

from ray_eval.factories import MLPPolicy
from ray_eval.jobs.checkpoints import (
    CheckpointError,
    find_checkpoints,
    load_weights,
    step_of,
    write_metadata,
)
from ray_eval.jobs.cli import main
from ray_eval.jobs.config import ConfigError, load_config
from ray_eval.results.plotting import curves, plot_results
from ray_eval.results.results_file import append_result, read_results
from tests.procs import BIN, ROOT, env_for_subprocess

PENDULUM = str(ROOT / "configs" / "pendulum.yaml")
QUICK = ["workers.num_workers=0", "num_trajectories=3", "max_steps=50", "loggers=[]"]
TIMING_KEYS = {"eval/fps", "eval/wall_time"}


def pendulum_weights(scale: float = 0.0, seed: int = 1, hidden=(64, 64)) -> dict:
    """A state_dict for the configs' MLP on Pendulum, perturbed by ``scale``."""
    policy = MLPPolicy(tuple(hidden))(gym.make("Pendulum-v1"))
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=gen) for k, v in policy.state_dict().items()
    }


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("ray-eval: error:")]


# -- configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pendulum", "cartpole", "pendulum_torchrl"])
def test_shipped_configs_validate(name):
    config = load_config(ROOT / "configs" / f"{name}.yaml")
    assert config.name
    assert len(config.config_hash()) == 16
    # a registered gymnasium id, or a factory that survives pickling (the workers unpickle it)
    env = pickle.loads(pickle.dumps(config.env.build()))
    assert isinstance(env, str) or callable(env), env
    assert not isinstance(env, str) or env in gym.registry, env


def test_overrides_set_dotted_keys_with_yaml_types():
    config = load_config(
        PENDULUM,
        [
            "workers.num_workers=2",
            "policy.hidden_sizes=[8, 8]",
            "max_steps=null",
            "env.kwargs.g=9.81",
        ],
    )
    assert config.workers.num_workers == 2
    assert config.policy.hidden_sizes == [8, 8]
    assert config.max_steps is None
    assert config.env.kwargs == {"g": 9.81}


def test_config_hash_covers_what_decides_the_numbers():
    base = load_config(PENDULUM).config_hash()
    assert load_config(PENDULUM, ["workers.num_workers=7", "output=x.jsonl"]).config_hash() == base
    assert load_config(PENDULUM, ["seed=1"]).config_hash() != base
    assert load_config(PENDULUM, ["policy.hidden_sizes=[8]"]).config_hash() != base


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("num_trajectoris=4", "num_trajectoris: unknown key (did you mean 'num_trajectories'?)"),
        ("workers.num_cpu=2", "workers.num_cpu: unknown key (did you mean 'num_cpus'?)"),
        ("num_trajectories=many", "num_trajectories: Input should be a valid integer"),
        ("workers.num_cpus=lots", "workers.num_cpus: Input should be a valid number"),
        ("seed=true", "seed: Input should be a valid integer"),
        ("max_steps=0", "max_steps: Input should be greater than 0"),
        ("env.id=Pendulm-v1", "env.id: 'Pendulm-v1' is not a registered gymnasium id"),
        (
            "env=envpool:CartPol-v1",
            "env.id: env 'envpool:CartPol-v1': 'CartPol-v1' is not an EnvPool",
        ),
        (
            "env=vector:Pendulum-v1",
            "env.id: env 'vector:Pendulum-v1': gymnasium's 'Pendulum-v1' has no",
        ),
        ("policy.type=cnn", "policy.type must be 'mlp' or 'factory'"),
        ("loggers=[{type: csv, dir: x}]", "loggers[0].dir: unknown key (did you mean 'log_dir'?)"),
        ("policy=null", "policy: "),
    ],
)
def test_bad_config_fails_naming_the_key(capsys, override, expected):
    code, out, err = run_cli(capsys, "run", PENDULUM, override, *QUICK[:1])
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert expected in error_lines(err)[0]
    assert out == ""


def test_bad_config_files(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("env: {id: Pendulum-v1\nnum_trajectories: 2\n")
    factory = tmp_path / "factory.yaml"
    factory.write_text("env: {factory: 'no_such_module:make'}\n")
    missing_env = tmp_path / "noenv.yaml"
    missing_env.write_text("num_trajectories: 2\n")
    for path, expected in [
        (tmp_path / "nope.yaml", "config file not found"),
        (broken, "is not valid YAML (line"),
        (factory, "env.factory: cannot import 'no_such_module'"),
        (missing_env, "env: required key is missing"),
    ]:
        code, _, err = run_cli(capsys, "run", path)
        assert code == 2, err
        assert expected in error_lines(err)[0], err
    code, _, err = run_cli(capsys, "run", PENDULUM, "num_trajectories")
    assert code == 2 and "must look like key=value" in err
    with pytest.raises(ConfigError, match=r"'env\.id' is str, not a mapping"):
        load_config(PENDULUM, ["env.id.x=1"])


def test_bad_config_exit_code_from_the_console_script():
    out = subprocess.run(
        [str(BIN / "ray-eval"), "run", PENDULUM, "workers.num_cpus=-1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env_for_subprocess(),
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"ray-eval: error: bad config: {PENDULUM}: workers.num_cpus: "
        "Input should be greater than or equal to 0 (got -1)"
    ]


# -- checkpoints -------------------------------------------------------------------------


def test_step_from_name_or_metadata(tmp_path):
    assert step_of(tmp_path / "policy_step_1000.pt") == 1000
    assert step_of(tmp_path / "ckpt-step-7.pth") == 7
    assert step_of(tmp_path / "step42.pt") == 42
    assert step_of(tmp_path / "policy.pt") is None
    write_metadata(tmp_path / "policy.pt", 123)
    assert step_of(tmp_path / "policy.pt") == 123
    (tmp_path / "bad.pt.json").write_text('{"step": "x"}')
    with pytest.raises(CheckpointError, match="integer 'step'"):
        step_of(tmp_path / "bad.pt")


def test_find_checkpoints_in_step_order(tmp_path):
    weights = pendulum_weights()
    for name in [
        "p_step_20.pt",
        "p_step_3.pt",
        "p_step_100.pt",
        ".p_step_5.pt.tmp",
        "notes.txt",
        "p.pt",
    ]:
        torch.save(weights, tmp_path / name)
    TensorDict(weights).save(tmp_path / "td_step_50")
    found, stepless = find_checkpoints(tmp_path)
    assert [(c.name, c.step) for c in found] == [
        ("p_step_3.pt", 3),
        ("p_step_20.pt", 20),
        ("td_step_50", 50),
        ("p_step_100.pt", 100),
    ]
    assert [p.name for p in stepless] == ["p.pt"]


def test_load_weights_formats_and_errors(tmp_path):
    weights = pendulum_weights()
    torch.save({"policy": weights, "optimizer": {"lr": 0.1}, "step": 9}, tmp_path / "train.pt")
    loaded, step = load_weights(tmp_path / "train.pt", key="policy")
    assert step == 9 and set(loaded) == set(weights)
    with pytest.raises(CheckpointError, match=r"set checkpoint\.key"):
        load_weights(tmp_path / "train.pt")
    with pytest.raises(CheckpointError, match="has no entry 'actor'"):
        load_weights(tmp_path / "train.pt", key="actor")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="allow_pickle=true"):
        load_weights(tmp_path / "module.pt")
    assert isinstance(load_weights(tmp_path / "module.pt", allow_pickle=True)[0], torch.nn.Module)
    data = (tmp_path / "train.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        load_weights(tmp_path / "half.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        load_weights(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_weights(tmp_path / "absent.pt")


def test_run_evaluates_each_checkpoint_format_at_its_step(capsys, tmp_path):
    weights = pendulum_weights(scale=0.3)
    torch.save(weights, tmp_path / "policy_step_1000.pt")
    TensorDict(weights).save(tmp_path / "policy_td")
    write_metadata(tmp_path / "policy_td", 1000)
    module = MLPPolicy()(gym.make("Pendulum-v1"))
    module.load_state_dict(weights)
    torch.save(module, tmp_path / "policy_module_step_1000.pt")
    out_file = tmp_path / "results.jsonl"
    for checkpoint, extra in [
        (tmp_path / "policy_step_1000.pt", []),
        (tmp_path / "policy_td", []),
        (tmp_path / "policy_module_step_1000.pt", ["--allow-pickle"]),
        (None, []),
    ]:
        ckpt_args = ["--checkpoint", checkpoint] if checkpoint else []
        code, out, err = run_cli(
            capsys, "run", PENDULUM, *ckpt_args, "--output", out_file, *extra, *QUICK
        )
        assert code == 0, err
        assert "reward (mean ± std)" in out  # the summary table
        assert "INFO ray-eval: evaluating" in err and "\x1b[" not in err  # plain log lines, no TTY
    records = read_results(out_file)
    assert [r["step"] for r in records] == [1000, 1000, 1000, 0]
    assert records[0]["checkpoint"] == str(tmp_path / "policy_step_1000.pt")
    assert records[3]["checkpoint"] is None
    assert len({r["config_hash"] for r in records}) == 1
    for record in records:
        assert record["config"] == "pendulum" and record["env"] == "Pendulum-v1"
        assert record["cluster"] == {"nodes": 0, "cpus": 0, "gpus": 0}
        assert record["metrics"]["eval/num_episodes"] == 3
        assert record["metrics"]["eval/step"] == record["step"]
        assert record["time"].endswith("+00:00")
    same = [{k: v for k, v in r["metrics"].items() if k not in TIMING_KEYS} for r in records[:3]]
    assert same[0] == same[1] == same[2]  # one set of weights, three formats, same numbers
    assert records[3]["metrics"]["eval/reward"] != records[0]["metrics"]["eval/reward"]


@pytest.mark.parametrize(
    ("make", "args", "expected"),
    [
        (None, [], "checkpoint not found"),
        ("half", [], "is corrupt or incomplete"),
        ("module", [], "allow_pickle=true"),
        ("narrow", [], "'module.net.0.weight' has shape (8, 3), the policy expects (64, 3)"),
        ("shallow", [], "missing keys ['module.net.4.bias', 'module.net.4.weight']"),
    ],
)
def test_bad_checkpoint_exits_3_with_one_line(capsys, tmp_path, make, args, expected):
    path = tmp_path / "policy_step_5.pt"
    if make == "half":
        torch.save(pendulum_weights(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif make == "module":
        torch.save(MLPPolicy()(gym.make("Pendulum-v1")), path)
    elif make == "narrow":
        torch.save(pendulum_weights(hidden=(8, 64)), path)
    elif make == "shallow":
        torch.save(pendulum_weights(hidden=(64,)), path)
    code, out, err = run_cli(capsys, "run", PENDULUM, "--checkpoint", path, *args, *QUICK)
    assert code == 3, err
    lines = error_lines(err)
    assert len(lines) == 1 and expected in lines[0], err
    assert out == ""


class ExplodingPendulum(gym.Wrapper):
    """Pendulum whose step raises after a few steps: a real failure inside an episode."""

    def __init__(self, after: int = 3) -> None:
        super().__init__(gym.make("Pendulum-v1"))
        self._after, self._t = after, 0

    def reset(self, **kwargs):
        self._t = 0
        return self.env.reset(**kwargs)

    def step(self, action):
        self._t += 1
        if self._t > self._after:
            raise RuntimeError("the simulator crashed")
        return self.env.step(action)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            "{factory: 'tests.test_cli:ExplodingPendulum', kwargs: {after: 3}}",
            "evaluation of initial weights (step 0) failed: EnvError:",
        ),
        (
            "{factory: 'ray_eval.factories:gym_env_with_transforms', "
            "kwargs: {env_id: Pendulum-v1, reward_scale: -1}}",
            "could not start the evaluator: ValueError: reward_scale must be a positive number",
        ),
    ],
)
def test_failed_evaluation_exits_4_with_one_line(capsys, env, expected):
    code, out, err = run_cli(capsys, "run", PENDULUM, f"env={env}", *QUICK)
    assert code == 4, err
    lines = error_lines(err)
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err and out == ""


# -- envs, policies and loggers ------------------------------------------------------------


def test_torchrl_env_with_transforms_config(capsys, tmp_path):
    config = ROOT / "configs" / "pendulum_torchrl.yaml"
    out_file = tmp_path / "r.jsonl"
    code, _, err = run_cli(
        capsys, "run", config, "--output", out_file, "num_trajectories=2", "workers.num_workers=0"
    )
    assert code == 0, err
    (record,) = read_results(out_file)
    metrics = record["metrics"]
    assert metrics["eval/episode_length"] == 200
    # RewardScaling(0.1): a Pendulum step's reward is in [-16.3, 0], so a 200-step return is > -330
    assert -330 < metrics["eval/reward"] < 0
    assert record["env"] == "Pendulum-v1"


def test_cartpole_config_and_a_factory_policy(capsys, tmp_path):
    config = ROOT / "configs" / "cartpole.yaml"
    out_file = tmp_path / "r.jsonl"
    code, _, err = run_cli(capsys, "run", config, "--output", out_file, *QUICK)
    assert code == 0, err
    factory = [
        "policy={type: factory, factory: 'ray_eval.factories:mlp_policy', kwargs: {hidden_sizes: [32]}}"
    ]
    code, _, err = run_cli(capsys, "run", config, "--output", out_file, *QUICK, *factory)
    assert code == 0, err
    first, second = read_results(out_file)
    assert first["metrics"]["eval/num_episodes"] == 3
    # the built-in MLP and the same MLP through a factory are the same policy
    assert first["metrics"]["eval/reward"] == second["metrics"]["eval/reward"]
    assert first["config_hash"] != second["config_hash"]


@pytest.mark.parametrize("env", ["envpool:CartPole-v1", "vector:CartPole-v1"])
def test_a_config_names_a_native_vector_env(capsys, tmp_path, env):
    """``env: envpool:<task>`` / ``vector:<id>`` run on the vector path, kwargs included."""
    config = ROOT / "configs" / "cartpole.yaml"
    out_file = tmp_path / "r.jsonl"
    # this MLP drops the pole after 8-9 steps: a cut at 5 shows the kwargs arrived
    overrides = [f"env={{id: '{env}', kwargs: {{max_episode_steps: 5}}}}"]
    if env.startswith("vector:"):  # gymnasium's CartPoleVectorEnv takes no max_episode_steps
        overrides = [f"env={env}", "max_steps=5"]
    code, _, err = run_cli(capsys, "run", config, "--output", out_file, *QUICK, *overrides)
    assert code == 0, err
    (record,) = read_results(out_file)
    assert record["metrics"]["eval/num_episodes"] == 3
    assert record["metrics"]["eval/episode_length"] == 5
    assert record["env"] == env


def test_results_go_to_torchrl_loggers(capsys, tmp_path, monkeypatch):
    # tensorboard and wandb are in the `test` extra: every logger is checked, none skipped.
    # wandb runs offline (the logger asks for it; WANDB_MODE makes sure): no account, no
    # network; its config and cache go to tmp_path, not to the home directory.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    loggers = [
        f"{{type: csv, log_dir: '{tmp_path / 'csv'}'}}",
        f"{{type: tensorboard, log_dir: '{tmp_path / 'tb'}'}}",
        f"{{type: wandb, log_dir: '{tmp_path / 'wandb'}'}}",
    ]
    torch.save(pendulum_weights(0.2), tmp_path / "policy_step_300.pt")
    code, _, err = run_cli(
        capsys,
        "run",
        PENDULUM,
        "--checkpoint",
        tmp_path / "policy_step_300.pt",
        *QUICK[:-1],
        f"loggers=[{', '.join(loggers)}]",
        "--output",
        tmp_path / "r.jsonl",
    )
    assert code == 0, err
    (record,) = read_results(tmp_path / "r.jsonl")
    reward = record["metrics"]["eval/reward"]
    rows = (tmp_path / "csv" / "pendulum" / "scalars" / "eval" / "reward.csv").read_text().split()
    step, value = rows[-1].split(",")
    assert int(step) == 300 and float(value) == pytest.approx(reward)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "tb").rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    (scalar,) = accumulator.Scalars("eval/reward")
    assert scalar.step == 300 and scalar.value == pytest.approx(reward, rel=1e-6)  # float32

    (run_file,) = (tmp_path / "wandb").rglob("offline-run-*/run-*.wandb")
    records = list(wandb_records(run_file))
    rows = [
        {  # a key with '/' is stored split, as nested_key
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in record.history.item
        }
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]
    (row,) = [row for row in rows if "eval/reward" in row]
    assert row["eval/step"] == 300 and row["eval/reward"] == pytest.approx(reward, rel=1e-6)
    (exit_record,) = [r for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit.exit_code == 0  # the run was finished (close_loggers), not dropped


def wandb_records(path):
    """The protobuf records of a wandb offline run file (``run-<id>.wandb``).

    wandb has no Python reader of its own any more (the Go core writes the file). The
    file is the LevelDB log format: a 7-byte header (``:W&B``, magic, version), then
    32 KiB blocks of records, each ``crc32c(4) length(2, little-endian) type(1) data``;
    a record split over blocks comes as FIRST(2), MIDDLE(3)..., LAST(4) pieces, a whole
    one as FULL(1), and a block tail shorter than a header is padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"not a wandb run file: {data[:7]!r}"
    block, pos, payload = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


def test_missing_logger_package_is_a_config_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    code, _, err = run_cli(capsys, "run", PENDULUM, *QUICK[:-1], "loggers=[{type: tensorboard}]")
    assert code == 2
    assert "loggers[0].type: the tensorboard logger needs the 'tensorboard' package" in err


# -- results file and plots ------------------------------------------------------------------


def test_appends_are_whole_lines_and_deduplicated(tmp_path):
    path = tmp_path / "r.jsonl"
    assert append_result(
        path, {"config_hash": "h", "checkpoint": "/a", "metrics": {"x": float("nan")}}
    )
    with path.open("ab") as handle:
        handle.write(b'{"config_hash": "h", "checkpoint": "/b", "met')  # a writer killed mid-line
    assert [r["checkpoint"] for r in read_results(path)] == ["/a"]
    assert append_result(path, {"config_hash": "h", "checkpoint": "/b"})
    assert not append_result(path, {"config_hash": "h", "checkpoint": "/a"})  # already there
    assert append_result(path, {"config_hash": "h", "checkpoint": "/a"}, dedupe=False)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["checkpoint"] for line in lines] == ["/a", "/b", "/a"]
    assert json.loads(lines[0])["metrics"] == {"x": None}  # NaN is not JSON: null


def test_plot_draws_one_line_per_config(capsys, tmp_path):
    out_file = tmp_path / "r.jsonl"
    for step, scale in [(0, 0.0), (100, 0.3), (200, 0.6)]:
        torch.save(pendulum_weights(scale), tmp_path / f"policy_step_{step}.pt")
        for config in (PENDULUM, ROOT / "configs" / "pendulum_torchrl.yaml"):
            code, _, err = run_cli(
                capsys,
                "run",
                config,
                "--checkpoint",
                tmp_path / f"policy_step_{step}.pt",
                "--output",
                out_file,
                *QUICK,
            )
            assert code == 0, err
    lines = curves(read_results(out_file))
    assert sorted(lines) == ["pendulum (Pendulum-v1)", "pendulum-torchrl (Pendulum-v1)"]
    for points in lines.values():
        assert [p[0] for p in points] == [0, 100, 200]
        assert all(low <= value <= high for _, value, low, high in points)
    png = tmp_path / "curve.png"
    code, _, err = run_cli(capsys, "plot", out_file, "-o", png)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run_cli(capsys, "plot", tmp_path / "none.jsonl", "-o", png)
    assert code == 2 and "nothing to plot" in err
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_results([tmp_path / "none.jsonl"], png)


def test_progress_display_on_a_terminal(tmp_path):
    """Under a pseudo-terminal the command draws rich progress; the table still prints."""
    import os
    import pty

    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "ray_eval",
                "run",
                PENDULUM,
                *QUICK,
                "--output",
                str(tmp_path / "r.jsonl"),
            ],
            stdout=subprocess.PIPE,
            stderr=follower,
            text=True,
            timeout=120,
            cwd=ROOT,
            env=env_for_subprocess(COLUMNS="100"),
        )
        os.close(follower)
        follower = -1
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert proc.returncode == 0
    assert "reward (mean ± std)" in proc.stdout
    text = shown.decode(errors="replace")
    assert "evaluating initial weights" in text
    assert "\x1b[" in text  # rendered by rich for a terminal, not plain log lines
