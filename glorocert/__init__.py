"""glorocert: certified l2 robustness from a frozen global Lipschitz bound."""

__version__ = "0.1.0"
