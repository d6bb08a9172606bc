"""`python -m clients.python ...`: the command line in `clients.python.cli`."""

import sys

from clients.python.cli import main

sys.exit(main())
