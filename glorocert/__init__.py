"""glorocert: certified l2 robustness from a frozen global Lipschitz bound."""

__version__ = "0.1.0"

from glorocert.api import CertifyResult, certify, compute_bound, load  # noqa: E402
from glorocert.lipschitz.boundfile import Bound  # noqa: E402

__all__ = ["load", "compute_bound", "certify", "CertifyResult", "Bound", "__version__"]
