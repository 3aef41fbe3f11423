"""`python -m dla …`: the `dla` command."""

import sys

from dla.cli import main

sys.exit(main())
