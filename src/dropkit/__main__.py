"""``python -m dropkit``: the same as the ``dropkit`` command (what ``torchrun -m dropkit`` starts)."""

import sys

from dropkit.lab.cli import main

sys.exit(main())
