"""Shared pieces of the local-bound certifiers (BCP, Wong–Kolter): input checks,
chain extraction, per-graph caches, linear-op adjoints, the radius bisection
and a PGD attack used to test them.

Conventions shared by :mod:`glorocert.certify.bcp` and :mod:`glorocert.certify.kw`:

- ``x`` is ``(N, *graph.input_shape)`` in the space the graph reads (pixels in
  [0, 1] when the normalisation is the graph's first node); ``predicted`` is
  ``(N,)`` class indices; ``eps`` is an l2 radius (KW also takes l∞).
- Everything is computed in float64 on the IR. Bounds are finally lowered by
  ``ROUNDING_SLACK`` times the magnitude of the terms that were summed, so
  float64 rounding goes against certification, never for it (a pragmatic
  guard, far above the accumulation error of float64 at these sizes — not an
  interval-arithmetic proof).
- ``lower_bounds(...)[n, i]`` bounds ``min_{‖δ‖ ≤ ε} y_ŷ(x+δ) − y_i(x+δ)`` from
  below; the entry ``i = ŷ`` is ``+inf``. Certified ⟺ every entry > 0 (a tie
  counts as a change of prediction).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from glorocert.errors import GlorocertError
from glorocert.graph import Affine, Conv2d, Graph, Linear, Node, Op, Reshape

ROUNDING_SLACK = 1e-9
"""Relative slack (× the magnitude of the summed terms) subtracted from every lower bound."""

BISECTION_TOL = 1e-3
"""Default width of the final bisection interval on ε; the lower end is reported."""


def as_double(op: Op) -> Op:
    """The op with float64 parameters (the local certifiers compute in float64)."""
    if isinstance(op, Linear):
        return Linear(op.weight.double(), None if op.bias is None else op.bias.double())
    if isinstance(op, Conv2d):
        return Conv2d(op.weight.double(), None if op.bias is None else op.bias.double(),
                      op.stride, op.padding, op.dilation, op.groups)
    if isinstance(op, Affine):
        return Affine(op.scale.double(), op.shift.double())
    return op


def for_dtype(op: Op, dtype: torch.dtype) -> Op:
    """float64: :func:`as_double` (certification); any other dtype: the op itself, its tensors untouched (training)."""
    return as_double(op) if dtype == torch.float64 else op


# --------------------------------------------------------------------------- inputs


def check_inputs(
    graph: Graph, x: torch.Tensor, predicted: torch.Tensor, eps: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and convert: x → float64 (N, *shape), predicted → int64 (N,), eps → float64 (N,)."""
    x = torch.as_tensor(x)
    if tuple(x.shape[1:]) != tuple(graph.input_shape):
        raise GlorocertError(f"inputs have per-sample shape {tuple(x.shape[1:])}; the model expects {graph.input_shape}")
    x = x.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise GlorocertError("inputs contain NaN or inf")
    n = x.shape[0]
    predicted = torch.as_tensor(predicted).reshape(-1)
    if predicted.numel() != n:
        raise GlorocertError(f"{predicted.numel()} predictions for {n} inputs")
    if predicted.is_floating_point():
        if not torch.equal(predicted, predicted.round()):
            raise GlorocertError("predicted classes must be integers")
    predicted = predicted.to(torch.int64)
    classes = graph.num_classes
    if n and (predicted.min() < 0 or predicted.max() >= classes):
        raise GlorocertError(f"predicted classes must lie in [0, {classes}), got {predicted.min()}..{predicted.max()}")
    eps_t = torch.as_tensor(eps, dtype=torch.float64)
    if eps_t.dim() == 0:
        eps_t = eps_t.expand(n)
    eps_t = eps_t.reshape(-1)
    if eps_t.numel() != n:
        raise GlorocertError(f"{eps_t.numel()} radii for {n} inputs")
    if not (torch.isfinite(eps_t).all() and (eps_t >= 0).all()):
        raise GlorocertError(f"eps must be finite and ≥ 0, got {eps}")
    return x, predicted, eps_t.clone()


def chain(graph: Graph, method: str) -> list[Node]:
    """The graph's nodes as a straight chain, or a GlorocertError naming the first branching node."""
    previous = graph.input_name
    for node in graph.nodes:
        if node.op.arity != 1 or node.inputs != (previous,):
            raise GlorocertError(
                f"{method} handles sequential networks only: node {node.name!r} ({node.op.describe()}) "
                f"reads {list(node.inputs)}, not just the previous node {previous!r}"
            )
        previous = node.name
    if previous != graph.output:
        raise GlorocertError(f"{method}: the model output {graph.output!r} is not the last node of the chain")
    return list(graph.nodes)


