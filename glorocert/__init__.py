"""glorocert: certified l2 robustness from a frozen global Lipschitz bound.

The facade (``glorocert.load``, ``compute_bound``, ``certify``, ``CertifyResult``, ``Bound``) is imported on first
use, so that ``import glorocert.<module>`` stays cheap (the command line answers Ctrl-C during start-up).
"""

import importlib

from glorocert._version import __version__

__all__ = ["load", "compute_bound", "certify", "CertifyResult", "Bound", "__version__"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("glorocert.api"), name)
    raise AttributeError(f"module 'glorocert' has no attribute {name!r}")
