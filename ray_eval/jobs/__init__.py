"""Scheduled evaluations: a config becomes a job, checkpoints become results.

- ``cli``: the ``ray-eval`` command (``run``, ``watch``, ``plot``).
- ``config``: YAML configs validated into an ``EvalConfig``.
- ``runner``: one config's job: checkpoint in, result record out.
- ``watch``: each checkpoint of a directory evaluated once, in step order, resumably.
- ``checkpoints``, ``loggers``: checkpoint formats and steps; TorchRL loggers.

The highest wing: it builds on the ``Evaluator`` façade.
"""
