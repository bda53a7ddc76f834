"""`python -m olmoe` is the `olmoe` command."""

import sys

from olmoe.cli import main

sys.exit(main())
