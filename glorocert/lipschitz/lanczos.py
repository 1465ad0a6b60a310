"""Lanczos on AᵀA: the norm estimate of a linear map too large for its Gram matrix, and a true lower bound.

Power iteration needs about log(1/tol)/(1 − σ₂²/σ₁²) steps, thousands when the top of the spectrum is flat
(orthogonal and GloRo-trained layers); Lanczos (with full reorthogonalisation, restarted from its Ritz
vector) needs about the square root of that. What it returns is the same kind of number as power
iteration: ‖Ay‖/‖y‖ for one explicit vector y, recomputed in float64, hence a *lower* bound on σ_max(A) up
to float64 rounding (Courant–Fischer), never an upper bound. ``converged`` uses power iteration's rule,
checked on y itself in float64: ‖AᵀAy − λy‖ ≤ tol·λ, λ = ‖Ay‖².

Tolerances down to 1e-5 iterate in float32 (3–5× faster convolutions; its rounding, ~1e-7 relative, sits far
below the tolerance), finer ones in float64; the returned value and the residual are float64 either way.
"""

from __future__ import annotations

import math

import torch

from glorocert.lipschitz.operators import Estimate, LinearMap

RESTART = 48  # Krylov vectors kept before restarting from the Ritz vector


def lanczos_estimate(
    f: LinearMap, in_shape: tuple[int, ...], *, tol: float = 1e-4, max_iter: int = 5000, seed: int = 0,
    restart: int = RESTART,
) -> Estimate:
    """σ_max estimate of the linear map ``f`` from below; ``iterations`` counts products with AᵀA."""
    dtype = torch.float32 if tol >= 1e-5 else torch.float64
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(math.prod(in_shape), generator=gen, dtype=torch.float64)
    gram = _gram_product(f, in_shape, dtype)
    exact_gram = _gram_product(f, in_shape, torch.float64)
    used = 0
    while True:
        x, steps = _lanczos_pass(gram, x.to(dtype), min(restart, max_iter - used), tol)
        used += steps
        x = x.to(torch.float64)
        value, residual = _check(f, exact_gram, x, in_shape)
        if residual <= tol * value * value or value == 0.0:
            return Estimate(value, used, True)
        if used >= max_iter:
            return Estimate(value, used, False)


def _gram_product(f: LinearMap, in_shape: tuple[int, ...], dtype: torch.dtype):
    _, pullback = torch.func.vjp(f, torch.zeros(1, *in_shape, dtype=dtype))  # f is linear: one adjoint for all

    def product(v: torch.Tensor) -> torch.Tensor:
        (z,) = pullback(f(v.reshape(1, *in_shape)))
        return z.reshape(-1)

    return product


def _check(f: LinearMap, exact_gram, x: torch.Tensor, in_shape: tuple[int, ...]) -> tuple[float, float]:
    """(‖Ay‖, ‖AᵀAy − ‖Ay‖²y‖) for y = x/‖x‖, in float64."""
    y = x / x.norm()
    value = f(y.reshape(1, *in_shape)).norm().item()
    return value, (exact_gram(y) - value * value * y).norm().item()


def _lanczos_pass(gram, start: torch.Tensor, steps: int, tol: float) -> tuple[torch.Tensor, int]:
    """Up to ``steps`` Lanczos steps from ``start``; returns the top Ritz vector and the steps taken.

    Stops early once the Ritz residual β_j·|s_j| (the residual of the top Ritz pair, in exact arithmetic)
    falls below tol/4·θ, leaving room for rounding before the float64 check.
    """
    basis = torch.empty(max(steps, 1), start.numel(), dtype=start.dtype)
    basis[0] = start / start.norm()
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(max(steps, 1)):
        w = gram(basis[j])
        alphas.append(torch.dot(basis[j], w).item())
        q = basis[: j + 1]
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - q.T @ (q @ w)
        beta = w.norm().item()
        theta, ritz = _top_ritz(alphas, betas)
        if beta * abs(ritz[-1].item()) <= tol / 4 * theta or beta <= 1e-12 * max(theta, 1e-300) or j + 1 == steps:
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    vector = basis[: j + 1].T.to(torch.float64) @ ritz
    return vector, j + 1


def _top_ritz(alphas: list[float], betas: list[float]) -> tuple[float, torch.Tensor]:
    """Largest eigenvalue of the Lanczos tridiagonal matrix and its eigenvector."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(t)
    return values[-1].item(), vectors[:, -1]
