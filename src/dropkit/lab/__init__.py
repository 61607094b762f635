"""dropkit's lab: training on real data, comparisons, sweeps, reports, benchmarks and the ``dropkit``
command, built on the core library (``dropkit``) and never imported by it.

It needs the ``lab`` extra (``pip install 'dropkit[lab]'``); importing it without says which
packages are missing.
"""

from __future__ import annotations

import importlib.util

#: import name -> distribution name of the packages the lab needs beyond the core
REQUIRED = {"optuna": "optuna", "matplotlib": "matplotlib", "tqdm": "tqdm"}

_missing = sorted(dist for module, dist in REQUIRED.items() if importlib.util.find_spec(module) is None)
if _missing:
    raise ImportError(f"dropkit.lab needs {', '.join(_missing)}: install the lab extra with "
                      f"pip install 'dropkit[lab]'")
