"""Spectral norms of linear operators: a power-iteration *estimate* and a *guaranteed* upper bound.

Power iteration returns ‖Ax‖/‖x‖ for its final iterate x. That is a lower
bound on σ_max(A) — it approaches the spectral norm from below and can stall
far below it when the top singular values are close — so on its own it is an
estimate, never a certificate (:mod:`glorocert.lipschitz.lanczos` gives the same
kind of estimate in far fewer steps; blocks too large for their Gram matrix use
it). Every certificate glorocert issues rests on
:func:`upper_bound`, which is an upper bound for the following reasons:

* **exact** (``exact``): the smaller Gram matrix (AᵀA or AAᵀ) of the operator
  is built explicitly in float64 from the operator and its adjoint, and σ_max²
  is its largest eigenvalue,
  from LAPACK's backward-stable symmetric eigensolver; rounding perturbs it by
  less than 1e-9 relative for the sizes allowed here (see
  :func:`spectral_norm_exact`).
* **circulant** (convolutions too large to materialise): a zero-padded,
  strided, dilated, grouped convolution A on an H×W input is a restriction of a
  circular convolution on a torus that contains the padded input: A = P C E,
  E the zero embedding (an isometry), P a selection of outputs (a coordinate
  projection), so ‖A‖ ≤ ‖C‖. A stride-s circular convolution is a stride-1
  circular convolution of the s×s polyphase components (a permutation of the
  input), which the 2-D DFT block-diagonalises: ‖C‖ = max_ω σ(ω), σ(ω) the
  largest singular value of the C_out×C_in·s² symbol K̂(ω) at each of the
  torus' frequencies (Sedghi et al. 2019). Exact for the circular operator; an
  upper bound for the zero-padded one.
* **circulant-box** (the same convolutions, tighter): by Parseval,
  ‖C z‖² ≤ Σ_ω σ(ω)²‖ẑ(ω)‖², and this majorant decouples the channels: each
  input channel (polyphase component) of z = ΠEx is supported in a box B of
  the torus, so ‖Ax‖² ≤ λ_max(T_B)‖x‖² with T_B the (H/s·W/s)² principal
  submatrix, on B, of the scalar circulant whose eigenvalues are σ(ω)². Applied
  to Aᵀ, the output box gives the same with B = the out_h×out_w outputs; the
  smaller is used. λ_max(T_B) ≤ max σ² (interlacing), so it never exceeds the
  circulant bound, and it keeps the input's finite extent, which is what sets
  a zero-padded convolution below its circular one; it loses only the turning
  of the top singular vector's channel direction with ω. Boxes above
  ``conv_bounds.BOX_MAX_SIDE`` cells are widened to strips (the whole torus in
  one direction), which the DFT along the strip block-diagonalises. The proof,
  and why Gram iteration (Delattre et al. 2023) and the zero-padding bound of
  Delattre et al. (2024) cannot be tighter than the circulant bound, are in
  :mod:`glorocert.lipschitz.conv_bounds`. :func:`upper_bound` returns the
  smaller of the two.
* **Schur test** (average pooling with any padding): for a non-negative matrix,
  ‖A‖₂ ≤ √(‖A‖₁‖A‖∞), both computed exactly from A·1 and Aᵀ·1.
* **counting** (max pooling): each output is a max over its window, so
  ‖Δy‖² ≤ Σ_windows Σ_{i∈window} Δx_i² ≤ m‖Δx‖², m = the largest number of
  windows that share one input.
* **separable** (Pad, Resize as ``AxisMaps``): a Kronecker product of per-axis
  matrices, whose norm is the product of their exact norms.
* **adjoint** (transposed convolutions too large to materialise): the bound of
  the convolution whose adjoint it is (:func:`conv_transpose_bound`).

Every guaranteed value is finally multiplied by (1 + FLOAT_MARGIN), which
covers the floating-point error of the computations above with orders of
magnitude to spare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from glorocert.graph import (
    Affine, AvgPool, AxisMaps, Conv2d, ConvTranspose2d, GlobalAvgPool, Linear, MaxPool, Op, Reshape, Transpose,
)
from glorocert.lipschitz import conv_bounds

FLOAT_MARGIN = 1e-6
EXACT_MAX_SIDE = 2_048  # default: Gram matrices up to 32 MB; the eigensolve grows with the side cubed

LinearMap = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Estimate:
    value: float
    iterations: int
    converged: bool


def power_iteration(
    f: LinearMap, in_shape: tuple[int, ...], *, tol: float = 1e-4, max_iter: int = 5000, seed: int = 0
) -> Estimate:
    """Power iteration on AᵀA for the linear map ``f`` (float64), to convergence.

    Converged means the eigen-residual ‖AᵀAx − λx‖ ≤ tol·λ for the unit iterate
    x and λ = ‖Ax‖² (a change-of-λ rule would stop on plateaus when the top
    singular values are close). The value returned is ‖Ax‖: a lower bound on
    σ_max(A) up to rounding — an estimate, not a certificate.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *in_shape, generator=gen, dtype=torch.float64)
    x /= x.norm()
    _, pullback = torch.func.vjp(f, torch.zeros_like(x))  # f is linear: one adjoint serves every iterate
    value = 0.0
    for it in range(1, max_iter + 1):
        y = f(x)
        value = y.norm().item()
        (z,) = pullback(y)
        if _converged(z, x, value, tol):
            return Estimate(value, it, True)
        x = z / z.norm()
    return Estimate(value, max_iter, False)


