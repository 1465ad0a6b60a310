"""The registry of certification methods (torch-free: certify's gloro path imports nothing more).

``gloro`` needs only the frozen margin matrix (certify/gloro.py). The local
methods — ``bcp`` (certify/bcp.py) and ``kw`` (certify/kw.py) — bound every
sample's worst-case margins on the model's graph (normalisation folded in);
certify/local_stage.py runs them on a batch, and ``cascade`` runs them only
where gloro abstains.
"""

from __future__ import annotations

from glorocert.errors import GlorocertError

LOCAL_METHODS = ("bcp", "kw")
METHODS = ("gloro", *LOCAL_METHODS, "cascade")


def check_method(method: str, fallback: str = "bcp") -> None:
    if method not in METHODS:
        raise GlorocertError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if fallback not in LOCAL_METHODS:
        raise GlorocertError(f"--fallback {fallback!r}: use {' or '.join(LOCAL_METHODS)}")
