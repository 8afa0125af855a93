"""``python -m pyvduse``: the same as the ``pyvduse`` command."""

import sys

from pyvduse.cli import main

sys.exit(main())