def _converged(z: torch.Tensor, x: torch.Tensor, value: float, tol: float) -> bool:
    rayleigh = value * value
    return rayleigh == 0.0 or (z - rayleigh * x).norm().item() <= tol * rayleigh


def exact_affordable(in_shape: tuple[int, ...], out_shape: tuple[int, ...], max_side: int = EXACT_MAX_SIDE) -> bool:
    """Exact norms need the Gram matrix of the smaller side: k² memory, k basis passes, an O(k³) eigensolve."""
    return min(math.prod(in_shape), math.prod(out_shape)) <= max_side


def fits_in_memory(in_shape: tuple[int, ...], out_shape: tuple[int, ...], max_entries: int = 25_000_000) -> bool:
    """Whether the explicit matrix (float64, up to 200 MB by default) may be materialised."""
    return math.prod(in_shape) * math.prod(out_shape) <= max_entries


def materialise(f: LinearMap, in_shape: tuple[int, ...], chunk: int = 512) -> torch.Tensor:
    """The explicit float64 matrix (out × in) of the linear map ``f`` (for small maps)."""
    n = math.prod(in_shape)
    columns = []
    for start in range(0, n, chunk):
        columns.append(f(_basis(start, min(chunk, n - start), in_shape)).reshape(min(chunk, n - start), -1))
    return torch.cat(columns).T