# --------------------------------------------------------------------------- per-graph cache

_CACHE: dict[tuple[int, str], tuple[weakref.ref, object]] = {}


def cached(graph: Graph, key: str, build: Callable[[], object]) -> object:
    """``build()`` once per (graph object, key); entries die with the graph.

    A graph holding trainable tensors (``train.local_losses.live_graph``) changes under
    the optimiser, so its plans are rebuilt on every call instead of cached.
    """
    if any(isinstance(v, torch.Tensor) and v.requires_grad for node in graph.nodes for v in vars(node.op).values()):
        return build()
    slot = (id(graph), key)
    hit = _CACHE.get(slot)
    if hit is not None and hit[0]() is graph:
        return hit[1]
    value = build()
    _CACHE[slot] = (weakref.ref(graph, lambda _ref, slot=slot: _CACHE.pop(slot, None)), value)
    return value


# --------------------------------------------------------------------------- linear ops


def adjoint(op: Op, cotangent: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """Aᵀ·v for the homogeneous part A of a linear op, batched: (B, *out) → (B, *in)."""
    b = cotangent.shape[0]
    if isinstance(op, Reshape):
        return cotangent.reshape(b, *in_shape)
    if isinstance(op, Linear):
        return cotangent @ op.weight.to(cotangent.dtype)
    if isinstance(op, Affine):
        out = cotangent * op.scale.to(cotangent.dtype)
        return out.sum_to_size(b, *in_shape) if tuple(out.shape[1:]) != tuple(in_shape) else out
    if isinstance(op, Conv2d):
        t, bo, l, r = op.padding
        c, h, w = in_shape
        # the transposed convolution onto the padded input, then the padding cropped off; rows/columns the
        # forward never reached (the output_padding) get zero
        kh, kw = op.weight.shape[2:]
        reach_h = (cotangent.shape[2] - 1) * op.stride[0] + op.dilation[0] * (kh - 1) + 1
        reach_w = (cotangent.shape[3] - 1) * op.stride[1] + op.dilation[1] * (kw - 1) + 1
        extra = (h + t + bo - reach_h, w + l + r - reach_w)
        if max(extra) < min(op.stride) or extra == (0, 0):
            padded = F.conv_transpose2d(cotangent, op.weight.to(cotangent.dtype), None, op.stride, 0, extra,
                                        op.groups, op.dilation)
        else:
            padded = torch.nn.grad.conv2d_input(
                (b, c, h + t + bo, w + l + r), op.weight.to(cotangent.dtype), cotangent,
                op.stride, 0, op.dilation, op.groups,
            )
        return padded[:, :, t : t + h, l : l + w]
    # any other linear op (average pooling): reverse-mode through its forward at zero
    zero = torch.zeros(b, *in_shape, dtype=cotangent.dtype, requires_grad=True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(op.homogeneous(zero), zero, grad_outputs=cotangent)
    return grad


def above(lower: torch.Tensor, slack: float | torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) bool: every lower bound of a sample exceeds its ``slack`` (a float, or one per sample; ``index``
    selects the samples ``lower`` is for). The slack is the room callers keep for the gap between the IR
    and the model it was converted from (``glorocert.api``: the same rounding budget GloRo subtracts)."""
    slack = torch.as_tensor(slack, dtype=lower.dtype)
    if slack.dim() and index is not None:
        slack = slack[index]
    return (lower > slack.reshape(-1, 1)).all(dim=1)


# --------------------------------------------------------------------------- bisection


def bisect_radius(
    certified_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    n: int,
    *,
    eps_max: float,
    tol: float,
) -> torch.Tensor:
    """Per-sample certified radius by bisection on ε, float64 (N,).

    ``certified_at(index, eps)`` certifies samples ``index`` at radii ``eps``.
    The result is ``eps_max`` where ``eps_max`` certifies; otherwise the lower
    end of a final interval of width ≤ ``tol`` — a radius at which the
    certifier *was run and succeeded* (0 when it never succeeded), so the
    reported radius never rests on an untested ε, whatever the monotonicity of
    the certifier.
    """
    if not (math.isfinite(eps_max) and eps_max > 0):
        raise GlorocertError(f"eps_max must be a positive number, got {eps_max}")
    if not (math.isfinite(tol) and tol > 0):
        raise GlorocertError(f"tol must be a positive number, got {tol}")
    lo = torch.zeros(n, dtype=torch.float64)
    hi = torch.full((n,), float(eps_max), dtype=torch.float64)
    if n == 0:
        return lo
    everyone = torch.arange(n)
    at_max = certified_at(everyone, hi.clone())
    lo[at_max] = eps_max
    open_ = ~at_max
    while open_.any() and (hi[open_] - lo[open_]).max() > tol:
        index = everyone[open_]
        mid = (lo[index] + hi[index]) / 2
        ok = certified_at(index, mid)
        lo[index[ok]] = mid[ok]
        hi[index[~ok]] = mid[~ok]
        open_ = open_ & (hi - lo > tol)
    return lo


# --------------------------------------------------------------------------- attack (for tests and sanity checks)


def pgd_pair_margins(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    predicted: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    norm: str = "l2",
    steps: int = 100,
    restarts: int = 4,
    seed: int = 0,
) -> torch.Tensor:
    """Smallest y_ŷ − y_i found by projected gradient descent inside the ε-ball, (N, C).

    One targeted attack per (sample, class), ``restarts`` random starts each
    (the first starts at x), normalised-gradient steps on a cosine schedule
    summing to 2.5ε, projected back onto the ball after each step. An *upper*
    bound on the true minimum: every certified lower bound must stay below it.
    Entry i = ŷ is +inf. No clipping to [0, 1]: certificates are for the full ball.
    """
    x = x.detach().to(torch.float64)
    n = x.shape[0]
    with torch.no_grad():
        classes = forward(x[:1]).shape[1]
    eps_t = torch.as_tensor(eps, dtype=torch.float64).expand(n).reshape(n)
    gen = torch.Generator().manual_seed(seed)
    shape = x.shape[1:]
    # problems: restart × sample × class
    xs = x.unsqueeze(0).unsqueeze(2).expand(restarts, n, classes, *shape).reshape(-1, *shape)
    e = eps_t.view(1, n, 1).expand(restarts, n, classes).reshape(-1)
    pred = predicted.view(1, n, 1).expand(restarts, n, classes).reshape(-1)
    target = torch.arange(classes).view(1, 1, classes).expand(restarts, n, classes).reshape(-1)
    view = (-1,) + (1,) * len(shape)

    def project(delta):
        if norm == "l2":
            length = delta.flatten(1).norm(dim=1).clamp_min(1e-300)
            return delta * torch.clamp(e / length, max=1.0).view(view)
        return torch.maximum(torch.minimum(delta, e.view(view)), -e.view(view))

    delta = torch.randn(xs.shape, generator=gen, dtype=torch.float64)
    if norm == "l2":
        delta = delta / delta.flatten(1).norm(dim=1).view(view) * e.view(view) * torch.rand(
            xs.shape[0], generator=gen, dtype=torch.float64
        ).view(view)
    else:
        delta = (torch.rand(xs.shape, generator=gen, dtype=torch.float64) * 2 - 1) * e.view(view)
    delta[: n * classes] = 0.0  # first restart from the clean point
    best = torch.full((xs.shape[0],), math.inf, dtype=torch.float64)
    rows = torch.arange(xs.shape[0])
    for k in range(steps + 1):
        delta = delta.detach().requires_grad_(True)
        y = forward(xs + delta)
        margin = y[rows, pred] - y[rows, target]
        best = torch.minimum(best, margin.detach())
        if k == steps:
            break
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        step = 2.5 * e / max(steps, 1) * (1 + math.cos(math.pi * k / steps)) + 1e-12
        with torch.no_grad():
            if norm == "l2":
                g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-300).view(view)
                delta = project(delta - step.view(view) * g)
            else:
                delta = project(delta - step.view(view) * grad.sign())
    best = best.view(restarts, n, classes).amin(dim=0)
    best[torch.arange(n), predicted] = math.inf
    return best


def pgd_margin(forward, x, predicted, eps, **kwargs) -> torch.Tensor:
    """min over classes of :func:`pgd_pair_margins`: < 0 means an adversarial example was found."""
    return pgd_pair_margins(forward, x, predicted, eps, **kwargs).amin(dim=1)


__all__ = [
    "ROUNDING_SLACK", "BISECTION_TOL", "check_inputs", "chain", "cached", "adjoint",
    "bisect_radius", "pgd_pair_margins", "pgd_margin",
]
