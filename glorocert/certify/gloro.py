"""GloRo certification: one forward pass per batch, then the frozen margin matrix.

Guarantee (sound mode). Let K[j][i] ≥ Lip(y_j − y_i) in l2 over the [0,1]
input space (normalisation folded in). For a sample with predicted class j
(the unique argmax) and

    radius = min_{i≠j} (y_j − y_i − slack) / K[j][i],

no input x' with ‖x' − x‖₂ < radius changes the prediction: y_j − y_i can
shrink by at most K[j][i]·‖x' − x‖₂ and is positive at x. The GloRo ⊥ flag
at ε is ``radius ≤ ε`` — the ⊥ logit max_{i≠j} y_i + ε·K[j][i] reaches y_j.
Everything rounds against certification: a tied top logit gives radius 0,
the margin is reduced by a floating-point ``slack`` before dividing, ⊥ wins
ties with ε, and the radius is computed in float64 and rounded down.

In estimate mode K comes from power iteration alone and the radii are
estimates, not certificates; the summary says so.
"""

from __future__ import annotations

import numpy as np

from glorocert.loaders import ROUNDING_RTOL


def radii(logits: np.ndarray, margin_matrix: np.ndarray, rounding_rtol: float = ROUNDING_RTOL):
    """Per sample: predicted class, runner-up (the class whose boundary is nearest), margin, radius.

    Vectorised over the batch with numpy (tiny arrays: torch's thread pool
    would cost more than the arithmetic); ``logits`` (N, C), ``margin_matrix`` (C, C).
    """
    y = np.asarray(logits, dtype=np.float64)
    k = np.asarray(margin_matrix, dtype=np.float64)
    n, c = y.shape
    rows = np.arange(n)
    predicted = y.argmax(axis=1)
    gaps = y[rows, predicted][:, None] - y  # y_j − y_i ≥ 0
    slack = rounding_rtol * (1.0 + np.abs(y).max(axis=1, keepdims=True))
    k_rows = k[predicted]  # K[j][·]
    safe = gaps - slack
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(k_rows > 0, safe / np.where(k_rows > 0, k_rows, 1.0), np.where(safe > 0, np.inf, -np.inf))
    ratio[rows, predicted] = np.inf
    runner_up = ratio.argmin(axis=1)
    radius = ratio[rows, runner_up]
    gaps[rows, predicted] = np.inf
    margin = gaps.min(axis=1)
    radius = np.where(margin <= 0, 0.0, radius)  # a tied top logit is never certified
    radius = np.maximum(np.nextafter(np.maximum(radius, 0.0), 0.0), 0.0)  # round down
    return predicted, runner_up, margin, radius


def bottom_flags(radius: np.ndarray, eps: float) -> np.ndarray:
    """⊥ at ε: the certified radius does not exceed ε (a tie counts as ⊥)."""
    return radius <= eps
