"""`python -m bonefrac ...` (and `torchrun -m bonefrac train ...`) run the CLI."""

import sys

from .cli import main

sys.exit(main())
