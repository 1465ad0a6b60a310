"""The Wong–Kolter dual network (ICML 2018) as a local certifier, for l2 and l∞ balls.

**Guarantee.** For a sequential ReLU network (Linear, Conv2d, Affine, Reshape,
average pooling, ReLU; ``identity`` activations are skipped),
``lower_bounds(graph, x, ŷ, ε)[n, i]`` is the dual objective J for the
specification c = e_ŷ − e_i, hence at most

    min  y_ŷ − y_i  over the LP relaxation of the network on the ε-ball around x_n
       ≤ min_{‖δ‖ ≤ ε}  y_ŷ(x_n + δ) − y_i(x_n + δ),

and ``certify`` is True only when every J > 0. ``norm="l2"`` (default) or
``"linf"``. Rounding: float64 throughout, then ``local.ROUNDING_SLACK``, on
the intermediate bounds too.

**What is computed** (the paper's Theorem 1, eqs. 7–10 and Algorithm 1).
Write the network as ẑ_{k+1} = W_k z_k + b_k, z_k = ReLU(ẑ_k). Given bounds
ℓ ≤ ẑ_k ≤ u, the ReLU is relaxed to its convex hull (z ≥ 0, z ≥ ẑ,
z ≤ u(ẑ − ℓ)/(u − ℓ)); the dual of "minimise cᵀẑ over the relaxation" is the
*dual network* — a backward pass ν̂_k = W_kᵀ ν_{k+1}, ν_k = D_k ν̂_k with
D = 0 / 1 / u/(u − ℓ) for inactive / active / crossing units (α = u/(u − ℓ),
eq. 8) — and its objective

    J = −Σ_k ν_{k+1}ᵀ b_k − xᵀν̂_1 − ε‖ν̂_1‖_* + Σ_k Σ_{j crossing} ℓ_{k,j} [ν_{k,j}]₊

is a lower bound on the relaxed (hence the true) minimum by weak duality
(‖·‖_* = l2 for the l2 ball, l1 for l∞). The bounds ℓ, u themselves are J for
c = ±e_j, computed layer by layer (eq. 9): for layer k the dual network is
run backwards from the identity on ẑ_k, which gives exactly the quantities
Algorithm 1 builds forwards (no random projections: these are the exact
bounds). Here the pass is done backwards, in the coefficient form
λᵀz ≥ λᵀDẑ + (terms in ℓ), which is the same algebra with ν = −λ.

**Cost.** Bounds for a layer of n units need n backward passes per sample
(the paper's "identity matrix" cost): memory O(n · size of the widest earlier
layer) per sample, chunked over samples. The first backward step of each
layer (through the linear segment just before it) does not depend on the
sample and is materialised once per graph — an explicit
(n_k × n_{k−1}) matrix, O(n²) memory: fine for MNIST-sized networks
(2C2F: 1568 × 3136 float64 ≈ 40 MB), refused above ``MAX_DENSE_ENTRIES``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from glorocert.certify import local
from glorocert.errors import GlorocertError
from glorocert.graph import Activation, Affine, AvgPool, Conv2d, GlobalAvgPool, Graph, Linear, Node, Reshape

METHOD = "KW (Wong–Kolter dual network)"
NORMS = {"l2": 2.0, "linf": 1.0}  # ball norm → dual norm order
LINEAR_OPS = (Linear, Conv2d, Affine, Reshape, AvgPool, GlobalAvgPool)
MAX_DENSE_ENTRIES = 60_000_000  # 480 MB of float64 for one materialised backward step
CHUNK_ENTRIES = 16_000_000  # per-chunk size of the (samples × units × width) backward tensor


# --------------------------------------------------------------------------- the network as segments and ReLUs


@dataclass
class _Segment:
    """A maximal run of linear ops: v ↦ W v + b, from in_shape to out_shape."""

    ops: list
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def forward(self, v):
        for op in self.ops:
            v = op.forward(v)
        return v

    def __post_init__(self):
        self.op_in_shapes = [self.in_shape]  # the input shape of every op
        for op in self.ops[:-1]:
            zero = torch.zeros(1, *self.op_in_shapes[-1], dtype=torch.float64)
            self.op_in_shapes.append(tuple(op.homogeneous(zero).shape[1:]))

    def adjoint(self, lam):
        """(B, *out) → (B, *in): Wᵀλ row by row."""
        for op, shape in zip(reversed(self.ops), reversed(self.op_in_shapes)):
            lam = local.adjoint(op, lam, shape)
        return lam


@dataclass
class _Plan:
    segments: list[_Segment]  # K + 1 segments around K ReLUs
    relu_names: list[str]
    biases: list[torch.Tensor]  # per segment, flattened (out,)
    identity_back: list[torch.Tensor]  # per ReLU k: segment k−1's Wᵀ applied to the identity, (n_k, *in_{k−1})
    head_back: torch.Tensor  # (C, *in_K)


def _identity_back(segment: _Segment, dtype) -> torch.Tensor:
    n = math.prod(segment.out_shape)
    m = math.prod(segment.in_shape)
    rows, chunk = [], max(1, min(n, 4_000_000 // max(n, m)))
    for start in range(0, n, chunk):  # the identity, a block of rows at a time
        k = min(chunk, n - start)
        basis = torch.zeros(k, n, dtype=dtype)
        basis[torch.arange(k), torch.arange(start, start + k)] = 1.0
        rows.append(segment.adjoint(basis.reshape(k, *segment.out_shape)))
    return torch.cat(rows)


def _build_plan(graph: Graph, dtype=torch.float64) -> _Plan:
    """float64 works on float64 versions of the parameters; any other dtype on the graph's own (live, differentiable) tensors."""
    nodes: list[Node] = local.chain(graph, METHOD)
    segments, relu_names, current, shape = [], [], [], graph.input_shape
    seg_in = shape
    for node in nodes:
        op = node.op
        if isinstance(op, Activation) and op.kind == "relu":
            segments.append(_Segment(current, seg_in, shape))
            relu_names.append(node.name)
            current, seg_in = [], graph.shapes[node.name]
        elif isinstance(op, Activation) and op.kind == "identity":
            pass
        elif isinstance(op, LINEAR_OPS):
            current.append(local.for_dtype(op, dtype))
        else:
            raise GlorocertError(
                f"{METHOD} supports ReLU networks only (Linear, Conv2d, Affine, Reshape, AvgPool, ReLU): "
                f"node {node.name!r} is {op.describe()}"
            )
        shape = graph.shapes[node.name]
    segments.append(_Segment(current, seg_in, shape))
    if len(graph.output_shape) != 1:
        raise GlorocertError(f"{METHOD}: the model output has shape {graph.output_shape}; a classifier outputs (classes,)")
    widest = 0
    for seg in segments:  # the backward pass for a layer holds (its units × the widest layer below it) per sample
        widest = max(widest, math.prod(seg.in_shape))
        if math.prod(seg.out_shape) * widest > MAX_DENSE_ENTRIES:
            raise GlorocertError(
                f"{METHOD}: exact bounds for the layer {seg.in_shape}→{seg.out_shape} need "
                f"{math.prod(seg.out_shape)}×{widest} coefficients per sample (O(n²) memory, limit "
                f"{MAX_DENSE_ENTRIES:,}); the network is too large for exact KW bounds"
            )
    biases = [seg.forward(torch.zeros(1, *seg.in_shape, dtype=dtype)).reshape(-1) for seg in segments]
    identity_back = [_identity_back(seg, dtype) for seg in segments[:-1]]
    head_back = _identity_back(segments[-1], dtype)
    return _Plan(segments, relu_names, biases, identity_back, head_back)


