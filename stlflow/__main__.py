"""``python -m stlflow`` (and ``torchrun -m stlflow``) runs the command line."""

import sys

from stlflow.cli import main

sys.exit(main())