def _basis(start: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    basis = torch.zeros(count, n, dtype=torch.float64)
    basis[torch.arange(count), torch.arange(start, start + count)] = 1.0
    return basis.reshape(count, *shape)


def gram_matrix(f: LinearMap, in_shape: tuple[int, ...], out_shape: tuple[int, ...], chunk: int = 256) -> torch.Tensor:
    """AᵀA or AAᵀ, whichever is smaller, built column by column from ``f`` and its adjoint.

    Memory is k² for the smaller side k; the operator itself is never stored.
    """
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    side_shape = in_shape if n_in <= n_out else out_shape
    k = min(n_in, n_out)
    columns = []
    for start in range(0, k, chunk):
        count = min(chunk, k - start)
        basis = _basis(start, count, side_shape)
        if n_in <= n_out:  # AᵀA e_i = adjoint(forward(e_i))
            y, pullback = torch.func.vjp(f, basis)
            (col,) = pullback(y)
        else:  # AAᵀ e_j = forward(adjoint(e_j))
            _, pullback = torch.func.vjp(f, torch.zeros(count, *in_shape, dtype=torch.float64))
            (adj,) = pullback(basis)
            col = f(adj)
        columns.append(col.reshape(count, k))
    gram = torch.cat(columns)
    return (gram + gram.T) / 2  # exact symmetry; rounding differences are covered by FLOAT_MARGIN


def norm_from_gram(gram: torch.Tensor) -> float:
    """√λ_max of a Gram matrix (LAPACK's backward-stable symmetric eigensolver)."""
    if gram.numel() == 0:
        return 0.0
    return math.sqrt(max(torch.linalg.eigvalsh(gram)[-1].item(), 0.0))


def power_iteration_gram(gram: torch.Tensor, *, tol: float = 1e-4, max_iter: int = 5000, seed: int = 0) -> Estimate:
    """Power iteration on an explicit Gram matrix: the same iterates and stopping rule as on the operator, cheaper steps."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(gram.shape[0], generator=gen, dtype=torch.float64)
    x /= x.norm()
    value = 0.0
    for it in range(1, max_iter + 1):
        z = gram @ x
        value = math.sqrt(max((x @ z).item(), 0.0))  # ‖Ax‖ for the unit iterate x
        if _converged(z, x, value, tol):
            return Estimate(value, it, True)
        x = z / z.norm()
    return Estimate(value, max_iter, False)


def spectral_norm_exact(matrix: torch.Tensor) -> float:
    """Largest singular value of an explicit float64 matrix: √λ_max of its smaller Gram matrix.

    LAPACK's symmetric eigensolver is backward stable, and forming the Gram
    matrix G = AAᵀ in float64 perturbs it by at most n·u·‖A‖_F² ≤ n·u·rank·σ²
    (< 1e-9·σ² for the sizes handled here), which FLOAT_MARGIN covers.
    """
    a = matrix.to(torch.float64)
    return norm_from_gram(a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a)


def conv_circulant_bound(conv: Conv2d, in_shape: tuple[int, ...]) -> float:
    """Upper bound on ‖conv‖ via the circular convolution that contains it (module docstring)."""
    return conv_bounds.circulant_bound(conv, in_shape)


def avgpool_schur_bound(pool: AvgPool, in_shape: tuple[int, ...]) -> float:
    ones = torch.ones(1, *in_shape, dtype=torch.float64, requires_grad=True)
    rows = pool.forward(ones)  # A·1: row sums
    (cols,) = torch.autograd.grad(rows.sum(), ones)  # Aᵀ·1: column sums
    return math.sqrt(rows.max().item() * cols.max().item())


def maxpool_window_count(pool: MaxPool, in_shape: tuple[int, ...]) -> int:
    """Largest number of pooling windows that contain one input element."""
    ones = torch.ones(1, *in_shape, dtype=torch.float64, requires_grad=True)
    padded = F.pad(ones, (pool.padding[1],) * 2 + (pool.padding[0],) * 2)
    windows = F.unfold(padded, pool.kernel, pool.dilation, 0, pool.stride)
    (count,) = torch.autograd.grad(windows.sum(), ones)
    return int(round(count.max().item()))


def maxpool_lipschitz(pool: MaxPool, in_shape: tuple[int, ...]) -> float:
    if pool.ceil_mode:
        # ceil_mode adds partial windows at the border: count them with a sum-pool instead
        ones = torch.ones(1, *in_shape, dtype=torch.float64, requires_grad=True)
        sums = F.avg_pool2d(ones, pool.kernel, pool.stride, pool.padding, True, True, divisor_override=1)
        (count,) = torch.autograd.grad(sums.sum(), ones)
        if pool.dilation != (1, 1):
            return math.sqrt(math.prod(pool.kernel))  # every input in at most k_h·k_w windows
        return math.sqrt(count.max().item())
    return math.sqrt(maxpool_window_count(pool, in_shape))


def axis_maps_norm(op: AxisMaps) -> float:
    """‖⊗_a A_a‖₂ = Π_a ‖A_a‖₂ (Kronecker products multiply singular values), each factor exact."""
    return math.prod(spectral_norm_exact(matrix) for _, matrix in op.maps)


def conv_transpose_bound(op: ConvTranspose2d, in_shape: tuple[int, ...], exact_side: int = EXACT_MAX_SIDE) -> tuple[float, str]:
    """Exact when the Gram matrix is affordable; otherwise the bound of the adjoint convolution.

    The full transposed convolution T (no padding) is the adjoint of the Conv2d with the same weight,
    stride, dilation and groups acting on T's output shape, and ‖T‖ = ‖Tᵀ‖; the output padding (zeros
    appended) and the crop by ``padding`` are an isometric embedding and a coordinate projection, so
    ‖op‖ ≤ ‖T‖ ≤ the conv bound.
    """
    out_shape = tuple(op.homogeneous(torch.zeros(1, *in_shape, dtype=torch.float64)).shape[1:])
    if exact_affordable(in_shape, out_shape, exact_side):
        return norm_from_gram(gram_matrix(op.homogeneous, in_shape, out_shape)), "exact"
    (sh, sw), (dh, dw), (kh, kw) = op.stride, op.dilation, op.weight.shape[2:]
    full = (op.weight.shape[1] * op.groups, sh * (in_shape[1] - 1) + dh * (kh - 1) + 1, sw * (in_shape[2] - 1) + dw * (kw - 1) + 1)
    adjoint = Conv2d(op.weight.to(torch.float64), None, op.stride, (0, 0, 0, 0), op.dilation, op.groups)
    value, how = upper_bound(adjoint, full, exact_side)
    return value, f"adjoint-{how}"


def upper_bound(op: Op, in_shape: tuple[int, ...], exact_side: int = EXACT_MAX_SIDE) -> tuple[float, str]:
    """A guaranteed upper bound on the l2 Lipschitz constant of one linear op, and how it was found."""
    if isinstance(op, (Reshape, Transpose)):
        return 1.0, "isometry"
    if isinstance(op, Affine):
        # a scale that broadcasts to more elements than the input copies each element √(out/in) times
        out_numel = op.homogeneous(torch.zeros(1, *in_shape, dtype=torch.float64)).numel()
        copies = math.sqrt(out_numel / math.prod(in_shape))
        return (op.scale.abs().max().item() if op.scale.numel() else 0.0) * copies, "max|scale|"
    if isinstance(op, GlobalAvgPool):
        return 1.0 / math.sqrt(in_shape[1] * in_shape[2]), "exact"
    if isinstance(op, AvgPool):
        return avgpool_schur_bound(op, in_shape), "schur"
    if isinstance(op, Linear):
        return spectral_norm_exact(op.weight), "exact"
    if isinstance(op, Conv2d):
        out_shape = tuple(op.forward(torch.zeros(1, *in_shape, dtype=op.weight.dtype)).shape[1:])
        if exact_affordable(in_shape, out_shape, exact_side):
            return norm_from_gram(gram_matrix(op.homogeneous, in_shape, out_shape)), "exact"
        return conv_bounds.conv_upper_bound(op, in_shape)
    if isinstance(op, AxisMaps):
        return axis_maps_norm(op), "separable"
    if isinstance(op, ConvTranspose2d):
        return conv_transpose_bound(op, in_shape, exact_side)
    raise TypeError(f"no linear bound for {type(op).__name__}")
