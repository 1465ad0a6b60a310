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
import torch

# The native forward runs in float32. Its rounding error, relative to the
# logits' scale, is budgeted here (and raised to the measured IR/native gap
# when that is larger) and subtracted from every margin.
ROUNDING_RTOL = 1e-5


def radii(logits: np.ndarray, margin_matrix: np.ndarray, rounding_rtol: float = ROUNDING_RTOL):
    """Per sample: predicted class, runner-up (the class whose boundary is nearest), margin, radius.

    Vectorised over the batch; ``logits`` (N, C), ``margin_matrix`` (C, C).
    """
    y = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    k = torch.as_tensor(margin_matrix, dtype=torch.float64)
    n, c = y.shape
    predicted = y.argmax(dim=1)
    top = y.gather(1, predicted[:, None])
    gaps = top - y  # y_j − y_i ≥ 0
    slack = rounding_rtol * (1.0 + y.abs().amax(dim=1, keepdim=True))
    k_rows = k[predicted]  # K[j][·]
    ratio = (gaps - slack) / k_rows
    ratio = torch.where(k_rows == 0, torch.where(gaps - slack > 0, torch.inf, -torch.inf), ratio)
    own = torch.nn.functional.one_hot(predicted, c).bool()
    ratio = ratio.masked_fill(own, torch.inf)
    radius, runner_up = ratio.min(dim=1)
    tied = ((gaps == 0) & ~own).any(dim=1)
    radius = torch.where(tied, torch.zeros_like(radius), radius).clamp_min(0.0)
    radius = torch.nextafter(radius, torch.zeros_like(radius)).clamp_min(0.0)  # round down
    margin = gaps.masked_fill(own, torch.inf).min(dim=1).values if c > 1 else torch.full((n,), torch.inf)
    return predicted.numpy(), runner_up.numpy(), margin.numpy(), radius.numpy()


def bottom_flags(radius: np.ndarray, eps: float) -> np.ndarray:
    """⊥ at ε: the certified radius does not exceed ε (a tie counts as ⊥)."""
    return radius <= eps
