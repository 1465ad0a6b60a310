"""glorocert: certified l2 robustness from a frozen global Lipschitz bound."""

from glorocert._version import __version__
from glorocert.api import CertifyResult, certify, compute_bound, load
from glorocert.lipschitz.boundfile import Bound

__all__ = ["load", "compute_bound", "certify", "CertifyResult", "Bound", "__version__"]
