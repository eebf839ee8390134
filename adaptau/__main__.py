"""``python -m adaptau train|eval|bench`` (same as the ``adaptau`` console script)."""

import sys

from .train.cli import main

if __name__ == "__main__":
    sys.exit(main())
