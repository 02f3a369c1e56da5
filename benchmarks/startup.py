"""How long ``Evaluator()`` takes to start, for the README's example (issue 19, point 3).

    python benchmarks/startup.py               # 3 rounds, about a minute on a quiet 2-core machine
    python benchmarks/startup.py --rounds 5

Each round runs, in fresh Python processes (nothing imported or started before):

* **Ray not up**: ``Evaluator(partial(GymEnv, "Pendulum-v1"), policy, num_trajectories=64)``
  as the first Ray call, so the evaluator starts its own local Ray instance;
* **Ray up**: ``ray.init()`` first (a local instance, as the evaluator would start it),
  timed apart, then the same ``Evaluator()``;

and beside them what each worker pays before it answers: a fresh Python that imports
torch, tensordict, TorchRL and gymnasium, and building its 64 ``GymEnv`` copies.
Construction ends when every worker has built its envs and policy and answered.
The driver's own imports (torch, TorchRL, ray_eval) are timed apart, and so is the first
``evaluate()``. The load average is printed beside every round: on a shared machine the
figures move with it. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

WORKER_IMPORTS = "import torch, tensordict, torchrl.envs, gymnasium"


def _niceness() -> int:
    return os.nice(0)


def child(mode: str) -> dict:
    """One start-up, in this (fresh) process: ``mode`` is ``"ray-down"`` or ``"ray-up"``."""
    started = time.perf_counter()
    from functools import partial

    import ray
    from tensordict.nn import TensorDictModule
    from torch import nn
    from torchrl.envs import GymEnv

    from ray_eval import Evaluator

    out: dict = {"imports_s": time.perf_counter() - started}
    net = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 1))
    policy = TensorDictModule(net, in_keys=["observation"], out_keys=["action"])
    if mode == "ray-up":
        started = time.perf_counter()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
        out["ray_init_s"] = time.perf_counter() - started
    started, cpu = time.perf_counter(), time.process_time()
    evaluator = Evaluator(partial(GymEnv, "Pendulum-v1"), policy, num_trajectories=64)
    out["evaluator_s"] = time.perf_counter() - started
    out["evaluator_driver_cpu_s"] = time.process_time() - cpu
    # Ray starts its workers at this niceness (RAY_worker_niceness; Ray's default is 15).
    out["worker_nice"] = ray.get(ray.remote(num_cpus=0)(_niceness).remote())
    started = time.perf_counter()
    evaluator.evaluate(weights=policy)
    out["first_evaluate_s"] = time.perf_counter() - started
    out["workers"] = evaluator.num_workers
    evaluator.shutdown()
    ray.shutdown()
    return out


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def worker_parts() -> dict:
    """What one worker pays: a Python with its imports, and its env copies. CPU seconds
    beside wall seconds: on a loaded machine the wall time stretches, the CPU time less."""
    started, cpu = time.perf_counter(), _children_cpu_s()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    python_s, python_cpu_s = time.perf_counter() - started, _children_cpu_s() - cpu
    started, cpu = time.perf_counter(), _children_cpu_s()
    subprocess.run([sys.executable, "-c", WORKER_IMPORTS], check=True)
    imports_s = time.perf_counter() - started - python_s
    imports_cpu_s = _children_cpu_s() - cpu - python_cpu_s
    from torchrl.envs import GymEnv

    GymEnv("Pendulum-v1")  # gymnasium's registry and TorchRL's wrapper, loaded once
    started, cpu = time.perf_counter(), time.process_time()
    envs = [GymEnv("Pendulum-v1") for _ in range(64)]
    envs_s, envs_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    for env in envs:
        env.close()
    return {
        "python_s": python_s,
        "worker_imports_s": imports_s,
        "worker_imports_cpu_s": imports_cpu_s,
        "gymenv_x64_s": envs_s,
        "gymenv_x64_cpu_s": envs_cpu_s,
    }


def run_child(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def rounded(value):
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return round(value, 2) if isinstance(value, float) else value


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["ray-down", "ray-up"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    print(f"Evaluator() start-up, README example (Pendulum-v1, 64 episodes), {os.cpu_count()} CPUs")
    rows = []
    for number in range(1, args.rounds + 1):
        row = {"round": number, "load_before": load()}
        row["ray-down"] = run_child("ray-down")
        row["ray-up"] = run_child("ray-up")
        row["worker"] = worker_parts()
        row["load_after"] = load()
        rows.append(row)
        print(json.dumps(rounded(row)))

    def median(mode: str, key: str) -> str:
        values = [r[mode][key] for r in rows if key in r[mode]]
        return f"{statistics.median(values):.1f} s" if values else "n/a"

    print(
        f"\nmedian of {len(rows)} rounds:\n"
        f"  Ray not up: Evaluator() {median('ray-down', 'evaluator_s')} "
        f"(it starts Ray), first evaluate() {median('ray-down', 'first_evaluate_s')}\n"
        f"  Ray up:     ray.init() {median('ray-up', 'ray_init_s')}, "
        f"then Evaluator() {median('ray-up', 'evaluator_s')}\n"
        f"  driver imports (torch, TorchRL, ray_eval): {median('ray-down', 'imports_s')}\n"
        f"  per worker: imports {median('worker', 'worker_imports_s')} "
        f"(CPU {median('worker', 'worker_imports_cpu_s')}), "
        f"64 GymEnv copies {median('worker', 'gymenv_x64_s')} "
        f"(CPU {median('worker', 'gymenv_x64_cpu_s')})\n"
        f"  Ray's worker niceness: {rows[0]['ray-down'].get('worker_nice', 'n/a')}\n"
        f"  load average at the end: {load()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
