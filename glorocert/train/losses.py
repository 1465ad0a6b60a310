"""GloRo losses (Leino et al. 2021, §2.2 and §4.1) and the certification rule they train for.

Notation: ``y = f(x)`` are the C logits, ``j = argmax y`` the predicted class
(the first index on a tie), ``K[j, i]`` a Lipschitz constant of the margin
``y_j − y_i``. The GloRo net appends the ⊥ logit

    y_⊥ = max_{i≠j} ( y_i + ε · K[j, i] )

and predicts ⊥ whenever ``y_⊥ ≥ y_j``: then some class *might* overtake ``j``
inside the ε-ball. If ``y_⊥ < y_j`` and ``K`` bounds the true margin
constants, no input within l2 distance ε changes the prediction (Theorem 1,
tighter variant of Appendix A.2). A tie in the top logits is always ⊥
(``y_⊥ ≥ y_i + 0 = y_j``), and so is a tie between ``y_⊥`` and ``y_j``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glorocert.errors import GlorocertError

LOSSES = ("ce", "gloro", "trades", "emma")


def bottom_logit(logits: torch.Tensor, margin_lipschitz: torch.Tensor, eps: float) -> torch.Tensor:
    """The ⊥ logit ``max_{i≠j}(y_i + ε K[j, i])`` with ``j`` the first argmax (shape ``(N,)``)."""
    predicted = logits.argmax(dim=1)
    rows = margin_lipschitz[predicted]  # (N, C): K[j, :]
    candidates = logits + eps * rows
    own = F.one_hot(predicted, logits.shape[1]).bool()
    return candidates.masked_fill(own, float("-inf")).amax(dim=1)


def gloro_logits(logits: torch.Tensor, margin_lipschitz: torch.Tensor, eps: float) -> torch.Tensor:
    """``f̄^ε(x)``: the C logits followed by the ⊥ logit, shape ``(N, C + 1)``."""
    return torch.cat([logits, bottom_logit(logits, margin_lipschitz, eps)[:, None]], dim=1)


def certify_predictions(
    logits: torch.Tensor, margin_lipschitz: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted class, bottom flag)``: bottom when ``y_⊥ ≥ y_j`` (ties are not certified).

    Sound only when ``margin_lipschitz`` is an upper bound (the frozen bound);
    with the training-time estimates it is an estimate of the VRA.
    """
    predicted = logits.argmax(dim=1)
    top = logits.gather(1, predicted[:, None])[:, 0]
    return predicted, bottom_logit(logits, margin_lipschitz, eps) >= top


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy (standard-training baseline)."""
    return F.cross_entropy(logits, labels)


def gloro_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, margin_lipschitz: torch.Tensor, eps: float
) -> torch.Tensor:
    """Cross-entropy of the GloRo net: labels extended by a ⊥ class that is never the true one.

    Penalises a sample unless it is both predicted correctly and certified.
    """
    return F.cross_entropy(gloro_logits(logits, margin_lipschitz, eps), labels)


def gloro_trades(
    logits: torch.Tensor,
    labels: torch.Tensor,
    margin_lipschitz: torch.Tensor,
    eps: float,
    lam: float,
) -> torch.Tensor:
    """GloRo-TRADES (Definition 3): ``CE(f(x), y) + λ · KL(f(x) ‖ f̄^ε(x))``.

    The paper writes the divergence between the softmaxes of ``f̄`` and ``f``;
    as in the authors' code, the clean distribution ``softmax(f(x))`` padded
    with probability 0 for ⊥ is the reference ("the model's own prediction
    as ground truth") and ``softmax(f̄^ε(x))`` over C + 1 classes is compared
    to it: ``Σ_{i<C} p_i (log p_i − log q_i)`` — the only finite direction,
    since ``f`` gives ⊥ probability 0. Gradients flow through both sides.

    Computed in closed form: ``log p_i − log q_i = LSE(y, y_⊥) − LSE(y)`` is the same for every class, and
    the ``p_i`` sum to 1, so the divergence is ``log(1 + exp(y_⊥ − LSE(y))) = softplus(y_⊥ − LSE(y))`` —
    a few ops on (N,) instead of a softmax over C + 1 classes (the loss was a fifth of GloRo's extra cost
    per step on a 2C2F).
    """
    clean = F.cross_entropy(logits, labels)
    kl = F.softplus(bottom_logit(logits, margin_lipschitz, eps) - torch.logsumexp(logits, dim=1)).mean()
    return clean + lam * kl


def emma(logits: torch.Tensor, labels: torch.Tensor, margin_lipschitz: torch.Tensor, eps: float) -> torch.Tensor:
    """EMMA, Efficient Margin MAximization (Hu et al., NeurIPS 2023, "Unlocking Deterministic Robustness
    Certification on ImageNet", §4): cross-entropy of the logits with each other class raised by
    ``ε_i · K[y, i]``, where ``ε_i = clip((y_y − y_i) / K[y, i], 0.01·ε, ε)`` is held constant (no gradient).

    Unlike the GloRo loss, which raises only the ⊥ logit by the full ε·K against the *predicted* class,
    EMMA pushes every class pair by the radius it is already certified to (ε at most), so the gradient
    goes to the pairs that are nearly certified instead of being spent on the one worst pair; it uses the
    *label*'s row of K. The label's own logit is unchanged (K[y, y] = 0).
    """
    rows = margin_lipschitz[labels]  # (N, C): K[y, :]
    gap = logits.gather(1, labels[:, None]) - logits  # y_y − y_i
    pair_eps = (gap / (rows * eps).clamp_min(1e-8)).clamp(0.01, 1.0).detach() * eps
    return F.cross_entropy(logits + pair_eps * rows, labels)


def parse_loss(name: str) -> str:
    """Validate a loss name (exact match)."""
    if name not in LOSSES:
        raise GlorocertError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    return name


# -- training methods: GloRo; local-bound certifiers (train/local_losses.py); smoothing base models --

METHODS = ("gloro", "bcp", "kw", "gaussian", "macer")
SMOOTHING_METHODS = ("gaussian", "macer")


def parse_method(name: str) -> str:
    """Validate a training method name (exact match)."""
    if name not in METHODS:
        raise GlorocertError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return name


# -- randomized-smoothing base models (Cohen et al. 2019; MACER, Zhai et al. 2020) --

# Probabilities are kept this far from 0 and 1 before Φ⁻¹ (whose derivative explodes there).
MACER_PROB_CLAMP = 1e-6


def macer_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    sigma: float,
    beta: float = 16.0,
    gamma: float = 8.0,
    lam: float = 12.0,
    return_parts: bool = False,
):
    """MACER's objective (eq. 17, Algorithm 1) on ``logits`` of shape ``(N, k, C)`` (k noisy copies per input).

    * classification: ``−log ẑ^y`` with ``ẑ`` the softmax averaged over the k copies;
    * robustness: ``λ·σ/2 · max(γ − ξ̂, 0)`` with ``ξ̂ = Φ⁻¹(ẑ_β^y) − Φ⁻¹(max_{y'≠y} ẑ_β^{y'})``,
      ``ẑ_β`` the average of ``softmax(β·logits)``; only on samples whose smoothed top-1
      (argmax of ``ẑ_β``) is the label and whose ``ξ̂`` lies in ``(0, γ)``.

    As in the authors' code, β scales the logits of the robustness term only.
    Both terms are averaged over the N inputs. With ``return_parts`` also returns
    ``(classification, robustness)`` (each already divided by N; robustness includes λ).
    """
    if logits.ndim != 3:
        raise GlorocertError(f"macer_loss expects logits of shape (N, k, C), got {tuple(logits.shape)}")
    n = logits.shape[0]
    z = F.softmax(logits, dim=2).mean(dim=1)
    classification = F.nll_loss(torch.log(z.clamp_min(1e-10)), labels, reduction="sum") / n
    z_beta = F.softmax(beta * logits, dim=2).mean(dim=1)
    top2, top2_idx = z_beta.topk(2, dim=1)
    correct = top2_idx[:, 0] == labels
    p = top2.clamp(MACER_PROB_CLAMP, 1 - MACER_PROB_CLAMP)
    xi = torch.special.ndtri(p[:, 0]) - torch.special.ndtri(p[:, 1])
    active = correct & (xi > 0) & (xi < gamma)
    hinge = (gamma - xi).clamp_min(0) * active.to(xi.dtype)
    robustness = lam * (sigma / 2) * hinge.sum() / n
    loss = classification + robustness
    if return_parts:
        return loss, classification, robustness
    return loss


def gaussian_noise(shape, sigma: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``N(0, σ² I)`` noise drawn on the CPU from ``generator`` (same stream on every device)."""
    return (torch.randn(tuple(shape), generator=generator, dtype=torch.float32) * sigma).to(device)
