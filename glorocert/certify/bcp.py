"""BCP — box constraint propagation (Lee, Lee & Park, NeurIPS 2020) as a local l2 certifier.

**Guarantee.** For a sequential graph of linear ops (Linear, Conv2d, Affine,
Reshape, average pooling) and monotone activations with a known Lipschitz
constant (ReLU, LeakyReLU with slope ≥ 0, tanh, sigmoid, identity), ending in
a linear layer, ``lower_bounds(graph, x, ŷ, ε)[n, i]`` is at most

    min_{‖δ‖₂ ≤ ε}  y_ŷ(x_n + δ) − y_i(x_n + δ)

for the function the IR computes, and ``certify`` is True only when every
such bound is > 0: then no input of the closed ball changes the prediction
(a tie counts as a change). Rounding: float64 throughout, then the
``local.ROUNDING_SLACK`` guard.

**Why it is sound**, step by step (the paper's §3.1–3.2 and Algorithm 1):

1. *Ball.* At every node h, ‖h(x+δ) − h(x)‖₂ ≤ ρ = ε·L_h, where L_h is the
   product of *guaranteed* operator-norm upper bounds (``lipschitz.compose``
   block bounds and ``lipschitz.operators.upper_bound``; never a
   power-iteration estimate) and activation constants.
2. *Box.* Interval arithmetic: if v ∈ [m − r, m + r] then Wv + b ∈
   [Wm + b − |W|r, Wm + b + |W|r]. The ball's bounding box after a Linear or
   Conv2d is h(x) ± ρ_in·‖W_o‖₂ (row norms; for a convolution the norm of
   output channel o's whole kernel, ≥ every row of that channel, padding
   included). Both boxes contain every reachable value, so their
   *intersection* does (the paper's eq. 8 prints max/min the other way round,
   which would be the hull; its text and Figure 1 describe the intersection).
3. *Activations* are nondecreasing: [lo, hi] ↦ [f(lo), f(hi)]; with constant c
   the ball maps into the ball (f(h(x)), c·ρ), and the box is intersected with
   that ball's bounding box again.
4. *Last linear layer* y = A h + b: y_ŷ − y_i = c·h + (b_ŷ − b_i) with
   c = A_ŷ − A_i and h in ball ∩ box. For every λ ≥ 0 the Lagrange dual

       g(λ) = min_{lo ≤ h ≤ hi}  c·h + λ/2 (‖h − z‖² − ρ²),   h_λ = clip(z − c/λ, lo, hi),

   is ≤ min over ball ∩ box (weak duality). The paper's clip-and-rescale loop
   (:func:`worst_case`) runs to termination — it terminates after at most
   dim + 1 checks, each non-final one clipping a new coordinate (Prop. 2) —
   and ends at the optimum h* = clip(z − t*c), where strong duality makes
   g(1/t*) the exact minimum. We report g(1/t*), a certified bound whatever
   rounding did to t*. A loop that hits the iteration limit, or produces NaN,
   is discarded (never an early-stopped iterate): the bound falls back to the
   larger of the ball-only (c·z − ρ‖c‖) and box-only (Σ min(c·lo, c·hi))
   bounds, both sound.
5. *Global bound.* margin − ε·K[ŷ][i] (GloRo's margin Lipschitz matrix from
   the same guaranteed composition) is sound too; the result is the max, so
   BCP is never looser than the global bound.

Cost: one interval forward pass (≈ 3 forward passes) per ε, plus the
worst-case loop on (N, C, d) at the penultimate layer. ``certified_radius``
bisects on ε (≈ log2(eps_max / tol) passes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from glorocert.certify import local
from glorocert.errors import GlorocertError
from glorocert.graph import Activation, Affine, AvgPool, Conv2d, GlobalAvgPool, Graph, Linear, Node, Reshape
from glorocert.lipschitz.compose import Composition, blocks_of, compose
from glorocert.lipschitz.operators import FLOAT_MARGIN, fits_in_memory, materialise, upper_bound

METHOD = "BCP"
MONOTONE = ("relu", "leaky_relu", "tanh", "sigmoid", "identity")
LINEAR_OPS = (Linear, Conv2d, Affine, Reshape, AvgPool, GlobalAvgPool)


# --------------------------------------------------------------------------- the worst-case point (Algorithm 1)


@dataclass
class WorstCase:
    """Result of :func:`worst_case`, all with the batch shape of ``c[..., 0]``."""

    value: torch.Tensor  # sound lower bound on min c·h over ball ∩ box
    point: torch.Tensor  # final iterate h (…, d) — diagnostic, never itself a certificate
    iterations: torch.Tensor  # box checks performed
    terminated: torch.Tensor  # the loop reached a point inside the box (False ⇒ fallback used)


def ball_bound(c, z, rho):
    """min c·h over ‖h − z‖ ≤ ρ."""
    return (c * z).sum(-1) - rho * c.norm(dim=-1)


def box_bound(c, lo, hi):
    """min c·h over lo ≤ h ≤ hi."""
    return torch.minimum(c * lo, c * hi).sum(-1)


def dual_bound(c, z, rho, lo, hi, t):
    """g(1/t) of the module docstring: a lower bound on min c·h over ball ∩ box for every t > 0.

    t = inf is λ = 0 (the box-only bound). NaN in, NaN out.
    """
    t_ = t.unsqueeze(-1)
    moved = torch.where(c == 0, z, z - t_ * c)
    h = torch.minimum(torch.maximum(moved, lo), hi)
    excess = ((h - z) ** 2).sum(-1) - rho**2
    penalty = torch.where(torch.isinf(t), torch.zeros_like(excess), excess / (2 * t))
    return (c * h).sum(-1) + penalty


def worst_case(c, z, rho, lo, hi, *, max_iterations: int | None = None) -> WorstCase:
    """min c·h subject to ‖h − z‖₂ ≤ ρ and lo ≤ h ≤ hi — BCP's clip-and-rescale loop, batched.

    ``c`` is (…, d); ``z``, ``lo``, ``hi`` broadcast against it; ``rho`` against (…).
    Start at the ball's minimiser h = z − ρc/‖c‖; while some coordinates lie
    outside the box, clip them (they stay clipped: along z − tc they only move
    further out as t grows) and rescale the free coordinates' offset so that h
    is back on the sphere, t ← √(ρ² − ‖h_I − z_I‖²)/‖c_free‖ (eq. 12). See the
    module docstring for why the returned value is sound. ``max_iterations``
    (default d + 1, which always suffices) exists to test the fallback.

    The loop only *finds* the multiplier t* (without gradients); the value is
    then g(1/t*), written with differentiable ops, so the same function gives
    the training loss its gradient (by the envelope theorem, g's partial
    derivatives at the optimum are the optimum's).
    """
    c, z, lo, hi = torch.broadcast_tensors(c, z, lo, hi)
    batch, d = c.shape[:-1], c.shape[-1]
    rho = torch.as_tensor(rho, dtype=c.dtype).expand(batch).reshape(-1)
    c, z, lo, hi = (v.reshape(-1, d) for v in (c, z, lo, hi))  # contiguous (B, d) copies
    fallback = torch.maximum(ball_bound(c, z, rho), box_bound(c, lo, hi))
    with torch.no_grad():
        t, point, iterations, done, degenerate = _multiplier(c, z, rho, lo, hi, d + 1 if max_iterations is None else max_iterations)
    # t = inf is the box-only bound, already in the fallback; a finite stand-in keeps gradients finite
    usable = done & ~degenerate & torch.isfinite(t)
    dual = dual_bound(c, z, rho, lo, hi, torch.where(usable, t, torch.ones_like(t)))
    usable = usable & ~torch.isnan(dual)
    value = torch.where(usable, torch.maximum(dual, fallback), fallback)
    return WorstCase(value.reshape(batch), point.reshape(*batch, d), iterations.reshape(batch), done.reshape(batch))


def _multiplier(c, z, rho, lo, hi, limit: int):
    """The clip-and-rescale loop on (B, d) problems: (t, final iterate, box checks, terminated, degenerate)."""
    norm_c = c.norm(dim=-1)
    # ρ = 0 or c = 0: the ball-only bound is exact (min over {z}, or the constant 0)
    degenerate = (norm_c == 0) | (rho == 0)
    t = torch.where(degenerate, torch.zeros_like(rho), rho / torch.where(degenerate, torch.ones_like(norm_c), norm_c))
    done = degenerate.clone()
    iterations = torch.zeros(t.shape, dtype=torch.int64)
    point = z - t.unsqueeze(-1) * c
    # the loop runs on the pairs still active only (most finish after one or two checks)
    index = (~done).nonzero().squeeze(1)
    ca, za, loa, hia, rhoa, ta = c[index], z[index], lo[index], hi[index], rho[index], t[index]
    clipped = torch.zeros(ca.shape, dtype=torch.bool)
    for _ in range(limit):
        if index.numel() == 0:
            break
        iterations[index] += 1
        moved = za - ta.unsqueeze(-1) * ca
        current = torch.where(clipped, torch.minimum(torch.maximum(moved, loa), hia), moved)
        point[index] = current
        outside = ~clipped & ((current < loa) | (current > hia))
        inside = ~outside.any(-1)
        # first phase: clip the coordinates that left the box; second: rescale the free part onto the sphere (eq. 12)
        clipped = clipped | outside
        offset = torch.where(clipped, current.clamp(min=loa, max=hia) - za, torch.zeros_like(za))
        free_norm = torch.where(clipped, torch.zeros_like(ca), ca).norm(dim=-1)
        t_next = torch.sqrt(rhoa**2 - (offset**2).sum(-1)) / free_norm  # ≥ t; inf when no free coordinate moves
        t[index] = torch.where(inside, ta, t_next)
        done[index] = inside
        keep = ~inside
        index, ca, za, loa, hia, rhoa, clipped = (v[keep] for v in (index, ca, za, loa, hia, rhoa, clipped))
        ta = t_next[keep]
    done = done & ~torch.isnan(t)
    return t, point, iterations, done, degenerate


# --------------------------------------------------------------------------- the plan (once per graph)


@dataclass
class _Step:
    node: Node
    in_shape: tuple[int, ...]
    lip_in: float  # guaranteed Lipschitz constant input → this node's input (needed by Linear / Conv2d / activations)
    lip_out: float  # … → this node's output (activations only)
    abs_op: object = None  # |W| version of Linear / Conv2d
    row_norms: torch.Tensor | None = None  # ‖W_o‖₂, broadcast over the output


@dataclass
class _Plan:
    steps: list[_Step]
    head: torch.Tensor  # A (C, d), the last linear segment
    head_bias: torch.Tensor  # (C,)
    lip_penultimate: float
    margin_lipschitz: torch.Tensor  # K (C, C)


def _check_node(node: Node) -> None:
    op = node.op
    if isinstance(op, Activation):
        if op.kind not in MONOTONE or (op.kind == "leaky_relu" and op.slope < 0):
            raise GlorocertError(
                f"{METHOD} needs monotone activations; node {node.name!r} is {op.describe()} "
                f"(supported: relu, leaky_relu with slope ≥ 0, tanh, sigmoid, identity)"
            )
        return
    if not isinstance(op, LINEAR_OPS):
        raise GlorocertError(
            f"{METHOD} does not support node {node.name!r} ({op.describe()}): it handles chains of "
            "Linear / Conv2d / Affine / Reshape / AvgPool and monotone activations (no MinMax, MaxPool, Add, Concat)"
        )


def check_graph(graph: Graph) -> list:
    """The graph's blocks, or a GlorocertError saying why BCP cannot bound it."""
    for node in local.chain(graph, METHOD):
        _check_node(node)
    blocks = blocks_of(graph)
    head = blocks[-1]
    if not (head.linear and head.name == graph.output):
        raise GlorocertError(f"{METHOD} needs the network to end with a linear layer; it ends with {head.description}")
    if not fits_in_memory(head.in_shape, head.out_shape):
        raise GlorocertError(f"{METHOD}: the last linear segment {head.in_shape}→{head.out_shape} is too large to materialise")
    return blocks


def _build_plan(graph: Graph, blocks: list, block_norm: Callable, margin: torch.Tensor, dtype=torch.float64) -> _Plan:
    """The propagation plan, given each linear block's operator-norm value and the margin matrix K.

    For certification these are guaranteed upper bounds (:func:`_sound_plan`);
    for training, differentiable power-iteration estimates (:func:`training_lower_bounds`).
    ``dtype`` float64 works on float64 versions of the parameters; any other dtype on the graph's own (live) tensors.
    """
    factor = 1.0 + FLOAT_MARGIN
    steps: list[_Step] = []
    lip = 1.0
    for block in blocks[:-1]:
        if block.linear:
            shape, preceding = block.in_shape, []
            for node in block.nodes:
                op = local.for_dtype(node.op, dtype)
                step = _Step(node, shape, math.nan, math.nan)
                if isinstance(op, (Linear, Conv2d)):
                    # ρ at this op's input: the bound of the ops before it in the segment (rarely any but Reshape/Affine)
                    step.lip_in = lip * math.prod(upper_bound(o, s)[0] * factor for o, s in preceding)
                    if isinstance(op, Linear):
                        step.abs_op = Linear(op.weight.abs())
                        step.row_norms = op.weight.norm(dim=1)
                    else:
                        step.abs_op = Conv2d(op.weight.abs(), None, op.stride, op.padding, op.dilation, op.groups)
                        step.row_norms = op.weight.flatten(1).norm(dim=1).view(-1, 1, 1)
                step.node = Node(node.name, op, node.inputs)
                steps.append(step)
                preceding.append((op, shape))
                shape = graph.shapes[node.name]
            lip = lip * block_norm(block)
        else:
            node = block.nodes[0]
            lip_out = lip * node.op.lipschitz
            steps.append(_Step(node, block.in_shape, lip, lip_out))
            lip = lip_out
    head = blocks[-1]
    head_ops = [local.for_dtype(node.op, dtype) for node in head.nodes]
    bias = torch.zeros(1, *head.in_shape, dtype=dtype)
    for op in head_ops:
        bias = op.forward(bias)

    def homogeneous(v):
        for op in head_ops:
            v = op.homogeneous(v)
        return v

    a = materialise(homogeneous, head.in_shape).to(dtype)  # (C, d)
    return _Plan(steps, a, bias.reshape(-1), lip, margin.to(dtype))


def _sound_plan(graph: Graph, composition: Composition | None) -> _Plan:
    blocks = check_graph(graph)  # refuse unsupported graphs before the (costly) composition
    if composition is None:
        # only the guaranteed values (block upper bounds, margin_upper) are read; they do not depend on
        # how long power iteration ran, so its estimate is kept short here
        composition = compose(graph, max_iter=200)
    upper = {b.name: b.upper for b in composition.blocks}
    margin = torch.tensor(composition.margin_upper, dtype=torch.float64)
    return _build_plan(graph, blocks, lambda block: upper[block.name], margin)


def _plan(graph: Graph, composition: Composition | None) -> _Plan:
    if composition is not None:
        return _sound_plan(graph, composition)
    return local.cached(graph, "bcp-plan", lambda: _sound_plan(graph, None))


# --------------------------------------------------------------------------- propagation


def propagate(plan: _Plan, x: torch.Tensor, eps: torch.Tensor):
    """Ball centre z, box [lo, hi] at the penultimate layer, flattened (N, d), and ρ (N,)."""
    n = x.shape[0]
    z, lo, hi = x, x - eps.view(-1, *[1] * (x.dim() - 1)), x + eps.view(-1, *[1] * (x.dim() - 1))
    for step in plan.steps:
        op = step.node.op
        view = (n,) + (1,) * (z.dim() - 1)
        if isinstance(op, Activation):
            z, lo, hi = op.forward(z), op.forward(lo), op.forward(hi)
            rho = (eps * step.lip_out).view(view)
            lo, hi = torch.maximum(lo, z - rho), torch.minimum(hi, z + rho)
            continue
        mid, rad = (lo + hi) / 2, (hi - lo) / 2
        if isinstance(op, Reshape):
            z, mid, rad = op.forward(z), op.forward(mid), op.forward(rad)
        elif isinstance(op, Affine):
            z, mid, rad = op.forward(z), op.forward(mid), rad * op.scale.to(rad.dtype).abs()
        elif isinstance(op, (AvgPool, GlobalAvgPool)):  # non-negative weights: |W| r = W r
            z, mid, rad = op.forward(z), op.forward(mid), op.homogeneous(rad)
        else:  # Linear, Conv2d
            z, mid, rad = op.forward(z), op.forward(mid), step.abs_op.homogeneous(rad)
        lo, hi = mid - rad, mid + rad
        if step.row_norms is not None:
            out_view = (n,) + (1,) * (z.dim() - 1)
            reach = (eps * step.lip_in).view(out_view) * step.row_norms
            lo, hi = torch.maximum(lo, z - reach), torch.minimum(hi, z + reach)
    return z.flatten(1), lo.flatten(1), hi.flatten(1), eps * plan.lip_penultimate


def _lower_bounds(plan: _Plan, x: torch.Tensor, predicted: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    z, lo, hi, rho = propagate(plan, x, eps)
    a, b = plan.head, plan.head_bias
    c = a[predicted].unsqueeze(1) - a.unsqueeze(0)  # (N, C, d)
    db = b[predicted].unsqueeze(1) - b.unsqueeze(0)  # (N, C)
    z3, lo3, hi3 = z.unsqueeze(1), lo.unsqueeze(1), hi.unsqueeze(1)
    local_bound = worst_case(c, z3, rho.unsqueeze(1), lo3, hi3).value + db
    margin = (c * z3).sum(-1) + db
    k = plan.margin_lipschitz[predicted]  # (N, C): K[ŷ][i]
    global_bound = margin - eps.unsqueeze(1) * k
    bound = torch.maximum(torch.nan_to_num(local_bound, nan=-math.inf), global_bound)
    magnitude = (c.abs() * (z3.abs() + lo3.abs() + hi3.abs())).sum(-1) + db.abs() + eps.unsqueeze(1) * (
        k + plan.lip_penultimate * c.norm(dim=-1)
    )
    bound = bound - local.ROUNDING_SLACK * magnitude
    bound[torch.arange(n), predicted] = math.inf
    return bound


# --------------------------------------------------------------------------- public API


def penultimate_bounds(graph: Graph, x: torch.Tensor, eps: float | torch.Tensor, *, composition: Composition | None = None):
    """(z, lo, hi, ρ) at the input of the last linear segment, flattened: ball centre, box, ball radius.

    Guarantee: for every ‖δ‖₂ ≤ ε the penultimate activation h(x + δ) satisfies
    lo ≤ h ≤ hi and ‖h − z‖₂ ≤ ρ.
    """
    x = torch.as_tensor(x)
    x, _, eps = local.check_inputs(graph, x, torch.zeros(x.shape[0], dtype=torch.int64), eps)
    with torch.no_grad():
        return propagate(_plan(graph, composition), x, eps)


def lower_bounds(
    graph: Graph, x: torch.Tensor, predicted: torch.Tensor, eps: float | torch.Tensor,
    *, composition: Composition | None = None,
) -> torch.Tensor:
    """(N, C) float64: lower bounds on min_{‖δ‖₂ ≤ ε} y_ŷ − y_i (module docstring); +inf at i = ŷ.

    ``eps`` is a float or a per-sample (N,) tensor. ``composition`` (optional)
    must be a *guaranteed* ``lipschitz.compose`` result for this graph; by
    default it is computed once per graph object and cached.
    """
    x, predicted, eps = local.check_inputs(graph, x, predicted, eps)
    plan = _plan(graph, composition)
    with torch.no_grad():
        return _lower_bounds(plan, x, predicted, eps)


def certify(
    graph: Graph, x: torch.Tensor, predicted: torch.Tensor, eps: float | torch.Tensor,
    *, composition: Composition | None = None, slack: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """(N,) bool: True ⟹ every input within l2 distance ε of x_n is classified ŷ_n by the IR
    (with every worst-case margin above ``slack``, see :func:`local.above`)."""
    return local.above(lower_bounds(graph, x, predicted, eps, composition=composition), slack)


def certified_radius(
    graph: Graph, x: torch.Tensor, predicted: torch.Tensor, *,
    eps_max: float = 4.0, tol: float = local.BISECTION_TOL, composition: Composition | None = None,
    slack: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """(N,) float64: an ε at which :func:`certify` succeeded (bisection, lower end, width ≤ tol); 0 if none.

    Guarantee: the prediction is constant on the closed l2 ball of the
    returned radius (and ``eps_max`` is returned when it certifies at eps_max).
    """
    x, predicted, _ = local.check_inputs(graph, x, predicted, 0.0)
    plan = _plan(graph, composition)

    def certified_at(index, eps):
        with torch.no_grad():
            return local.above(_lower_bounds(plan, x[index], predicted[index], eps), slack, index)

    return local.bisect_radius(certified_at, x.shape[0], eps_max=eps_max, tol=tol)


def training_lower_bounds(
    graph: Graph, x: torch.Tensor, labels: torch.Tensor, eps: float, *,
    block_norm: Callable, margin: torch.Tensor,
) -> torch.Tensor:
    """BCP's bounds as a differentiable training objective (the paper's worst-translated logits, eq. 13).

    Same propagation and worst-case point as :func:`lower_bounds`, but in
    ``x``'s dtype, on the graph's live parameters, with gradients, and with
    each linear block's norm (``block_norm(block)``) and the margin matrix
    ``margin`` supplied by the caller — during training, power-iteration
    *estimates*. The result therefore certifies nothing; the trained model is
    certified afterwards by :func:`certify` with guaranteed bounds.
    """
    plan = _build_plan(graph, check_graph(graph), block_norm, margin, dtype=x.dtype)
    eps_t = torch.full((x.shape[0],), float(eps), dtype=x.dtype)
    return _lower_bounds(plan, x, labels, eps_t)


__all__ = ["certify", "certified_radius", "lower_bounds", "training_lower_bounds", "penultimate_bounds", "worst_case", "WorstCase", "propagate",
           "ball_bound", "box_bound", "dual_bound"]
