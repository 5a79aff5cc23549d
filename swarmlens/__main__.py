"""Run the command line with `python -m swarmlens`."""

import sys

from swarmlens.cli import main

sys.exit(main())
