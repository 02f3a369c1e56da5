"""``python -m ray_eval``: the ``ray-eval`` command."""

import sys

from ray_eval.jobs.cli import main

if __name__ == "__main__":
    sys.exit(main())