def _plan(graph: Graph) -> _Plan:
    return local.cached(graph, "kw-plan", lambda: _build_plan(graph))


# --------------------------------------------------------------------------- the dual network


def _relaxation(lower: torch.Tensor, upper: torch.Tensor):
    """D (slopes) and D·ℓ on crossing units (0 elsewhere), eq. (10)."""
    crossing = (lower < 0) & (upper > 0)
    slope = torch.where(upper <= 0, torch.zeros_like(upper), torch.ones_like(upper))
    slope = torch.where(crossing, upper / torch.where(crossing, upper - lower, torch.ones_like(upper)), slope)
    offset = torch.where(crossing, slope * lower, torch.zeros_like(lower))
    return slope, offset


def _backward(plan: _Plan, lam, const, magnitude, start: int, relax, x, eps, q):
    """Run the dual network from the input of segment ``start`` down to the input.

    ``lam`` holds the coefficients λ of R linear functions of that segment's
    input (the output of ReLU ``start``, or x when ``start = 0``): either
    (N, R, *shape) per sample, or (R, *shape) shared by all N samples (the
    identity pushed through the segment above, before any ReLU made it
    sample-dependent). ``const`` (N, R) is their constant, ``magnitude`` (N, R)
    the running sum of |terms| for the rounding slack. Returns (lower, upper)
    bounds of the functions over the relaxation, each (N, R).
    """
    n = x.shape[0]
    shared = lam.dim() == len(plan.segments[start].in_shape) + 1
    rows = lam.shape[0] if shared else lam.shape[1]
    low_extra = torch.zeros(n, rows, dtype=x.dtype)
    up_extra = torch.zeros(n, rows, dtype=x.dtype)
    for k in range(start, 0, -1):  # through ReLU k (relax[k − 1]), then segment k − 1
        slope, offset = (v.flatten(1) for v in relax[k - 1])  # (N, W); offset = d·ℓ ≤ 0 on crossing units
        bias = plan.biases[k - 1]
        # λ_j z_j ≥ λ_j d_j ẑ_j + [−λ_j]₊ d_j ℓ_j  and  λ_j z_j ≤ λ_j d_j ẑ_j − [λ_j]₊ d_j ℓ_j, with
        # [∓λ]₊ = (|λ| ∓ λ)/2: two products with |λ| and λ give both, plus the bias term of the segment below
        with_abs = torch.stack([offset, slope * bias.abs()], dim=-1)  # (N, W, 2)
        with_sign = torch.stack([offset, slope * bias], dim=-1)
        if shared:
            flat = lam.flatten(1)  # (R, W)
            a = torch.einsum("rw,nwk->nrk", flat.abs(), with_abs)
            b = torch.einsum("rw,nwk->nrk", flat, with_sign)
            lam = lam.unsqueeze(0) * slope.view(n, 1, *lam.shape[1:])
            shared = False
        else:
            flat = lam.flatten(2)  # (N, R, W)
            a = torch.bmm(flat.abs(), with_abs)
            b = torch.bmm(flat, with_sign)
            lam = lam * slope.view(n, 1, *lam.shape[2:])
        low_extra += (a[..., 0] - b[..., 0]) / 2
        up_extra -= (a[..., 0] + b[..., 0]) / 2
        magnitude = magnitude - a[..., 0] + a[..., 1]
        const = const + b[..., 1]
        seg = plan.segments[k - 1]
        lam = seg.adjoint(lam.reshape(n * rows, *seg.out_shape)).reshape(n, rows, *seg.in_shape)
    x_flat = x.flatten(1)
    if shared:
        flat = lam.flatten(1)
        centre = x_flat @ flat.T + const
        spread = eps.view(-1, 1) * flat.norm(p=q, dim=-1)
        magnitude = magnitude + x_flat.abs() @ flat.abs().T
    else:
        flat = lam.flatten(2)
        centre = torch.bmm(flat, x_flat.unsqueeze(-1)).squeeze(-1) + const
        spread = eps.view(-1, 1) * flat.norm(p=q, dim=-1)
        magnitude = magnitude + torch.bmm(flat.abs(), x_flat.abs().unsqueeze(-1)).squeeze(-1)
    magnitude = magnitude + const.abs() + spread
    slack = local.ROUNDING_SLACK * magnitude
    return centre + low_extra - spread - slack, centre + up_extra + spread + slack


