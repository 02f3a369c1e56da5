"""``python -m ray_eval``: the ``ray-eval`` command."""

import sys

from ray_eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
