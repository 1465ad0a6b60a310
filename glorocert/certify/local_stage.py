"""The one place a local certifier (certify/bcp.py, certify/kw.py) meets a batch: :class:`LocalStage`.

It runs a local method on a batch, either over a full radius by bisection or
at the requested ε only; ``cascade`` runs it only where gloro abstains.

Every local certificate keeps GloRo's rounding budget: a sample counts only
when every local lower bound exceeds ``rtol·(1 + max|y|)`` on its native
logits y, with ``rtol = model.rounding_rtol`` (:func:`local_slack`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from glorocert.certify import bcp, gloro, kw
from glorocert.certify.local import BISECTION_TOL
from glorocert.lipschitz.boundfile import Bound
from glorocert.lipschitz.freeze import composition_from_bound
from glorocert.loaders import Model
from glorocert.normalization import Normalization, fold

MODULES = {"bcp": bcp, "kw": kw}


def local_slack(logits: np.ndarray, rtol: float) -> torch.Tensor:
    """(N,) float64: the margin every local lower bound must exceed, rtol·(1 + max|y|) on the native logits y
    (GloRo's rounding budget, as :func:`glorocert.certify.gloro.radii` subtracts it)."""
    return torch.from_numpy(rtol * (1.0 + np.abs(logits.astype(np.float64)).max(axis=1)))


def local_options(module, graph, bound: Bound, normalization: Normalization | None) -> dict:
    """Keyword arguments for ``module.certify`` / ``certified_radius`` on ``graph`` (the normalised graph of ``bound``'s model).

    BCP needs guaranteed operator norms of every linear block and the margin
    matrix; computing them costs far more than a BCP pass. A *sound* frozen
    bound holds exactly these values for this graph, so they are reused
    (:func:`glorocert.lipschitz.freeze.composition_from_bound`); otherwise BCP
    composes its own.
    """
    if module is not bcp:
        return {}
    composition = composition_from_bound(bound, graph, normalization)
    return {} if composition is None else {"composition": composition}


class LocalStage:
    """A local method on a model: every sample by bisection (``radius``), or at the requested ε (``at_eps``, ``cascade``)."""

    def __init__(self, name: str, model: Model, bound: Bound, normalization: Normalization | None, eps: Sequence[float]):
        self.name, self.module = name, MODULES[name]
        self.graph = fold(model.graph, normalization)
        self.options = local_options(self.module, self.graph, bound, normalization)
        self.rtol = model.rounding_rtol
        self.eps = sorted({float(e) for e in eps}, reverse=True)
        self.search_max = max(2.0, 2.0 * self.eps[0])
        self.samples, self.passes, self.seconds = 0, 0, 0.0

    def radius(self, x: np.ndarray, predicted: np.ndarray, logits: np.ndarray):
        """A full certified radius per sample by bisection on [0, search_max], then the requested ε within the
        bisection's tolerance of a radius are tried exactly (so a sample certified at ε is never ⊥ at ε for want
        of bisection steps); (radius, seconds per sample, local_eps)."""
        t0 = time.perf_counter()
        radius = self.module.certified_radius(
            self.graph, torch.from_numpy(x), torch.from_numpy(predicted), eps_max=self.search_max,
            slack=local_slack(logits, self.rtol), **self.options,
        ).numpy()
        self.seconds += time.perf_counter() - t0
        local_eps, _ = self.at_eps(x, predicted, logits, lambda e: (radius <= e) & (radius >= e - BISECTION_TOL))
        elapsed = time.perf_counter() - t0
        self.samples += len(x)
        return np.fmax(radius, local_eps), np.full(len(x), elapsed / max(len(x), 1)), local_eps

    def cascade(self, x: np.ndarray, predicted: np.ndarray, logits: np.ndarray, gloro_radius: np.ndarray):
        """One local pass per requested ε (descending) on the samples gloro leaves ⊥ there and the local
        method has not certified at a larger ε; (radius, seconds per sample, local_eps)."""
        local_eps, seconds = self.at_eps(x, predicted, logits, lambda e: gloro.bottom_flags(gloro_radius, e))
        self.samples += int((seconds > 0).sum())
        return np.fmax(gloro_radius, local_eps), seconds, local_eps  # fmax: NaN (not certified) keeps gloro's

    def at_eps(self, x, predicted, logits, candidates: Callable[[float], np.ndarray]):
        """For each requested ε, largest first: certify ``candidates(ε)`` not yet certified at a larger ε (a
        certificate covers the closed ball, hence every smaller one). Returns (largest certified requested ε,
        NaN where none; local seconds spent per sample)."""
        local_eps = np.full(len(x), np.nan)
        seconds = np.zeros(len(x))
        slack = local_slack(logits, self.rtol)
        for e in self.eps:
            todo = np.flatnonzero(candidates(e) & np.isnan(local_eps))
            if not len(todo):
                continue
            t0 = time.perf_counter()
            ok = self.certified_at(x[todo], predicted[todo], slack[todo], e)
            elapsed = time.perf_counter() - t0
            local_eps[todo[ok]] = e
            seconds[todo] += elapsed / len(todo)
            self.passes += len(todo)
            self.seconds += elapsed
        return local_eps, seconds

    def certified_at(self, x: np.ndarray, predicted: np.ndarray, slack: torch.Tensor, eps: float) -> np.ndarray:
        """Whether the local method certifies each sample's prediction on the closed ε-ball (one pass)."""
        return self.module.certify(self.graph, torch.from_numpy(x), torch.from_numpy(predicted), eps, slack=slack,
                                   **self.options).numpy()