def _chunks(n: int, rows: int, width: int):
    size = max(1, CHUNK_ENTRIES // max(1, rows * width))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _bounds_and_spec(plan: _Plan, x, eps, q, spec_rows=None):
    """Pre-activation bounds of every ReLU, and (when ``spec_rows`` (N, C, C) is given) J for those rows."""
    n = x.shape[0]
    relax, bounds = [], []
    widest = math.prod(plan.segments[0].in_shape)
    for k, back in enumerate(plan.identity_back):  # bounds of ReLU k+1's input = segment k's output
        seg = plan.segments[k]
        widest = max(widest, math.prod(seg.in_shape))
        rows = back.shape[0]
        lower = torch.empty(n, rows, dtype=x.dtype)
        upper = torch.empty(n, rows, dtype=x.dtype)
        for part in _chunks(n, rows, widest) if k > 0 else [slice(0, n)]:
            m = part.stop - part.start
            const = plan.biases[k].unsqueeze(0).expand(m, rows)
            magnitude = torch.zeros(m, rows, dtype=x.dtype)
            sub_relax = [(s[part], o[part]) for s, o in relax]
            lower[part], upper[part] = _backward(plan, back, const, magnitude, k, sub_relax, x[part], eps[part], q)
        lower, upper = lower.view(n, *seg.out_shape), upper.view(n, *seg.out_shape)
        bounds.append((lower, upper))
        relax.append(_relaxation(lower, upper))
    if spec_rows is None:
        return bounds, None
    head = plan.segments[-1]
    widest = max(widest, math.prod(head.in_shape))
    classes = spec_rows.shape[1]
    out = torch.empty(n, classes, dtype=x.dtype)
    k = len(plan.identity_back)
    for part in _chunks(n, classes, widest):
        rows = spec_rows[part]  # (m, C, C): row i is e_ŷ − e_i on the output
        lam = torch.einsum("mio,o...->mi...", rows, plan.head_back)
        const = rows @ plan.biases[k]
        magnitude = rows.abs() @ plan.biases[k].abs()
        sub_relax = [(s[part], o[part]) for s, o in relax]
        out[part], _ = _backward(plan, lam, const, magnitude, k, sub_relax, x[part], eps[part], q)
    return bounds, out


def _norm_order(norm: str) -> float:
    if norm not in NORMS:
        raise GlorocertError(f"{METHOD}: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return NORMS[norm]


def _lower_bounds(plan: _Plan, x, predicted, eps, q) -> torch.Tensor:
    n = x.shape[0]
    classes = plan.head_back.shape[0]
    eye = torch.eye(classes, dtype=x.dtype)
    spec = eye[predicted].unsqueeze(1) - eye.unsqueeze(0)  # (N, C, C)
    _, bound = _bounds_and_spec(plan, x, eps, q, spec)
    bound = torch.nan_to_num(bound, nan=-math.inf)
    bound[torch.arange(n), predicted] = math.inf
    return bound


# --------------------------------------------------------------------------- public API


def layer_bounds(graph: Graph, x: torch.Tensor, eps: float | torch.Tensor, *, norm: str = "l2"):
    """[(ℓ, u)] for the input of every ReLU, in order, each (N, *shape): Algorithm 1's bounds.

    Guarantee: ℓ ≤ ẑ(x + δ) ≤ u for every ‖δ‖ ≤ ε (``norm``).
    """
    q = _norm_order(norm)
    x = torch.as_tensor(x)
    x, _, eps = local.check_inputs(graph, x, torch.zeros(x.shape[0], dtype=torch.int64), eps)
    with torch.no_grad():
        bounds, _ = _bounds_and_spec(_plan(graph), x, eps, q)
    return bounds


def lower_bounds(
    graph: Graph, x: torch.Tensor, predicted: torch.Tensor, eps: float | torch.Tensor, *, norm: str = "l2"
) -> torch.Tensor:
    """(N, C) float64: the dual objective J for c = e_ŷ − e_i, a lower bound on min y_ŷ − y_i; +inf at i = ŷ."""
    q = _norm_order(norm)
    x, predicted, eps = local.check_inputs(graph, x, predicted, eps)
    plan = _plan(graph)
    if x.shape[0] == 0:
        return torch.empty(0, plan.head_back.shape[0], dtype=torch.float64)
    with torch.no_grad():
        return _lower_bounds(plan, x, predicted, eps, q)


def certify(
    graph: Graph, x: torch.Tensor, predicted: torch.Tensor, eps: float | torch.Tensor, *, norm: str = "l2",
    slack: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """(N,) bool: True ⟹ every input within distance ε (``norm``) of x_n is classified ŷ_n by the IR
    (with every J above ``slack``, see :func:`local.above`)."""
    return local.above(lower_bounds(graph, x, predicted, eps, norm=norm), slack)


def certified_radius(
    graph: Graph, x: torch.Tensor, predicted: torch.Tensor, *,
    eps_max: float = 4.0, tol: float = local.BISECTION_TOL, norm: str = "l2", slack: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """(N,) float64: an ε at which :func:`certify` succeeded (bisection, lower end, width ≤ tol); 0 if none.

    J is not provably monotone in ε (α = u/(u − ℓ) moves with the bounds), so
    the bisection only ever reports a radius it actually certified; the
    prediction is then constant on the closed ball of that radius.
    """
    q = _norm_order(norm)
    x, predicted, _ = local.check_inputs(graph, x, predicted, 0.0)
    plan = _plan(graph)

    def certified_at(index, eps):
        with torch.no_grad():
            return local.above(_lower_bounds(plan, x[index], predicted[index], eps, q), slack, index)

    return local.bisect_radius(certified_at, x.shape[0], eps_max=eps_max, tol=tol)


def training_lower_bounds(graph: Graph, x: torch.Tensor, labels: torch.Tensor, eps: float, *, norm: str = "l2") -> torch.Tensor:
    """J as a differentiable training objective (the paper's robust loss is CE(−J, y)).

    The same dual network as :func:`lower_bounds`, rebuilt on every call from
    the graph's live parameters, in ``x``'s dtype (float32 in training), with
    gradients. Exact bounds (no random projections): the cost is that of
    certification, O(units²) per sample, so it suits small networks.
    """
    q = _norm_order(norm)
    plan = _build_plan(graph, dtype=x.dtype)
    eps_t = torch.full((x.shape[0],), float(eps), dtype=x.dtype)
    return _lower_bounds(plan, x, labels, eps_t, q)


__all__ = ["certify", "certified_radius", "lower_bounds", "training_lower_bounds", "layer_bounds", "NORMS"]
