"""What the statistics of a very large evaluation cost (the 10^5-10^6 episodes of a vector env).

    python benchmarks/statistics_cost.py              # about 10 s
    python benchmarks/statistics_cost.py --episodes 100000

Every statistic of one result (mean, std, median, IQM, both bootstrap intervals), on
synthetic returns: all distinct (a continuous-reward env), and 33 distinct values (a
random CartPole policy's 8-40-step episodes). Reported in CPU seconds of this process,
which other processes on a shared machine disturb far less than wall time, beside the
wall time and the load average. Fastest and median of 5 runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np

from ray_eval.results.episodes import EpisodeData
from ray_eval.results.metrics import bootstrap_rng, episode_metrics


def episodes(returns: np.ndarray) -> EpisodeData:
    n = len(returns)
    return EpisodeData(
        members=np.full(n, "", dtype=object),
        indices=np.arange(n),
        seeds=np.arange(n),
        returns=returns,
        lengths=np.full(n, 10),
        workers=np.zeros(n, dtype=int),
        weights_ids=np.full(n, None, dtype=object),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    cases = {
        "distinct returns": rng.normal(size=args.episodes),
        "33 distinct returns": rng.integers(8, 41, size=args.episodes).astype(float),
    }
    print(f"statistics of {args.episodes:,} episodes (load {os.getloadavg()[0]:.1f})")
    for name, returns in cases.items():
        data = episodes(returns)
        cpu, wall = [], []
        for _ in range(args.repeats):
            cpu_0, wall_0 = time.process_time(), time.perf_counter()
            episode_metrics(data, bootstrap_rng(0, 0))
            cpu.append(time.process_time() - cpu_0)
            wall.append(time.perf_counter() - wall_0)
        print(
            f"  {name}: CPU {min(cpu):.3f} s fastest, {statistics.median(cpu):.3f} s median; "
            f"wall {min(wall):.3f} s fastest (load {os.getloadavg()[0]:.1f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
