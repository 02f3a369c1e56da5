"""``from ray_eval.sb3 import EvalCallback``: stable-baselines3's ``EvalCallback`` on Ray workers.

Needs the ``sb3`` extra (``pip install "ray_eval[sb3]"``). See
``ray_eval.integrations.sb3`` for what it does and how it differs.
"""

from ray_eval.integrations.sb3 import EvalCallback

__all__ = ["EvalCallback"]
