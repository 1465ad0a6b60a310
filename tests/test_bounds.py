"""Lipschitz bounds: every guaranteed number is checked against a truth computed independently.

* single operators: the exact spectral norm of the explicit matrix, built here by
  applying ``F.conv2d`` / ``F.linear`` / pooling to every basis vector (not with the
  code under test), and its SVD;
* whole networks: the largest difference quotient ‖f(x)−f(y)‖/‖x−y‖ and the largest
  Jacobian norm that a short Adam search finds on the native (float64) torch model;
* margins: the same searches on y_j − y_i, for every pair of classes at once.
"""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from glorocert.api import Normalization, compute_bound
from glorocert.errors import GlorocertError
from glorocert.graph import Affine, AvgPool, Conv2d, GlobalAvgPool, Graph, Linear, MaxPool, Node, Reshape
from glorocert.lipschitz import operators
from glorocert.lipschitz.boundfile import Bound
from glorocert.lipschitz.compose import compose
from glorocert.loaders import load
from helpers import SHAPE, make_model, save_as

# LAPACK's SVD of the reference matrix is itself only accurate to a few ulps; a
# guaranteed bound computed by another route may tie with it and land 1e-15 below.
REFERENCE_RTOL = 1e-12


# --------------------------------------------------------------------------- exact references


def explicit_matrix(apply, in_shape) -> torch.Tensor:
    """(out × in) matrix of a linear map, one basis vector per column, in float64."""
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    with torch.no_grad():
        return apply(basis).reshape(n, -1).T


def exact_norm(matrix: torch.Tensor) -> float:
    return torch.linalg.svdvals(matrix)[0].item()


def explicit_conv(conv: Conv2d, in_shape) -> torch.Tensor:
    t, b, l, r = conv.padding
    return explicit_matrix(
        lambda x: F.conv2d(F.pad(x, (l, r, t, b)), conv.weight.double(), None, conv.stride, 0, conv.dilation, conv.groups),
        in_shape,
    )


