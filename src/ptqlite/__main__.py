"""`python -m ptqlite`: the same command line as the `ptqlite` script."""

import sys

from .cli import main

sys.exit(main())
