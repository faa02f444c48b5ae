"""Entry point: `python -m launch MODE ...` (also runnable as `python launch/__main__.py MODE ...`)."""

import os
import sys

if __package__ in (None, ""):
    # Run as a file by the shell wrappers: make the repository importable from any directory.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
