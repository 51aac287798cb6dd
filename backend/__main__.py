"""`python -m backend`: the PruneScope command line."""

import sys

from backend.cli import main

sys.exit(main())
