"""`python -m coordexp` (used by torchrun) runs the command line."""

import sys

from coordexp.cli import main

sys.exit(main())
