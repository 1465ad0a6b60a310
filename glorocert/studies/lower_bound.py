"""How loose is the bound? Empirical lower bounds on the Lipschitz constants, and upper ÷ lower.

:func:`lipschitz_lower_bounds` maximises local Jacobian norms of f and of
every margin y_j − y_i by gradient ascent; any value found is attained at some
input, so it is a lower bound on the true constant, and upper ÷ lower brackets
the bound's looseness (GloRo paper, Fig. 4c).
"""

from __future__ import annotations

import numpy as np
import torch

from glorocert.api import Bound, Model, Normalization
from glorocert.errors import GlorocertError
from glorocert.graph import Graph
from glorocert.studies.audit import IRModule

LOWER_BOUND_SAMPLES = 64


def looseness(model: Model, bound: Bound, normalization: Normalization | None) -> dict:
    """Lower bounds found from 64 seeded uniform inputs, and how far the frozen bound lies above them.

    Returns ``global_lower``, ``global_ratio`` (upper ÷ lower) and the median and minimum of K[j][i] ÷ its
    lower bound over the off-diagonal pairs.
    """
    start = torch.rand(LOWER_BOUND_SAMPLES, *model.input_shape, generator=torch.Generator().manual_seed(0))
    found = lipschitz_lower_bounds(model.graph, start, normalization=normalization)
    k = bound.margin_matrix
    off = ~np.eye(len(k), dtype=bool)
    ratios = k[off] / np.maximum(np.asarray(found["margin_lower"])[off], 1e-300)
    return {"global_lower": found["global_lower"], "global_ratio": bound.lipschitz / found["global_lower"],
            "margin_ratio_median": float(np.median(ratios)), "margin_ratio_min": float(ratios.min())}


def lipschitz_lower_bounds(
    graph: Graph, samples: torch.Tensor, *, steps: int = 50, seed: int = 0, normalization: Normalization | None = None
) -> dict:
    """Empirical lower bounds: max over x (started at ``samples``) of ‖J_f(x)‖₂ and of ‖∇(y_j − y_i)(x)‖₂.

    Every value is attained at some x, so each is ≤ the true Lipschitz constant.
    """
    if samples.numel() == 0:
        raise GlorocertError("no samples to start the lower-bound search from")
    module = IRModule(graph, normalization).double()
    gen = torch.Generator().manual_seed(seed)
    x = samples.double().clone()
    c = graph.num_classes
    # margin: maximise ‖∇(y_j − y_i)‖ for every pair at once (one pair per copy of x)
    pairs = [(j, i) for j in range(c) for i in range(c) if i != j]
    margin_lower = np.zeros((c, c))
    start = x[torch.randint(len(x), (len(pairs),), generator=gen)]
    z = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([z], lr=0.01)
    sel_j = torch.tensor([p[0] for p in pairs])
    sel_i = torch.tensor([p[1] for p in pairs])
    for _ in range(steps):
        out = module(z)
        diff = out[torch.arange(len(pairs)), sel_j] - out[torch.arange(len(pairs)), sel_i]
        (grad,) = torch.autograd.grad(diff.sum(), z, create_graph=True)
        norms = grad.flatten(1).norm(dim=1)
        for k, (j, i) in enumerate(pairs):
            margin_lower[j, i] = max(margin_lower[j, i], norms[k].item())
        optimiser.zero_grad()
        (-norms.sum()).backward()
        optimiser.step()
        with torch.no_grad():
            z.clamp_(-0.5, 1.5)
    # global: ‖J_f(x)‖₂ by power iteration on JᵀJ at each start point
    global_lower = 0.0
    for point in x[: min(len(x), 32)]:
        point = point[None]
        v = torch.randn(point.shape, generator=gen, dtype=torch.float64)
        for _ in range(30):
            v = v / v.norm()
            _, jv = torch.func.jvp(module, (point,), (v,))
            _, pull = torch.func.vjp(module, point)
            (v,) = pull(jv)
        v = v / v.norm()
        _, jv = torch.func.jvp(module, (point,), (v,))
        global_lower = max(global_lower, jv.norm().item())
    return {"global_lower": max(global_lower, float(margin_lower.max()) / np.sqrt(2)), "margin_lower": margin_lower.tolist()}
