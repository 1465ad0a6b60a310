"""Training objectives of the local-bound certifiers: BCP (Lee et al. 2020, eq. 13) and the
Wong–Kolter robust loss (2018, Theorem 2), for ``glorocert train --method bcp|kw``.

Both bound, for every class i ≠ y, the worst margin

    m_i ≤ min_{‖δ‖₂ ≤ ε} y_y(x + δ) − y_i(x + δ)

with the very code that certifies (:mod:`glorocert.certify.bcp`,
:mod:`glorocert.certify.kw`), run on the model's live parameters with
gradients. Cross-entropy of the worst-translated logits z̲ (z̲_y = z_y,
z̲_i = z_y − m_i) is

    L(z̲, y) = log(1 + Σ_{i≠y} exp(−m_i)),

which is BCP's L(z̲(x), y) and KW's L(−J_ε(x, e_y1ᵀ − I), y) alike. The
objective is (1 − κ)·CE(z, y) + κ·L, κ being BCP's mixing weight λ (KW: κ = 1),
with ε and κ ramped by the schedules of :mod:`glorocert.train.schedules`.

BCP needs each layer's spectral norm: during training these are the
persistent power-iteration *estimates* (as in the paper), so neither the
loss nor the per-epoch VRA is a certificate. The trained model is certified
afterwards with guaranteed bounds (``glorocert certify --method bcp|kw``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glorocert.certify import bcp, kw
from glorocert.errors import GlorocertError
from glorocert.graph import Activation, Conv2d, Graph, Linear, Node, Reshape
from glorocert.train.power import PowerIteration

METHODS = ("bcp", "kw")
KW_EVAL_SAMPLES = 200
"""Held-out samples the per-epoch KW VRA is measured on (exact KW bounds cost O(units²) per sample);
the model card's sound KW VRA uses the whole held-out split."""


def live_graph(model: nn.Sequential, input_shape) -> Graph:
    """The IR of a trainer-built ReLU net whose ops hold the model's own parameters (gradients flow)."""
    nodes, previous = [], "input"
    for index, module in enumerate(model):
        if isinstance(module, nn.Conv2d) and not isinstance(module.padding, str):
            ph, pw = module.padding
            op = Conv2d(module.weight, module.bias, tuple(module.stride), (ph, ph, pw, pw),
                        tuple(module.dilation), module.groups)
        elif isinstance(module, nn.Linear):
            op = Linear(module.weight, module.bias)
        elif isinstance(module, nn.Flatten):
            op = Reshape((-1,))
        elif isinstance(module, nn.ReLU):
            op = Activation("relu")
        else:
            raise GlorocertError(
                f"--method bcp|kw trains ReLU networks: layer {index} is {type(module).__name__} "
                "(use --activation relu)"
            )
        nodes.append(Node(str(index), op, (previous,)))
        previous = str(index)
    return Graph("input", tuple(input_shape), nodes, previous)


def check_supported(method: str, graph: Graph) -> None:
    """Refuse, before training starts (and before anything is written), a network the method cannot bound."""
    with torch.no_grad():
        if method == "kw":
            kw.training_lower_bounds(graph, torch.zeros(1, *graph.input_shape), torch.zeros(1, dtype=torch.int64), 0.0)
        else:
            bcp.check_graph(graph)


def lower_bounds(method: str, graph: Graph, power: PowerIteration, x: torch.Tensor, labels: torch.Tensor,
                 eps: float, estimates: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C) differentiable lower bounds m_i on the worst margins (+inf at the label); BCP's layer norms are
    ``estimates`` (a training step's), by default those of the current iterates."""
    if method == "kw":
        return kw.training_lower_bounds(graph, x, labels, eps)
    if estimates is None:
        estimates = power.layer_estimates()
    position = {index: k for k, index in enumerate(power.layer_indices)}

    def block_norm(block):
        norm = estimates.new_ones(())
        for node in block.nodes:
            if isinstance(node.op, (Linear, Conv2d)):
                norm = norm * estimates[position[int(node.name)]]
        return norm

    return bcp.training_lower_bounds(graph, x, labels, eps, block_norm=block_norm, margin=power.margin_matrix(estimates[:-1]))


def robust_cross_entropy(lower: torch.Tensor) -> torch.Tensor:
    """Mean of log(1 + Σ_{i≠y} exp(−m_i)): cross-entropy of the worst-translated logits."""
    zero = lower.new_zeros(lower.shape[0], 1)
    return torch.logsumexp(torch.cat([zero, -lower], dim=1), dim=1).mean()


def mixed_loss(logits: torch.Tensor, labels: torch.Tensor, lower: torch.Tensor, kappa: float) -> torch.Tensor:
    """(1 − κ)·CE(z, y) + κ·L(z̲, y) — BCP's eq. 13; κ = 1 is the Wong–Kolter robust loss."""
    robust = robust_cross_entropy(lower)
    if kappa >= 1.0:
        return robust
    return (1.0 - kappa) * F.cross_entropy(logits, labels) + kappa * robust


@torch.no_grad()
def evaluate(method: str, graph: Graph, power: PowerIteration, model: nn.Module, x: torch.Tensor,
             y: torch.Tensor, eps: float, batch_size: int = 1000) -> dict[str, float]:
    """Clean accuracy, VRA and uncertified rate at ``eps`` under the method's own training-time bounds.

    BCP uses power-iteration estimates of the layer norms, so its VRA is an
    estimate; the model card reports the sound one.
    """
    was_training = model.training
    model.eval()
    correct = certified_correct = uncertified = 0
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        predicted = model(xb).argmax(dim=1)
        certified = (lower_bounds(method, graph, power, xb, predicted, eps) > 0).all(dim=1)
        hit = predicted == yb
        correct += int(hit.sum())
        certified_correct += int((hit & certified).sum())
        uncertified += int((~certified).sum())
    model.train(was_training)
    n = x.shape[0]
    return {"clean_acc": correct / n, "vra": certified_correct / n, "bottom_rate": uncertified / n}


__all__ = ["METHODS", "KW_EVAL_SAMPLES", "check_supported", "live_graph", "lower_bounds", "robust_cross_entropy", "mixed_loss", "evaluate"]
