"""Convolution bounds without materialising (circulant, circulant-box, strips) and the Lanczos lower bound.

Every truth here is computed independently of the code under test: the explicit matrix of the
convolution, one basis vector per column through ``F.pad`` + ``F.conv2d``, and its SVD.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from glorocert.graph import Conv2d, Graph, Linear, Node, Reshape
from glorocert.lipschitz import conv_bounds, operators
from glorocert.lipschitz.compose import compose
from glorocert.lipschitz.lanczos import lanczos_estimate

RTOL = 1e-12  # LAPACK's SVD of the reference is itself accurate to a few ulps only


def explicit_conv(conv: Conv2d, in_shape) -> torch.Tensor:
    t, b, l, r = conv.padding
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    out = F.conv2d(F.pad(basis, (l, r, t, b)), conv.weight.double(), None, conv.stride, 0, conv.dilation, conv.groups)
    return out.reshape(n, -1).T


def exact_norm(conv: Conv2d, in_shape) -> float:
    return torch.linalg.svdvals(explicit_conv(conv, in_shape))[0].item()


def random_conv(rng: random.Random, gen: torch.Generator):
    """Stride 1–3, asymmetric padding 0–3 (wider than the kernel too), dilation 1–2, groups 1–3, 5–11 pixels."""
    while True:
        groups = rng.choice([1, 1, 2, 3])
        c_in, c_out = groups * rng.choice([1, 2, 3]), groups * rng.choice([1, 2, 3])
        k, d, s = rng.choice([1, 2, 3, 4, 5]), rng.choice([1, 1, 2]), rng.choice([1, 1, 2, 3])
        h, w = rng.randint(5, 11), rng.randint(5, 11)
        padding = tuple(rng.randint(0, 3) for _ in range(4))
        if (k - 1) * d + 1 <= min(h + padding[0] + padding[1], w + padding[2] + padding[3]):
            break
    weight = torch.randn(c_out, c_in // groups, k, k, generator=gen, dtype=torch.float64)
    return Conv2d(weight, None, (s, s), padding, (d, d), groups), (c_in, h, w)


def _cases(count=60, seed=11):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    cases = [random_conv(rng, gen) for _ in range(count)]
    w = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    cases += [
        (Conv2d(w(3, 2, 1, 1), None, (1, 1), (2, 2, 3, 1)), (2, 6, 6)),  # padding wider than the kernel
        (Conv2d(w(4, 4, 3, 3), None, (1, 1), (0, 0, 0, 0)), (4, 9, 9)),  # 'valid': only the output box is smaller
        (Conv2d(w(4, 2, 4, 4), None, (2, 2), (1, 1, 1, 1)), (2, 10, 10)),  # the 6C2F downsampling shape
        (Conv2d(w(6, 1, 3, 3), None, (1, 1), (1, 1, 1, 1), (1, 1), 6), (6, 8, 8)),  # depthwise
        (Conv2d(w(3, 2, 3, 2), None, (3, 2), (2, 0, 1, 1), (1, 2)), (2, 11, 7)),  # non-square everything
    ]
    return cases


CASES = _cases()


def test_every_bound_is_at_least_the_exact_norm_and_the_box_never_above_the_circulant():
    gains = []
    for conv, in_shape in CASES:
        exact = exact_norm(conv, in_shape)
        circulant = conv_bounds.circulant_bound(conv, in_shape)
        boxed, method = conv_bounds.conv_upper_bound(conv, in_shape)
        strips, _ = conv_bounds.conv_upper_bound(conv, in_shape, max_side=0)  # every box widened to strips
        where = (conv.describe(), conv.padding, in_shape)
        assert exact * (1 - RTOL) <= boxed <= circulant, where
        assert exact * (1 - RTOL) <= strips <= circulant * (1 + RTOL), where
        assert boxed <= strips * (1 + RTOL), where  # a box lies inside both of its strips
        assert method == ("circulant-box" if boxed < circulant else "circulant"), where
        # the per-operator path reports the same number and method (and the old entry point the circulant one)
        assert operators.upper_bound(conv, in_shape, exact_side=0) == (boxed, method)
        assert operators.conv_circulant_bound(conv, in_shape) == circulant
        gains.append((circulant / exact, boxed / exact))
    # not only sound but tighter: on these small inputs the box removes most of the circulant's excess
    excess_circulant = sum(c - 1 for c, _ in gains)
    excess_box = sum(b - 1 for _, b in gains)
    assert excess_box < 0.5 * excess_circulant, (excess_box, excess_circulant)


def test_for_one_channel_the_box_eigenvalue_is_the_norm_of_the_circular_convolution_on_box_inputs():
    """One channel: σ(ω)² = |K̂(ω)|² is the Gram symbol itself, so λ_max(T_B) is exactly ‖C E‖², the circular
    convolution on the torus applied to inputs supported in the box (checked on an explicit matrix)."""
    gen = torch.Generator().manual_seed(3)
    conv = Conv2d(torch.randn(1, 1, 3, 4, generator=gen, dtype=torch.float64), None, (1, 1), (1, 1, 2, 1))
    in_shape = (1, 7, 8)
    mh, mw = conv_bounds.torus(conv, in_shape)
    n = math.prod(in_shape)
    basis = torch.zeros(n, 1, mh, mw, dtype=torch.float64)
    basis[:, :, 1:8, 2:10] = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)  # E: the input at (t, l)
    wrapped = F.pad(basis, (0, 3, 0, 2), mode="circular")  # circular cross-correlation over the whole torus
    circular_on_box = F.conv2d(wrapped, conv.weight).reshape(n, -1).T
    sigma = conv_bounds.top_singular_values(conv, in_shape)
    boxed = conv_bounds.box_eigenvalue(sigma * sigma, (mh, mw), (7, 8), conv_bounds.BOX_MAX_SIDE)
    assert math.sqrt(boxed) == pytest.approx(torch.linalg.svdvals(circular_on_box)[0].item(), rel=1e-10)
    assert math.sqrt(boxed) >= exact_norm(conv, in_shape)


def test_composed_guarantee_on_the_box_path_is_above_the_exact_norm():
    for conv, in_shape in CASES[:12]:
        graph = Graph("x", in_shape, [Node("op", conv, ("x",)), Node("flat", Reshape((-1,)), ("op",))], "flat")
        result = compose(graph, exact_side=0)
        exact = exact_norm(conv, in_shape)
        assert exact <= result.global_upper, (conv.describe(), in_shape)
        assert result.global_estimate <= exact * (1 + 1e-9)


@pytest.mark.parametrize("tol", [1e-4, 1e-9])
def test_lanczos_is_a_lower_bound_and_converges_to_the_exact_norm(tol):
    for conv, in_shape in CASES[::4]:
        exact = exact_norm(conv, in_shape)
        estimate = lanczos_estimate(conv.homogeneous, in_shape, tol=tol)
        assert estimate.converged
        assert estimate.value <= exact * (1 + 1e-12), (conv.describe(), in_shape)
        assert estimate.value >= exact * (1 - max(tol, 1e-9)), (conv.describe(), in_shape, estimate)


def test_lanczos_on_a_flat_spectrum_is_exact_and_stops_at_its_step_cap():
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    flat = Linear(2.5 * q[:30])  # thirty equal singular values
    assert lanczos_estimate(flat.homogeneous, (40,)).value == pytest.approx(2.5, rel=1e-12)
    spread = Linear(torch.randn(300, 200, generator=gen, dtype=torch.float64))
    capped = lanczos_estimate(spread.homogeneous, (200,), tol=1e-12, max_iter=3)
    assert not capped.converged and capped.iterations == 3
    assert capped.value <= torch.linalg.svdvals(spread.weight)[0].item() * (1 + 1e-12)
