"""``python -m adaptau train|eval|bench`` (same as the ``adaptau`` console script)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
