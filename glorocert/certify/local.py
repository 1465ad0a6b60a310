"""Shared pieces of the local-bound certifiers (BCP, Wong–Kolter): input checks,
chain extraction, per-graph caches, linear-op adjoints and the radius bisection.

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


__all__ = [
    "ROUNDING_SLACK", "BISECTION_TOL", "check_inputs", "chain", "cached", "adjoint",
    "bisect_radius",
]
