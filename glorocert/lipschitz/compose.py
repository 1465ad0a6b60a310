"""Compose per-operator bounds over the DAG into a global bound and a margin matrix.

1. The graph is cut into *blocks*: maximal chains of linear ops with nothing
   nonlinear between them (conv → BatchNorm, normalisation → conv, Flatten →
   Linear) become one linear segment, bounded as one operator — exactly when
   it is small enough to materialise, otherwise as the product of its ops'
   bounds after folding per-channel scales into the adjacent conv/linear
   weights. Every other node is a block of its own.
2. Bounds compose along the DAG: L(out) = L(segment)·L(in) for a segment,
   c·L(in) for an activation with constant c (1 for MinMax, GroupSort, Sort,
   ReduceMax/Min and CReLU), √m·L(in) for max pooling whose windows share an
   input up to m times, |c|·√(a·κ)·L(in) for l2-norm pooling c·√(a·avg(x²) + b)
   (κ ≤ m/d for windows of divisor d: :func:`l2pool_lipschitz`), L(a) + L(b)
   at an Add, and √(L(a)² + L(b)²) at a Concat. A residual Add, a + B(a) with B a linear segment
   read only by the Add, is bounded as ONE operator I + B (:func:`bound_residual`): L = ‖I + B‖·L(a),
   which can be far below (1 + ‖B‖)·L(a).
3. The margin matrix K[j][i] bounds the Lipschitz constant of y_j − y_i.
   When the graph ends with a linear segment A (e.g. the last dense layer),
   K[j][i] = ‖A_j − A_i‖₂ · L(input of A) (GloRo, Appendix A.2); otherwise
   y_j − y_i = (e_j − e_i)ᵀ f(x) gives K[j][i] = √2 · L.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from glorocert.graph import (
    Activation, Add, Affine, Concat, Conv2d, CReLU, Graph, GroupMinMax, L2Pool, Linear, MaxPool, MinMax, Node, PReLU,
    Reduce, Reshape, Sort, Transpose,
)
from glorocert.lipschitz import conv_bounds
from glorocert.lipschitz import operators as ops_bounds
from glorocert.lipschitz.lanczos import lanczos_estimate
from glorocert.lipschitz.operators import FLOAT_MARGIN


@dataclass
class Block:
    nodes: list[Node]
    inputs: tuple[str, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    linear: bool

    @property
    def name(self) -> str:
        return self.nodes[-1].name

    @property
    def description(self) -> str:
        return " → ".join(n.op.describe() for n in self.nodes)

    def homogeneous(self, x: torch.Tensor) -> torch.Tensor:
        for node in self.nodes:
            x = node.op.homogeneous(x)
        return x


@dataclass
class BlockBound:
    name: str
    op: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    estimate: float  # power iteration / Lanczos, from below (or exact constant for nonlinear blocks)
    upper: float  # guaranteed
    method: str
    iterations: int = 0
    converged: bool = True


@dataclass
class Composition:
    blocks: list[BlockBound]
    global_estimate: float
    global_upper: float
    margin_estimate: list[list[float]]
    margin_upper: list[list[float]]
    margin_method: str
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def blocks_of(graph: Graph) -> list[Block]:
    consumers = graph.consumers()
    blocks: list[Block] = []
    open_segment: dict[str, Block] = {}  # last node name → its open linear segment
    for node in graph.nodes:
        shape_in = graph.shapes[node.inputs[0]]
        if node.op.linear and node.op.arity == 1:
            src = node.inputs[0]
            seg = open_segment.pop(src, None)
            if seg is not None and consumers[src] == [node.name] and src != graph.output:
                seg.nodes.append(node)
                seg.out_shape = graph.shapes[node.name]
                open_segment[node.name] = seg
                continue
            seg = Block([node], node.inputs, shape_in, graph.shapes[node.name], True)
            blocks.append(seg)
            open_segment[node.name] = seg
        else:
            blocks.append(Block([node], node.inputs, shape_in, graph.shapes[node.name], False))
    return blocks


def fold_scales(nodes: list[Node]) -> list:
    """Fold scalar / per-channel Affine scales into the neighbouring Conv2d or Linear weight.

    Only the homogeneous part matters for the bound, so shifts are dropped.
    """
    ops = [n.op for n in nodes]
    changed = True
    while changed:
        changed = False
        for k in range(len(ops) - 1):
            a, b = ops[k], ops[k + 1]
            merged = _merge(a, b)
            if merged is not None:
                ops[k : k + 2] = [merged]
                changed = True
                break
    return ops


def _channel_scale(affine: Affine, channels: int, spatial_dims: int) -> torch.Tensor | None:
    """The scale as a per-channel vector, when it is one: a scalar or shape (C, 1, …, 1) exactly."""
    s = affine.scale.to(torch.float64)
    if s.numel() == 1 and s.dim() <= 1 + spatial_dims:
        return s.reshape(1).expand(channels)
    if tuple(s.shape) == (channels,) + (1,) * spatial_dims:
        return s.reshape(channels)
    return None


def _merge(a, b):
    if isinstance(a, Conv2d) and isinstance(b, Affine):
        s = _channel_scale(b, a.weight.shape[0], 2)
        if s is not None:
            return Conv2d(a.weight.double() * s.view(-1, 1, 1, 1), None, a.stride, a.padding, a.dilation, a.groups)
    if isinstance(a, Affine) and isinstance(b, Conv2d):
        c_out, c_in_group = b.weight.shape[:2]
        s = _channel_scale(a, c_in_group * b.groups, 2)
        if s is not None:
            per_out = s.view(b.groups, c_in_group).repeat_interleave(c_out // b.groups, dim=0)
            return Conv2d(b.weight.double() * per_out.view(c_out, c_in_group, 1, 1), None, b.stride, b.padding, b.dilation, b.groups)
    if isinstance(a, Linear) and isinstance(b, Affine):
        s = _channel_scale(b, a.weight.shape[0], 0)
        if s is not None:
            return Linear(a.weight.double() * s.view(-1, 1))
    if isinstance(a, Affine) and isinstance(b, Linear):
        s = _channel_scale(a, b.weight.shape[1], 0)
        if s is not None:
            return Linear(b.weight.double() * s.view(1, -1))
    if isinstance(a, Affine) and isinstance(b, Affine) and a.scale.shape == b.scale.shape:
        return Affine(a.scale.double() * b.scale.double(), torch.zeros(()))
    return None


def bound_segment(block: Block, tol: float, max_iter: int, exact_side: int = ops_bounds.EXACT_MAX_SIDE) -> BlockBound:
    if all(isinstance(n.op, (Reshape, Transpose)) for n in block.nodes):
        return BlockBound(block.name, block.description, block.in_shape, block.out_shape, 1.0, 1.0, "isometry")
    if ops_bounds.exact_affordable(block.in_shape, block.out_shape, exact_side):
        return _exact(block.homogeneous, block, block.name, block.description, tol, max_iter)
    estimate = lanczos_estimate(block.homogeneous, block.in_shape, tol=tol, max_iter=max_iter)
    upper, method = _product_bound(block, exact_side)
    return _checked(block, block.name, block.description, estimate, upper, method)


def _exact(f: Callable, block: Block, name: str, description: str, tol: float, max_iter: int) -> BlockBound:
    gram = ops_bounds.gram_matrix(f, block.in_shape, block.out_shape)
    estimate = ops_bounds.power_iteration_gram(gram, tol=tol, max_iter=max_iter)
    return _checked(block, name, description, estimate, ops_bounds.norm_from_gram(gram), "exact")


def _product_bound(block: Block, exact_side: int) -> tuple[float, str]:
    """∏ of the bounds of the segment's ops (per-channel scales folded into their neighbours)."""
    upper, methods, shape = 1.0, [], block.in_shape
    for op in fold_scales(block.nodes):
        value, how = ops_bounds.upper_bound(op, shape, exact_side)
        upper *= value
        methods.append(how)
        shape = tuple(op.homogeneous(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
    return upper, "·".join(m for m in methods if m != "isometry") or "isometry"


def _checked(block: Block, name: str, description: str, estimate, upper: float, method: str) -> BlockBound:
    upper *= 1.0 + FLOAT_MARGIN
    if estimate.value > upper * (1 + 1e-7):
        raise AssertionError(f"power iteration {estimate.value} exceeds the guaranteed bound {upper} on {name}")
    return BlockBound(name, description, block.in_shape, block.out_shape, estimate.value, upper, method,
                      estimate.iterations, estimate.converged)


def residual_branches(graph: Graph, blocks: list[Block]) -> dict[str, Block]:
    """Residual Adds a + B(a): Add name → the linear segment B, when B reads a, keeps its shape and only the Add
    reads B (so B's own bound is needed nowhere else)."""
    consumers = graph.consumers()
    segments = {b.name: b for b in blocks if b.linear}
    branches: dict[str, Block] = {}
    for block in blocks:
        if block.linear or not isinstance(block.nodes[0].op, Add) or len(block.inputs) != 2:
            continue
        for skip, branch in (block.inputs, block.inputs[::-1]):
            segment = segments.get(branch)
            if (segment is not None and skip != branch and segment.inputs[0] == skip and consumers[branch] == [block.name]
                    and segment.in_shape == segment.out_shape and branch != graph.output):
                branches[block.name] = segment
                break
    return branches


def bound_residual(segment: Block, add: Block, tol: float, max_iter: int,
                   exact_side: int = ops_bounds.EXACT_MAX_SIDE) -> BlockBound:
    """‖I + B‖ for the residual a + B(a), bounded as one operator: the exact norm where its Gram matrix is
    affordable; otherwise the smaller of the triangle inequality 1 + ‖B‖ (always valid) and, for B one
    convolution, the circulant bounds of the convolution equal to I + B (conv_bounds.identity_plus)."""
    def residual(x: torch.Tensor) -> torch.Tensor:
        return x + segment.homogeneous(x)

    description = f"x + ({segment.description})"
    if ops_bounds.exact_affordable(segment.in_shape, segment.out_shape, exact_side):
        return _exact(residual, segment, add.name, description, tol, max_iter)
    estimate = lanczos_estimate(residual, segment.in_shape, tol=tol, max_iter=max_iter)
    ops = fold_scales(segment.nodes)
    merged = conv_bounds.identity_plus(ops[0], segment.in_shape) if len(ops) == 1 and isinstance(ops[0], Conv2d) else None
    upper, how = _product_bound(segment, exact_side)
    upper, how = 1.0 + upper, f"1+({how})"
    if merged is not None:  # both are sound: keep the smaller (the circulant bounds of W can be loose where I + W's are not, and back)
        merged_upper, merged_how = conv_bounds.conv_upper_bound(merged, segment.in_shape)
        if merged_upper < upper:
            upper, how = merged_upper, f"I+W {merged_how}"
    return _checked(segment, add.name, description, estimate, upper, how)


def nonlinear_constant(block: Block) -> tuple[float, str]:
    op = block.nodes[0].op
    if isinstance(op, Activation):
        return op.lipschitz, op.kind
    if isinstance(op, PReLU):
        return op.lipschitz, "prelu"
    if isinstance(op, GroupMinMax):  # a group of one element is output twice (min = max = x): √2
        rank = len(block.in_shape) + 1
        size = math.prod(block.in_shape[a % rank - 1] for a in op.axes)
        return (1.0, "sorting") if size >= 2 else (math.sqrt(2.0), "copied twice")
    if isinstance(op, (MinMax, Sort)):
        return 1.0, "sorting"  # a sort (or a projection of one) of disjoint groups
    if isinstance(op, (Reduce, CReLU)):
        return 1.0, op.describe()  # see their docstrings
    if isinstance(op, MaxPool):
        return ops_bounds.maxpool_lipschitz(op, block.in_shape), "window-count"
    if isinstance(op, L2Pool):
        return l2pool_lipschitz(op, block.in_shape), "l2-pool"
    raise TypeError(f"no Lipschitz rule for {type(op).__name__}")


def l2pool_lipschitz(op: L2Pool, in_shape: tuple[int, ...]) -> float:
    """|scale|·√(gain·κ), κ = max_i Σ_{w∋i} 1/d_w (graph.L2Pool): each output is
    |scale|·√(gain/d_w)·‖(x_w, √(shift·d_w/gain))‖, a norm is 1-Lipschitz, so |Δy_w|² ≤ scale²·gain·‖Δx_w‖²/d_w,
    and summing over the windows ‖Δy‖² ≤ scale²·gain·Σ_i Δx_i² Σ_{w∋i} 1/d_w. κ is the largest column sum Aᵀ1 of
    the AveragePool's matrix A (A_wi = 1/d_w for i in window w), ≤ m/d_min with m the largest number of windows
    sharing an input (operators.maxpool_window_count) and equal to it when every window has the same divisor;
    Aᵀ1 counts ceil-mode partial windows and padded borders with their own divisors."""
    ones = torch.ones(1, *in_shape, dtype=torch.float64, requires_grad=True)
    (columns,) = torch.autograd.grad(op.average(ones).sum(), ones)
    return abs(op.scale) * math.sqrt(op.gain * columns.max().item())


def compose(
    graph: Graph,
    *,
    tol: float = 1e-4,
    max_iter: int = 5000,
    exact_side: int = ops_bounds.EXACT_MAX_SIDE,
    progress: Callable[[str], None] | None = None,
) -> Composition:
    """Bound the graph; returns both the power-iteration composition and the guaranteed one."""
    started = time.perf_counter()
    upper = {graph.input_name: 1.0}
    est = {graph.input_name: 1.0}
    results: list[BlockBound] = []
    blocks = blocks_of(graph)
    residuals = residual_branches(graph, blocks)
    branch_names = {segment.name for segment in residuals.values()}
    for block in blocks:
        if progress:
            progress(block.name)
        op = block.nodes[0].op
        if block.name in branch_names:
            continue  # bounded with its Add, as I + B
        if block.name in residuals:
            b = bound_residual(residuals[block.name], block, tol, max_iter, exact_side)
            skip = residuals[block.name].inputs[0]
            upper[block.name] = b.upper * upper[skip]
            est[block.name] = b.estimate * est[skip]
            results.append(b)
        elif block.linear:
            b = bound_segment(block, tol, max_iter, exact_side)
            upper[block.name] = b.upper * upper[block.inputs[0]]
            est[block.name] = b.estimate * est[block.inputs[0]]
            results.append(b)
        elif isinstance(op, Add):
            upper[block.name] = sum(upper[i] for i in block.inputs)
            est[block.name] = sum(est[i] for i in block.inputs)
        elif isinstance(op, Concat):
            upper[block.name] = math.sqrt(sum(upper[i] ** 2 for i in block.inputs))
            est[block.name] = math.sqrt(sum(est[i] ** 2 for i in block.inputs))
        else:
            c, how = nonlinear_constant(block)
            upper[block.name] = c * upper[block.inputs[0]]
            est[block.name] = c * est[block.inputs[0]]
            if c != 1.0:
                results.append(BlockBound(block.name, block.description, block.in_shape, block.out_shape, c, c, how))
    margin_est, margin_up, how = margin_matrices(graph, blocks, est, upper)
    return Composition(
        results, est[graph.output], upper[graph.output], margin_est, margin_up, how, time.perf_counter() - started
    )


def _rows(block: Block) -> torch.Tensor:
    """The explicit (out × in) float64 matrix of a linear block with few outputs: Aᵀe_j for each output j."""
    k = math.prod(block.out_shape)
    if k > math.prod(block.in_shape) or math.prod(block.in_shape) <= ops_bounds.EXACT_MAX_SIDE:
        return ops_bounds.materialise(block.homogeneous, block.in_shape)  # cheap here; bit-identical to earlier files
    _, pullback = torch.func.vjp(block.homogeneous, torch.zeros(k, *block.in_shape, dtype=torch.float64))
    (rows,) = pullback(torch.eye(k, dtype=torch.float64).reshape(k, *block.out_shape))
    return rows.reshape(k, -1)


def margin_matrices(graph: Graph, blocks: list[Block], est: dict, upper: dict):
    classes = graph.num_classes
    last = blocks[-1]
    if last.linear and last.name == graph.output and ops_bounds.exact_affordable(last.in_shape, last.out_shape):
        rows = _rows(last)  # (classes, d)
        pair = torch.stack([(rows[j] - rows).norm(dim=1) for j in range(classes)])  # ‖A_j − A_i‖
        pair = pair * (1.0 + FLOAT_MARGIN)
        l_in_est, l_in_up = est[last.inputs[0]], upper[last.inputs[0]]
        return (pair * l_in_est).tolist(), (pair * l_in_up).tolist(), "last-linear"
    off = 1.0 - torch.eye(classes, dtype=torch.float64)
    return (
        (off * math.sqrt(2) * est[graph.output]).tolist(),
        (off * math.sqrt(2) * upper[graph.output] * (1 + FLOAT_MARGIN)).tolist(),
        "sqrt2-global",
    )
