"""`python -m edge_metastone` runs the CLI."""

import sys

from edge_metastone.cli import main

sys.exit(main())
