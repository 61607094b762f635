"""``python -m dropkit``: the same as the ``dropkit`` command (what ``torchrun -m dropkit`` starts)."""

import sys

from dropkit.cli import main

sys.exit(main())