def random_conv(rng: random.Random, gen: torch.Generator, *, size=(5, 8), max_extent: int = 7):
    """A random Conv2d (stride 1/2, asymmetric padding, dilation 1/2, groups 1/2) and an input shape it fits."""
    while True:
        groups = rng.choice([1, 1, 2])
        c_in, c_out = groups * rng.choice([1, 2]), groups * rng.choice([1, 2, 3])
        k, d, s = rng.choice([1, 2, 3, 4]), rng.choice([1, 2]), rng.choice([1, 2])
        if (k - 1) * d + 1 <= max_extent:
            break
    extent = (k - 1) * d + 1
    h, w = rng.randint(max(size[0], extent), size[1]), rng.randint(max(size[0], extent), size[1])
    padding = tuple(rng.randint(0, 2) for _ in range(4))
    weight = torch.randn(c_out, c_in // groups, k, k, generator=gen, dtype=torch.float64)
    return Conv2d(weight, None, (s, s), padding, (d, d), groups), (c_in, h, w)


def _named_convs():
    gen = torch.Generator().manual_seed(1)
    w = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return {
        "stride1_same": (Conv2d(w(3, 2, 3, 3), None, (1, 1), (1, 1, 1, 1)), (2, 7, 7)),
        "stride2": (Conv2d(w(4, 2, 3, 3), None, (2, 2), (1, 1, 1, 1)), (2, 8, 8)),
        "stride2_k4": (Conv2d(w(3, 1, 4, 4), None, (2, 2), (1, 1, 1, 1)), (1, 8, 8)),
        "asymmetric_padding": (Conv2d(w(2, 2, 3, 3), None, (1, 1), (0, 2, 1, 0)), (2, 6, 7)),
        "asymmetric_padding_stride2": (Conv2d(w(3, 2, 2, 2), None, (2, 2), (1, 0, 0, 1)), (2, 7, 7)),
        "dilation2": (Conv2d(w(3, 2, 3, 3), None, (1, 1), (2, 2, 2, 2), (2, 2)), (2, 7, 7)),
        "groups2": (Conv2d(w(4, 1, 3, 3), None, (1, 1), (1, 1, 1, 1), (1, 1), 2), (2, 6, 6)),
        "groups2_stride2_dilation2": (Conv2d(w(4, 2, 3, 3), None, (2, 2), (2, 1, 1, 2), (2, 2), 2), (4, 8, 8)),
        "no_padding": (Conv2d(w(2, 3, 3, 3), None, (1, 1), (0, 0, 0, 0)), (3, 6, 6)),
        "one_by_one": (Conv2d(w(4, 3, 1, 1), None, (1, 1), (0, 0, 0, 0)), (3, 5, 5)),
    }


NAMED_CONVS = _named_convs()


def _random_convs(count=24, seed=7):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    return [random_conv(rng, gen) for _ in range(count)]


RANDOM_CONVS = _random_convs()
CONV_CASES = list(NAMED_CONVS.values()) + RANDOM_CONVS
CONV_IDS = list(NAMED_CONVS) + [f"random{k}" for k in range(len(RANDOM_CONVS))]


def single_op_graph(op, in_shape) -> Graph:
    """The op followed by Flatten (an isometry), so that compose sees a classifier-shaped output."""
    return Graph("x", tuple(in_shape), [Node("op", op, ("x",)), Node("flat", Reshape((-1,)), ("op",))], "flat")


# --------------------------------------------------------------------------- single operators


@pytest.mark.parametrize("conv, in_shape", CONV_CASES, ids=CONV_IDS)
def test_conv_upper_bound_is_never_below_exact_norm_and_within_a_thousandth(conv, in_shape):
    exact = exact_norm(explicit_conv(conv, in_shape))
    upper, _ = operators.upper_bound(conv, in_shape)
    assert exact * (1 - REFERENCE_RTOL) <= upper <= exact * 1.001
    # the value certificates use (after composition and its float margin) is above the exact norm outright
    guaranteed = compose(single_op_graph(conv, in_shape)).global_upper
    assert exact <= guaranteed <= exact * 1.001


@pytest.mark.parametrize("conv, in_shape", CONV_CASES, ids=CONV_IDS)
def test_power_iteration_on_conv_approaches_the_exact_norm_from_below(conv, in_shape):
    exact = exact_norm(explicit_conv(conv, in_shape))
    estimate = operators.power_iteration(conv.homogeneous, in_shape)
    assert estimate.value <= exact * (1 + 1e-9)
    assert estimate.value == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("out_features, in_features", [(10, 64), (64, 10), (32, 32), (1, 20), (7, 3)])
def test_dense_bound_is_exact_and_power_iteration_is_within_1e_4(out_features, in_features):
    gen = torch.Generator().manual_seed(out_features * 100 + in_features)
    op = Linear(torch.randn(out_features, in_features, generator=gen, dtype=torch.float64))
    exact = exact_norm(explicit_matrix(lambda x: F.linear(x, op.weight), (in_features,)))
    upper, _ = operators.upper_bound(op, (in_features,))
    assert exact * (1 - REFERENCE_RTOL) <= upper <= exact * 1.001
    assert exact <= compose(single_op_graph(op, (in_features,))).global_upper <= exact * 1.001
    estimate = operators.power_iteration(op.homogeneous, (in_features,))
    assert estimate.value <= exact * (1 + 1e-9)
    assert estimate.value == pytest.approx(exact, rel=1e-4)


def test_power_iteration_does_not_stop_on_a_plateau_when_top_singular_values_are_close():
    """σ₂/σ₁ = 0.9991 here: a stopping rule on the change of ‖Ax‖ once stopped 8.6e-4 low claiming convergence."""
    conv, in_shape = NAMED_CONVS["asymmetric_padding"]
    singular = torch.linalg.svdvals(explicit_conv(conv, in_shape))
    assert singular[1] / singular[0] > 0.999
    estimate = operators.power_iteration(conv.homogeneous, in_shape)
    assert estimate.converged
    assert estimate.value == pytest.approx(singular[0].item(), rel=1e-4)


def test_circulant_bound_is_never_below_exact_norm_for_random_convs():
    """The path used for convolutions too large to materialise: sound, and not absurdly loose."""
    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    for _ in range(40):
        conv, in_shape = random_conv(rng, gen, size=(10, 12), max_extent=5)
        exact = exact_norm(explicit_conv(conv, in_shape))
        circulant = operators.conv_circulant_bound(conv, in_shape)
        assert circulant >= exact * (1 - REFERENCE_RTOL), (conv.describe(), conv.padding, in_shape)
        assert circulant <= exact * 1.5, (conv.describe(), conv.padding, in_shape)


@pytest.mark.parametrize("conv, in_shape", list(NAMED_CONVS.values()), ids=list(NAMED_CONVS))
def test_circulant_bound_is_never_below_exact_norm_for_strided_dilated_grouped_padded_convs(conv, in_shape):
    exact = exact_norm(explicit_conv(conv, in_shape))
    assert operators.conv_circulant_bound(conv, in_shape) >= exact * (1 - REFERENCE_RTOL)
    # forced onto the circulant path, the composed guarantee is still above the exact norm
    assert compose(single_op_graph(conv, in_shape), exact_side=0).global_upper >= exact


AVGPOOLS = {
    "overlapping_stride1_padded": AvgPool((3, 3), (1, 1), (1, 1), False, True),
    "overlapping_stride1_padded_exclude_pad": AvgPool((3, 3), (1, 1), (1, 1), False, False),
    "overlapping_stride2_padded": AvgPool((3, 3), (2, 2), (1, 1), False, True),
    "overlapping_stride2_exclude_pad_ceil": AvgPool((3, 3), (2, 2), (1, 1), True, False),
    "overlapping_k2_stride1": AvgPool((2, 2), (1, 1), (0, 0)),
    "disjoint_k2": AvgPool((2, 2), (2, 2), (0, 0)),
}


@pytest.mark.parametrize("pool", list(AVGPOOLS.values()), ids=list(AVGPOOLS))
def test_avgpool_bound_is_never_below_exact_norm(pool):
    in_shape = (2, 7, 7)
    exact = exact_norm(explicit_matrix(
        lambda x: F.avg_pool2d(x, pool.kernel, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad), in_shape,
    ))
    upper, _ = operators.upper_bound(pool, in_shape)
    assert upper >= exact * (1 - REFERENCE_RTOL)
    assert compose(single_op_graph(pool, in_shape), exact_side=0).global_upper >= exact
    assert compose(single_op_graph(pool, in_shape)).global_upper >= exact


def test_global_avgpool_bound_is_exact():
    in_shape = (3, 5, 6)
    exact = exact_norm(explicit_matrix(lambda x: x.mean(dim=(2, 3)), in_shape))
    assert operators.upper_bound(GlobalAvgPool(), in_shape)[0] == pytest.approx(exact, rel=1e-12)


def test_affine_bound_counts_the_copies_made_by_a_broadcasting_scale():
    """x of shape (1,) times a scale of shape (10,) is ten copies of x: norm √10, not max|scale| = 1."""
    affine = Affine(torch.ones(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64))
    assert operators.upper_bound(affine, (1,))[0] >= math.sqrt(10) * (1 - REFERENCE_RTOL)


def test_a_scale_along_the_width_is_not_folded_into_a_conv_as_a_per_channel_scale():
    """After a conv with 4 output channels, a scale of shape (4,) multiplies the 4 columns, not the channels."""
    conv = Conv2d(torch.ones(4, 1, 1, 1, dtype=torch.float64))  # copies the input into 4 channels
    width_scale = Affine(torch.tensor([10.0, 0.0, 0.0, 0.0], dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    nodes = [Node("c", conv, ("x",)), Node("a", width_scale, ("c",)), Node("f", Reshape((-1,)), ("a",))]
    graph = Graph("x", (1, 4, 4), nodes, "f")
    exact = exact_norm(explicit_matrix(graph.forward, (1, 4, 4)))
    assert exact == pytest.approx(20.0)
    assert compose(graph, exact_side=0).global_upper >= exact


MAXPOOLS = {
    "overlapping_k3_s1_p1": MaxPool((3, 3), (1, 1), (1, 1)),
    "overlapping_k3_s2_p1": MaxPool((3, 3), (2, 2), (1, 1)),
    "overlapping_k2_s1": MaxPool((2, 2), (1, 1)),
    "overlapping_k3_s2_ceil": MaxPool((3, 3), (2, 2), (0, 0), (1, 1), True),
    "dilated_k2_s1": MaxPool((2, 2), (1, 1), (0, 0), (2, 2)),
    "disjoint_k2": MaxPool((2, 2), (2, 2)),
}


def largest_difference_quotient(f, in_shape, *, restarts=8, steps=60, lr=0.05, seed=0, scale=1.0) -> float:
    """max ‖f(x)−f(y)‖/‖x−y‖ over a short Adam search on (x, y−x), several restarts at once."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(restarts, *in_shape, generator=gen, dtype=torch.float64) * 2 - 0.5).requires_grad_()
    delta = (0.3 * torch.randn(restarts, *in_shape, generator=gen, dtype=torch.float64)).requires_grad_()
    optimiser = torch.optim.Adam([x, delta], lr=lr)
    best = 0.0
    for _ in range(steps):
        ratio = (f(x + delta) - f(x)).flatten(1).norm(dim=1) / delta.flatten(1).norm(dim=1) / scale
        best = max(best, ratio.max().item())
        optimiser.zero_grad()
        (-ratio.sum()).backward()
        optimiser.step()
    return best


@pytest.mark.parametrize("pool", list(MAXPOOLS.values()), ids=list(MAXPOOLS))
def test_maxpool_constant_is_never_below_the_largest_difference_quotient(pool):
    in_shape = (1, 7, 7)
    bound = compose(single_op_graph(pool, in_shape)).global_upper
    f = lambda x: F.max_pool2d(x, pool.kernel, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)  # noqa: E731
    assert largest_difference_quotient(f, in_shape) <= bound
    # a single bump under the most-shared input is a witness: each window that sees it moves by 1
    witness = 0.0
    for i in range(in_shape[1]):
        for j in range(in_shape[2]):
            bump = torch.zeros(1, *in_shape, dtype=torch.float64)
            bump[0, 0, i, j] = 1.0
            witness = max(witness, (f(bump) - f(torch.zeros_like(bump))).norm().item())
    assert witness <= bound


# --------------------------------------------------------------------------- whole networks


NETWORK_KINDS = [
    "chain", "residual", "batchnorm_pooling", "activations", "normalised", "concat",
    "minmax_halves", "minmax_adjacent", "ends_with_relu", "ends_with_tanh",
]
INPUT_NORMALISATION = Normalization.of(0.3, 0.25)


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    """kind → (float64 torch module, glorocert Model loaded from its ONNX export); built once per module."""
    cache: dict[str, tuple] = {}
    directory = tmp_path_factory.mktemp("networks")

    def get(kind: str):
        if kind not in cache:
            torch.manual_seed(0)
            module = make_model(kind, seed=3)
            model = load(save_as(module, "onnx", directory, kind))
            cache[kind] = (copy.deepcopy(module).double(), model)
        return cache[kind]

    return get


def network_function(networks, case: str):
    """(f in float64 on [0,1] inputs, the graph that glorocert bounds) for a case."""
    if case == "input_normalisation_folded":
        module, model = networks("chain")
        ((mean,), (std,)) = INPUT_NORMALISATION.mean, INPUT_NORMALISATION.std
        graph = INPUT_NORMALISATION.fold_into(model.graph)
        return (lambda x: module((x - mean) / std)), graph  # written out: the reference does not use the code under test
    module, model = networks(case)
    return module, model.graph


def largest_jacobians(f, in_shape, *, restarts=8, steps=25, lr=0.05, seed=1):
    """Largest ‖J(x)‖₂ and, per class pair, largest ‖∇y_j − ∇y_i‖ that Adam finds (maximising ‖J‖₂)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(restarts, *in_shape, generator=gen, dtype=torch.float64) * 2 - 0.5).requires_grad_()
    optimiser = torch.optim.Adam([x], lr=lr)
    jacobian = torch.func.vmap(torch.func.jacrev(lambda v: f(v.unsqueeze(0)).squeeze(0)))
    best_global, best_pairs = 0.0, None
    for _ in range(steps):
        j = jacobian(x).flatten(2)  # (restarts, classes, inputs)
        spectral = torch.linalg.matrix_norm(j, ord=2)
        pairs = (j[:, :, None, :] - j[:, None, :, :]).norm(dim=-1).amax(dim=0).detach()
        best_global = max(best_global, spectral.max().item())
        best_pairs = pairs if best_pairs is None else torch.maximum(best_pairs, pairs)
        optimiser.zero_grad()
        (-spectral.sum()).backward()
        optimiser.step()
    return best_global, best_pairs


def largest_margin_quotients(f, in_shape, margin_upper, *, restarts=6, steps=50, lr=0.05, seed=2) -> float:
    """max over class pairs of |Δ(y_j − y_i)| / (‖Δx‖·K[j][i]) under a short Adam search; ≤ 1 when K is sound."""
    k = torch.as_tensor(margin_upper, dtype=torch.float64)
    off = ~torch.eye(len(k), dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(restarts, *in_shape, generator=gen, dtype=torch.float64) * 2 - 0.5).requires_grad_()
    delta = (0.3 * torch.randn(restarts, *in_shape, generator=gen, dtype=torch.float64)).requires_grad_()
    optimiser = torch.optim.Adam([x, delta], lr=lr)
    best = 0.0
    for _ in range(steps):
        dy = f(x + delta) - f(x)  # (restarts, classes)
        dmargin = (dy[:, :, None] - dy[:, None, :]).abs()  # (restarts, j, i)
        ratio = dmargin[:, off] / k[off] / delta.flatten(1).norm(dim=1, keepdim=True)
        best = max(best, ratio.max().item())
        optimiser.zero_grad()
        (-ratio.amax(dim=1).sum()).backward()
        optimiser.step()
    return best


NETWORK_CASES = NETWORK_KINDS + ["input_normalisation_folded"]


@pytest.mark.parametrize("case", NETWORK_CASES)
def test_global_bound_is_never_below_difference_quotients_or_gradient_norms(networks, case):
    f, graph = network_function(networks, case)
    bound = compose(graph)
    assert bound.global_estimate <= bound.global_upper
    quotient = largest_difference_quotient(f, graph.input_shape)
    gradient, pairs = largest_jacobians(f, graph.input_shape)
    assert quotient <= bound.global_upper
    assert gradient <= bound.global_upper
    k = torch.as_tensor(bound.margin_upper, dtype=torch.float64)
    assert bool((pairs <= k).all()), f"largest ‖∇(y_j − y_i)‖ / K[j][i] = {(pairs / k.clamp_min(1e-300)).max().item()}"
    assert largest_margin_quotients(f, graph.input_shape, bound.margin_upper) <= 1.0
    assert all(e <= u for row_e, row_u in zip(bound.margin_estimate, bound.margin_upper) for e, u in zip(row_e, row_u))


@pytest.mark.parametrize("case", ["chain", "residual", "batchnorm_pooling", "concat", "normalised", "input_normalisation_folded"])
def test_bounds_stay_sound_when_operators_are_too_large_to_materialise(networks, case):
    """exact_side=0 forces per-operator bounds (circulant convs, Schur pooling, folded BatchNorm/normalisation)."""
    f, graph = network_function(networks, case)
    exact_blocks = {b.name: b for b in compose(graph).blocks}
    large = compose(graph, exact_side=0)
    for block in large.blocks:
        # each linear block's exact norm (from the exact path) is a truth the per-operator product must not undercut
        assert block.upper >= exact_blocks[block.name].upper * (1 - REFERENCE_RTOL), (block.op, block.method)
    assert largest_difference_quotient(f, graph.input_shape) <= large.global_upper
    gradient, pairs = largest_jacobians(f, graph.input_shape, steps=5)
    assert gradient <= large.global_upper
    assert bool((pairs <= torch.as_tensor(large.margin_upper)).all())


def test_bound_of_a_network_without_nonlinearity_is_its_exact_norm(networks):
    """Conv → BatchNorm → AvgPool → Linear is one linear map: the guaranteed bound is its norm, to 1e-3."""
    module, model = networks("linear_only")
    exact = exact_norm(explicit_matrix(lambda x: module(x) - module(torch.zeros_like(x)), SHAPE))
    bound = compose(model.graph)
    assert exact <= bound.global_upper <= exact * 1.001
    assert bound.global_estimate == pytest.approx(exact, rel=1e-4)
    # input normalisation outside the model scales the map by 1/std, and the folded bound follows it exactly
    (std,) = INPUT_NORMALISATION.std
    folded = compose(INPUT_NORMALISATION.fold_into(model.graph))
    assert exact / std <= folded.global_upper <= exact / std * 1.001


def test_margin_matrix_with_final_linear_layer_is_row_difference_norm_times_penultimate_bound(networks):
    module, model = networks("minmax_halves")  # conv → MinMax → Linear → MinMax → Linear: each piece exact
    bound = compose(model.graph)
    assert bound.margin_method == "last-linear"
    conv, first, last = module[0], module[3], module[5]
    conv_norm = exact_norm(explicit_matrix(lambda x: F.conv2d(x, conv.weight, None, 1, 1), SHAPE))
    penultimate = conv_norm * torch.linalg.matrix_norm(first.weight, ord=2).item()
    w = last.weight
    for j in range(10):
        for i in range(10):
            expected = (w[j] - w[i]).norm().item() * penultimate
            assert bound.margin_upper[j][i] == pytest.approx(expected, rel=1e-5)
            assert bound.margin_upper[j][i] >= expected * (1 - REFERENCE_RTOL)


class KnownLipschitz(torch.nn.Module):
    """Flatten → Linear with orthonormal rows → ``how`` → Linear, built so that the Lipschitz constant is known.

    The first layer's bias puts every pre-activation at the activation's steepest point (0 for
    sigmoid/tanh, +1 for the piecewise-linear ones) at a point ``x_star``; there the Jacobian is
    W2·(slope)·W1 and, W1 having orthonormal rows, its norm is the product of the composition's
    constants: the bound must not be below it, and should not be above it either.
    """

    def __init__(self, how: str, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.how = how
        q, _ = torch.linalg.qr(torch.randn(64, 16, generator=gen))
        self.x_star = torch.rand(1, *SHAPE, generator=gen)
        offset = 0.0 if how in ("sigmoid", "tanh") else 1.0
        self.first = torch.nn.Linear(64, 16)
        self.last = torch.nn.Linear(32 if how == "concat" else 16, 10)
        with torch.no_grad():
            self.first.weight.copy_(q.T)
            self.first.bias.copy_(offset - q.T @ self.x_star.flatten())
            a = torch.randn(10, 16, generator=gen) * 0.3
            # for concat, W2 = [A, A]: the two copies add up coherently
            self.last.weight.copy_(torch.cat([a, a], 1) if how == "concat" else a)
            self.last.bias.copy_(torch.randn(10, generator=gen))

    def forward(self, x):
        h = self.first(x.flatten(1))
        if self.how == "sigmoid":
            return self.last(torch.sigmoid(h))
        if self.how == "tanh":
            return self.last(torch.tanh(h))
        if self.how == "leaky_relu":
            return self.last(F.leaky_relu(h, 0.2))
        if self.how == "add":
            h = F.relu(h)
            return self.last(h + h)
        if self.how == "concat":
            h = F.relu(h)
            return self.last(torch.cat([h, h], 1))
        if self.how == "minmax":
            a, b = h.chunk(2, 1)
            return self.last(torch.cat([torch.maximum(a, b), torch.minimum(a, b)], 1))
        return self.last(F.relu(h))


@pytest.mark.parametrize("how", ["relu", "leaky_relu", "sigmoid", "tanh", "add", "concat", "minmax"])
def test_bound_equals_the_known_lipschitz_constant_where_it_is_attained(tmp_path, how):
    """Catches any composition rule (activation slope, Add, Concat, MinMax) that undercounts or overcounts."""
    module = KnownLipschitz(how).eval()
    model = load(save_as(module, "onnx", tmp_path, how))
    bound = compose(model.graph)
    f = lambda v: module.double()(v.unsqueeze(0)).squeeze(0)  # noqa: E731
    jacobian = torch.autograd.functional.jacobian(f, module.x_star.double()[0]).flatten(1)  # attained at x_star
    attained = torch.linalg.matrix_norm(jacobian, ord=2).item()
    assert attained <= bound.global_upper <= attained * 1.001
    for j in range(10):
        for i in range(10):
            if i != j:
                pair = (jacobian[j] - jacobian[i]).norm().item()
                assert pair <= bound.margin_upper[j][i] <= pair * 1.001


# --------------------------------------------------------------------------- formats agree


def test_torchscript_torch_export_and_onnx_exports_give_the_same_bound(tmp_path):
    module = make_model("batchnorm_pooling", seed=5)
    formats = ("onnx", "torchscript", "torch.export")
    bounds = [compute_bound(load(save_as(module, fmt, tmp_path), input_shape=SHAPE)) for fmt in formats]
    for fmt, other in zip(formats[1:], bounds[1:]):
        assert other.model_format == fmt
        assert other.global_upper == pytest.approx(bounds[0].global_upper, rel=1e-6)
        assert other.global_estimate == pytest.approx(bounds[0].global_estimate, rel=1e-4)
        for a, b in zip(bounds[0].margin_upper, other.margin_upper):
            assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize("kind", ["chain", "residual", "concat", "minmax_halves"])
def test_onnx_and_torchscript_exports_give_the_same_bound(tmp_path, kind):
    module = make_model(kind, seed=5)
    bounds = [compute_bound(load(save_as(module, fmt, tmp_path), input_shape=SHAPE)) for fmt in ("onnx", "torchscript")]
    assert bounds[0].global_upper == pytest.approx(bounds[1].global_upper, rel=1e-6)
    assert bounds[0].global_estimate == pytest.approx(bounds[1].global_estimate, rel=1e-4)
    for a, b in zip(bounds[0].margin_upper, bounds[1].margin_upper):
        assert a == pytest.approx(b, rel=1e-6)


# --------------------------------------------------------------------------- the frozen bound file


@pytest.fixture
def bound_and_model(tmp_path):
    model = load(save_as(make_model("chain"), "onnx", tmp_path))
    return compute_bound(model), model


def test_bound_file_round_trips_exactly(tmp_path, bound_and_model):
    bound, model = bound_and_model
    path = bound.save(tmp_path / "b.json")
    again = Bound.load(path)
    assert again == bound
    again.check_matches(model.sha256, model.input_shape, None)


@pytest.mark.parametrize("edit", ["global_upper", "margin_upper", "mode"])
def test_hand_edited_bound_file_is_refused(tmp_path, bound_and_model, edit):
    bound, _ = bound_and_model
    path = bound.save(tmp_path / "b.json")
    body = json.loads(path.read_text())
    if edit == "global_upper":
        body["global_upper"] *= 0.5
    elif edit == "margin_upper":
        body["margin_upper"][0][1] *= 0.5
    else:
        body["mode"] = "estimate"
    path.write_text(json.dumps(body))
    with pytest.raises(GlorocertError, match="modified"):
        Bound.load(path)


def test_bound_for_another_model_is_refused(tmp_path, bound_and_model):
    bound, _ = bound_and_model
    other = load(save_as(make_model("chain", seed=9), "onnx", tmp_path, "other"))
    with pytest.raises(GlorocertError, match="another model"):
        bound.check_matches(other.sha256, other.input_shape, None)


def test_bound_for_another_shape_or_normalisation_is_refused(bound_and_model):
    bound, model = bound_and_model
    with pytest.raises(GlorocertError, match="input shape"):
        bound.check_matches(model.sha256, (1, 9, 9), None)
    with pytest.raises(GlorocertError, match="normalisation"):
        bound.check_matches(model.sha256, model.input_shape, INPUT_NORMALISATION)
