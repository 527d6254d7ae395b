"""``python -m shmbroker ...``: the ``shmbroker`` command."""

import sys

from shmbroker.cli import main

sys.exit(main())
