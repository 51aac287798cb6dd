"""`python -m backend`: the PruneScope command line."""

import sys

from backend.cli.parser import main

sys.exit(main())
