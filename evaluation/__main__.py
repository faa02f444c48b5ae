"""`python -m evaluation` runs the long-context evaluation (same as `python -m evaluation.long_context`)."""

import sys

from .long_context import main

sys.exit(main())
