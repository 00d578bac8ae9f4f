"""`python -m memnet ...`: the same command line as the `memnet` script (schedulers often call it so)."""

import sys

from .cli import main

sys.exit(main())
