"""The ``ray-eval`` command: ``run``, ``watch`` and ``plot``.

Exit codes: 0 success; 2 bad config or arguments; 3 missing, corrupt or
mismatching checkpoint; 4 the evaluation failed; 1 anything unexpected;
130 interrupted. A failure prints one line, ``ray-eval: error: <reason>``, on
stderr (``--debug`` adds the traceback).

Examples::

    ray-eval run configs/pendulum.yaml
    ray-eval run configs/pendulum.yaml --checkpoint ckpt/policy_step_1000.pt num_trajectories=32
    ray-eval watch configs/pendulum.yaml --checkpoint-dir ckpt --until-step 100000
    ray-eval watch configs/pendulum.yaml --checkpoint-dir ckpt --keep-best best \
        --stop-when "eval/reward_ci_low >= -200"
    ray-eval plot outputs/pendulum.jsonl -o outputs/curve.png
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_CHECKPOINT = 3
EXIT_EVALUATION = 4
EXIT_INTERRUPTED = 130

OVERRIDE_TOKEN = re.compile(r"^[A-Za-z_][\w.]*=")
log = logging.getLogger("ray_eval")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, our exit code
        where = self.prog.removeprefix("ray-eval").strip()
        raise _UsageError(f"{where}: {message}" if where else message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ray-eval",
        description="Evaluate RL policy checkpoints on a pool of Ray actors.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="evaluate one checkpoint (or the initial policy)")
    _common(run)
    run.add_argument(
        "--checkpoint", type=Path, help=".pt state_dict, TensorDict directory or module"
    )
    run.add_argument("--step", type=int, help="the step to report (default: the checkpoint's)")

    watch = commands.add_parser(
        "watch", help="evaluate every checkpoint of a directory as it appears"
    )
    _common(watch)
    watch.add_argument("--checkpoint-dir", type=Path, required=True, help="directory to watch")
    watch.add_argument(
        "--poll-interval",
        type=_positive,
        default=5.0,
        metavar="S",
        help="seconds between scans (5)",
    )
    watch.add_argument(
        "--settle",
        type=_non_negative,
        default=1.0,
        metavar="S",
        help="a checkpoint must be unchanged this long before it is read (1)",
    )
    stop = watch.add_mutually_exclusive_group()
    stop.add_argument(
        "--max-checkpoints", type=_positive_int, metavar="N", help="stop after N checkpoints"
    )
    stop.add_argument(
        "--until-step", type=int, metavar="N", help="stop after a checkpoint at step >= N"
    )
    watch.add_argument(
        "--idle-timeout", type=_positive, metavar="S", help="stop after S seconds with nothing new"
    )
    watch.add_argument(
        "--unreadable-timeout",
        type=_positive,
        default=60.0,
        metavar="S",
        help="fail on a checkpoint unchanged but unreadable this long (60)",
    )
    watch.add_argument(
        "--keep-best",
        type=Path,
        metavar="DIR",
        help="save the best checkpoint's weights (and env parts) here, as a torchrl.checkpoint",
    )
    _best_arguments(watch)
    watch.add_argument(
        "--stop-when",
        type=_condition,
        metavar="COND",
        help="stop once a result meets COND, e.g. 'eval/reward_ci_low >= 450', after writing "
        "the stop file",
    )
    watch.add_argument(
        "--stop-file",
        type=Path,
        metavar="PATH",
        help="the marker --stop-when writes for the trainer (CHECKPOINT_DIR/ray_eval_stop.json)",
    )

    plot = commands.add_parser("plot", help="plot reward against step from results files")
    plot.add_argument(
        "files", nargs="+", type=Path, metavar="FILE", help="results files (JSON lines)"
    )
    plot.add_argument(
        "-o", "--output", type=Path, required=True, help="image to write (.png, .svg, .pdf)"
    )
    plot.add_argument("--metric", default="reward", help="metric without prefix (reward)")
    plot.add_argument("--title", help="plot title")
    _best_arguments(plot)
    return parser


def _best_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--best-by",
        default="reward_ci_low",
        metavar="METRIC",
        help="the metric that picks the best checkpoint (reward_ci_low: the lower bound of the "
        "mean's 95%% interval; reward: the mean; 'none' in plot: mark nothing)",
    )
    command.add_argument(
        "--best-mode", choices=("max", "min"), default="max", help="higher or lower is better"
    )


def _condition(text: str) -> str:
    from ray_eval.integrations.stopping import StopOnThreshold

    try:
        StopOnThreshold.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _common(command: argparse.ArgumentParser) -> None:
    command.add_argument("config", type=Path, metavar="CONFIG", help="YAML config")
    command.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="key=value",
        help="config overrides, dotted keys for nested ones",
    )
    command.add_argument("--output", type=Path, help="results file (default: the config's output)")
    command.add_argument(
        "--address",
        help="Ray cluster to use: host:port, or 'auto' for one started on this machine "
        "(default: $RAY_ADDRESS, else a new local Ray)",
    )
    command.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow checkpoints that are whole pickled modules",
    )


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` tokens anywhere after CONFIG are overrides."""
    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv))
    unknown = [token for token in extra if not OVERRIDE_TOKEN.match(token)]
    if unknown or (extra and args.command == "plot"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if args.command != "plot":
        args.overrides = [*args.overrides, *extra]
        bad = [token for token in args.overrides if not OVERRIDE_TOKEN.match(token)]
        if bad:
            parser.error(f"override {bad[0]!r} must look like key=value (e.g. num_trajectories=4)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ray-eval`` console script; returns the exit code."""
    from ray_eval.results.display import interactive, setup_logging

    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    tty = interactive()
    logger = logging.getLogger("ray_eval")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    setup_logging(verbose=debug, tty=tty)
    previous = signal.getsignal(signal.SIGTERM)
    if _in_main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # `ray job stop`: clean up as on Ctrl-C
    try:
        args = parse_args(argv)
        if args.command == "plot":
            return _plot(args)
        return _evaluate(args, tty)
    except BaseException as error:  # every failure becomes an exit code
        return _report(error, debug)
    finally:
        if _in_main_thread():
            signal.signal(signal.SIGTERM, previous)
        logger.handlers[:], logger.level, logger.propagate = saved  # main() may run in-process


def _evaluate(args: argparse.Namespace, tty: bool) -> int:
    from ray_eval.jobs.config import load_config
    from ray_eval.jobs.runner import EvalJob
    from ray_eval.results.display import best_table, print_table, steps_table, summary_table
    from ray_eval.results.results_file import append_result

    overrides = list(args.overrides)
    if args.allow_pickle:
        overrides.append("checkpoint.allow_pickle=true")
    config = load_config(args.config, overrides)
    output = args.output or (Path(config.output) if config.output else None)
    if args.command == "watch" and output is None:
        output = Path("outputs") / f"{config.name}.jsonl"

    if args.command == "run":
        with EvalJob(config, address=args.address, tty=tty) as job:
            weights, step = (None, args.step)
            if args.checkpoint is not None:
                weights, found = job.load(args.checkpoint)  # missing/corrupt: before Ray starts
                step = found if step is None else step
            record = job.evaluate(args.checkpoint, step=step, weights=weights)
        if output is not None:
            append_result(output, record, dedupe=False)
            log.info("result appended to %s", output)
        print_table(summary_table(record))
        return EXIT_OK

    from ray_eval.jobs.watch import Watcher, WatchOptions

    options = WatchOptions(
        checkpoint_dir=args.checkpoint_dir,
        output=output,
        poll_interval=args.poll_interval,
        settle=args.settle,
        max_checkpoints=args.max_checkpoints,
        until_step=args.until_step,
        idle_timeout=args.idle_timeout,
        unreadable_timeout=args.unreadable_timeout,
        keep_best=args.keep_best,
        best_by=args.best_by,
        best_mode=args.best_mode,
        stop_when=args.stop_when,
        stop_file=args.stop_file,
    )
    with EvalJob(config, address=args.address, tty=tty) as job:
        watcher = Watcher(job, options)
        written = watcher.run()
    if written:
        print_table(steps_table(written))
    best = watcher.best_record()
    if best is not None:
        saved = watcher.keep_best.path if watcher.keep_best is not None else None
        print_table(best_table(best, options.best_by, saved))
    if watcher.stop_record is not None:
        log.info("stopped: %s (marker %s)", watcher.stopper.reason, options.stop_marker)
    log.info("%d checkpoint(s) evaluated by this run; results in %s", len(written), output)
    return EXIT_OK


def _plot(args: argparse.Namespace) -> int:
    from ray_eval.results.plotting import plot_results

    best_by = None if args.best_by.lower() == "none" else args.best_by
    path = plot_results(
        args.files,
        args.output,
        metric=args.metric,
        title=args.title,
        best_by=best_by,
        best_mode=args.best_mode,
    )
    log.info("plot written to %s", path)
    return EXIT_OK


def _report(error: BaseException, debug: bool) -> int:
    """Print the one-line reason and return the exit code for ``error``."""
    from ray_eval.jobs.checkpoints import CheckpointError
    from ray_eval.jobs.config import ConfigError
    from ray_eval.jobs.runner import EvaluationFailed

    if isinstance(error, SystemExit):  # --help, or our SIGTERM handler
        code = error.code if isinstance(error.code, int) else EXIT_OK
        return code
    if isinstance(error, KeyboardInterrupt):
        _say("interrupted")
        return EXIT_INTERRUPTED
    if isinstance(error, _UsageError):
        code, message = EXIT_CONFIG, str(error)
    elif isinstance(error, ConfigError):
        code, message = EXIT_CONFIG, f"bad config: {error}"
    elif isinstance(error, CheckpointError):
        code, message = EXIT_CHECKPOINT, str(error)
    elif isinstance(error, EvaluationFailed):
        code, message = EXIT_EVALUATION, str(error)
    elif isinstance(error, ValueError) and "nothing to plot" in str(error):
        code, message = EXIT_CONFIG, str(error)
    else:
        code = EXIT_UNEXPECTED
        message = f"unexpected {type(error).__name__}: {error} (run with --debug for the traceback)"
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    _say(message)
    return code


def _say(message: str) -> None:
    line = " ".join(str(message).split())  # one line, whatever the message held
    print(f"ray-eval: error: {line}", file=sys.stderr, flush=True)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
