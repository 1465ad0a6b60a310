"""Local-bound certifiers (BCP, Wong–Kolter): every bound checked against something exact or attacked.

Tiny seeded ReLU networks in float64. A lower bound on min y_ŷ − y_i is wrong
if it exceeds the value PGD finds, the LP-relaxation optimum (KW), the global
Lipschitz bound's complement (BCP must be at least as tight), or a generic
convex solver on BCP's worst-case subproblem.
"""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize

from glorocert.certify import bcp, kw, local
from glorocert.errors import GlorocertError
from glorocert.graph import (
    Activation, Add, Affine, Conv2d, Graph, Linear, MaxPool, MinMax, Node, Reshape,
)
from glorocert.lipschitz.compose import compose
from glorocert.lipschitz.operators import materialise
from helpers import load_saved, pgd_margin, pgd_pair_margins

# --------------------------------------------------------------------------- tiny networks


def mlp(sizes, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    nodes, prev = [], "x"
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = torch.randn(b, a, generator=gen, dtype=torch.float64) * scale / math.sqrt(a)
        bias = torch.randn(b, generator=gen, dtype=torch.float64) * 0.1
        nodes.append(Node(f"fc{k}", Linear(w, bias), (prev,)))
        prev = f"fc{k}"
        if k < len(sizes) - 2:
            nodes.append(Node(f"relu{k}", Activation("relu"), (prev,)))
            prev = f"relu{k}"
    return Graph("x", (sizes[0],), nodes, prev)


def dense_layers(graph):
    """[(W, b)] of the linear segments between ReLUs, materialised independently of the certifiers."""
    layers, ops, start = [], [], graph.input_shape

    def close():
        def seg(v, bias=True):
            for op in ops:
                v = op.forward(v) if bias else op.homogeneous(v)
            return v
        w = materialise(lambda v: seg(v, False), start)
        b = seg(torch.zeros(1, *start, dtype=torch.float64)).reshape(-1)
        layers.append((w, b))

    for node in graph.nodes:
        if isinstance(node.op, Activation):
            close()
            ops, start = [], graph.shapes[node.name]
        else:
            ops.append(node.op)
    close()
    return layers


def tiny_conv(seed=0):
    """normalise → conv (asymmetric padding) → ReLU → strided conv → ReLU → flatten → FC → ReLU → FC."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * s

    nodes = [
        Node("norm", Affine(torch.tensor([[[2.0]]], dtype=torch.float64), torch.tensor([[[-1.0]]], dtype=torch.float64)), ("x",)),
        Node("conv1", Conv2d(r(3, 1, 3, 3, s=0.4), r(3, s=0.1), (1, 1), (1, 0, 1, 0)), ("norm",)),
        Node("relu1", Activation("relu"), ("conv1",)),
        Node("conv2", Conv2d(r(4, 3, 3, 3, s=0.3), r(4, s=0.1), (2, 2), (1, 1, 1, 1)), ("relu1",)),
        Node("relu2", Activation("relu"), ("conv2",)),
        Node("flat", Reshape((-1,)), ("relu2",)),
        Node("fc1", Linear(r(10, 36, s=0.25), r(10, s=0.1)), ("flat",)),
        Node("relu3", Activation("relu"), ("fc1",)),
        Node("fc2", Linear(r(3, 10, s=0.4), r(3, s=0.1)), ("relu3",)),
    ]
    return Graph("x", (1, 6, 6), nodes, "fc2")


def trained_mlp(seed=0):
    """A small ReLU net trained for a moment on three Gaussian blobs in 6-D, and a few test points."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 6, generator=gen) * 2.0
    labels = torch.randint(0, 3, (600,), generator=gen)
    data = centres[labels] + torch.randn(600, 6, generator=gen) * 0.7
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.ReLU(), torch.nn.Linear(24, 24), torch.nn.ReLU(), torch.nn.Linear(24, 3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(data), labels).backward()
        opt.step()
    nodes, prev = [], "x"
    for k, layer in enumerate(net):
        name = f"n{k}"
        op = Linear(layer.weight.detach().double(), layer.bias.detach().double()) if isinstance(layer, torch.nn.Linear) else Activation("relu")
        nodes.append(Node(name, op, (prev,)))
        prev = name
    graph = Graph("x", (6,), nodes, prev)
    x = (centres[labels[:12]] + torch.randn(12, 6, generator=gen) * 0.7).double()
    return graph, x


def predict(graph, x):
    return graph(x.double()).argmax(dim=1)


def close_below(bound, reference, rel=1e-7):
    """bound ≤ reference up to float noise (only finite entries)."""
    finite = torch.isfinite(reference)
    scale = 1 + reference[finite].abs()
    return bool((bound[finite] <= reference[finite] + rel * scale).all())


# --------------------------------------------------------------------------- BCP: the worst-case subproblem


def test_worst_case_point_matches_a_generic_convex_solver_and_terminates_within_dimension_steps():
    gen = torch.Generator().manual_seed(3)
    d = 7
    for _ in range(12):
        c = torch.randn(d, generator=gen, dtype=torch.float64)
        z = torch.randn(d, generator=gen, dtype=torch.float64) * 0.3
        lo = z - torch.rand(d, generator=gen, dtype=torch.float64) * 0.8
        hi = z + torch.rand(d, generator=gen, dtype=torch.float64) * 0.8
        rho = torch.tensor(1.0, dtype=torch.float64)
        result = bcp.worst_case(c, z, rho, lo, hi)
        zn = z.numpy()
        exact = minimize(
            lambda h: c.numpy() @ h, zn, jac=lambda h: c.numpy(), method="SLSQP",
            bounds=list(zip(lo.numpy(), hi.numpy())),
            constraints=[{"type": "ineq", "fun": lambda h: 1.0 - ((h - zn) ** 2).sum(), "jac": lambda h: -2 * (h - zn)}],
            options={"ftol": 1e-12, "maxiter": 500},
        )
        h = np.clip(exact.x, lo.numpy(), hi.numpy())
        h = zn + (h - zn) / max(1.0, np.linalg.norm(h - zn))  # SLSQP's answer, made exactly feasible
        assert bool(result.terminated) and int(result.iterations) <= d + 1
        assert result.value.item() <= c.numpy() @ h + 1e-12  # sound: below a feasible point …
        assert result.value.item() == pytest.approx(exact.fun, abs=1e-7)  # … and exact at termination
        assert result.value.item() >= max(bcp.ball_bound(c, z, rho).item(), bcp.box_bound(c, lo, hi).item()) - 1e-12


def test_worst_case_cut_short_falls_back_to_ball_or_box_never_to_the_iterate():
    c = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    z = torch.zeros(4, dtype=torch.float64)
    lo, hi = torch.full((4,), -0.2, dtype=torch.float64), torch.full((4,), 0.2, dtype=torch.float64)
    lo[3] = -5.0
    rho = torch.tensor(1.0, dtype=torch.float64)
    full = bcp.worst_case(c, z, rho, lo, hi)
    cut = bcp.worst_case(c, z, rho, lo, hi, max_iterations=1)
    assert bool(full.terminated) and int(full.iterations) > 1
    assert not bool(cut.terminated)
    fallback = max(bcp.ball_bound(c, z, rho).item(), bcp.box_bound(c, lo, hi).item())
    assert cut.value.item() == pytest.approx(fallback)
    assert cut.value.item() <= full.value.item()


def test_worst_case_nan_is_never_a_certificate():
    # a ball centre outside the box (impossible in exact arithmetic) makes eq. (12) take √(negative)
    c = torch.tensor([1.0, 1.0], dtype=torch.float64)
    z = torch.zeros(2, dtype=torch.float64)
    lo, hi = torch.tensor([5.0, -1.0], dtype=torch.float64), torch.tensor([6.0, 1.0], dtype=torch.float64)
    result = bcp.worst_case(c, z, torch.tensor(1.0, dtype=torch.float64), lo, hi)
    assert not bool(result.terminated)
    assert torch.isfinite(result.value)
    fallback = max(bcp.ball_bound(c, z, 1.0).item(), bcp.box_bound(c, lo, hi).item())
    assert result.value.item() == pytest.approx(fallback)


# --------------------------------------------------------------------------- BCP on networks


@pytest.mark.parametrize("build", [lambda: mlp([5, 12, 12, 4], seed=1), lambda: tiny_conv(seed=2)], ids=["mlp", "conv"])
def test_bcp_lower_bound_never_exceeds_the_minimum_found_by_pgd(build):
    graph = build()
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(5, *graph.input_shape, generator=gen, dtype=torch.float64)
    pred = predict(graph, x)
    for eps in (0.05, 0.3, 1.0):
        bound = bcp.lower_bounds(graph, x, pred, eps)
        attacked = pgd_pair_margins(graph, x, pred, eps, steps=60, restarts=4)
        assert close_below(bound, attacked)


def coordinate_extremes(forward, x, eps, steps=60):
    """min and max of every output coordinate of ``forward`` found by PGD over the l2 ball, (N, d) each."""
    n = x.shape[0]
    d = forward(x[:1]).flatten(1).shape[1]
    lows, highs = [], []
    view = (-1,) + (1,) * (x.dim() - 1)
    for sign, keep in ((1.0, lows), (-1.0, highs)):
        xs = x.repeat_interleave(d, dim=0)  # (N·d, …): one problem per coordinate
        coord = torch.arange(d).repeat(n)
        delta = torch.zeros_like(xs)
        best = torch.full((n * d,), math.inf, dtype=torch.float64)
        for k in range(steps + 1):
            delta.requires_grad_(True)
            value = sign * forward(xs + delta).flatten(1)[torch.arange(n * d), coord]
            best = torch.minimum(best, value.detach())
            (grad,) = torch.autograd.grad(value.sum(), delta)
            with torch.no_grad():
                g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-300).view(view)
                delta = delta - 2.5 * eps / steps * (1 + math.cos(math.pi * k / steps)) * g
                delta = delta * torch.clamp(eps / delta.flatten(1).norm(dim=1).clamp_min(1e-300), max=1.0).view(view)
        keep.append(sign * best.view(n, d))
    return lows[0], highs[0]


@pytest.mark.parametrize("build", [lambda: mlp([5, 12, 12, 4], seed=1), lambda: tiny_conv(seed=2)], ids=["mlp", "conv"])
def test_bcp_penultimate_box_and_ball_contain_every_attacked_activation(build):
    graph = build()
    gen = torch.Generator().manual_seed(12)
    x = torch.rand(3, *graph.input_shape, generator=gen, dtype=torch.float64)
    penultimate = graph.nodes[-2].name
    eps = 0.5
    z, lo, hi, rho = bcp.penultimate_bounds(graph, x, eps)
    low, high = coordinate_extremes(lambda v: graph.forward(v, upto=penultimate), x, eps)
    assert (low >= lo - 1e-9).all() and (high <= hi + 1e-9).all()
    # the box is not vacuous: the attack gets close to its ends somewhere
    assert ((lo - low).abs() < 1e-3 * (hi - lo)).any()
    assert torch.allclose(z, graph.forward(x, upto=penultimate).flatten(1))


def test_bcp_is_never_looser_than_the_global_lipschitz_margin_bound_and_often_tighter():
    graph = mlp([6, 16, 16, 4], seed=4)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    pred = predict(graph, x)
    k = torch.tensor(compose(graph).margin_upper, dtype=torch.float64)
    y = graph(x)
    margin = y.gather(1, pred[:, None]) - y
    tighter = 0
    for eps in (0.1, 0.5, 2.0):
        bound = bcp.lower_bounds(graph, x, pred, eps)
        global_bound = margin - eps * k[pred]
        off = torch.ones_like(bound, dtype=torch.bool)
        off[torch.arange(20), pred] = False
        slack = 1e-8 * (1 + margin.abs() + eps * k[pred])
        assert (bound[off] >= (global_bound - slack)[off]).all()
        tighter += int((bound[off] > global_bound[off] + 1e-6).sum())
    assert tighter > 0  # the box constraint does cut the ellipsoid somewhere


# --------------------------------------------------------------------------- KW


def lp_relaxation_minimum(graph, bounds, x0, eps, c):
    """min cᵀẑ_out over the KW relaxation (l∞ input ball; given ReLU bounds), solved by HiGHS."""
    layers = dense_layers(graph)
    sizes = [layers[0][0].shape[1]] + [w.shape[0] for w, _ in layers]
    # variables: x, then (ẑ_k, z_k) per hidden layer, then ẑ_out
    offsets, n = [], 0
    for s in [sizes[0]] + [v for h in sizes[1:-1] for v in (h, h)] + [sizes[-1]]:
        offsets.append(n)
        n += s
    a_eq, b_eq, a_ub, b_ub = [], [], [], []
    var_bounds = [(None, None)] * n
    for j in range(sizes[0]):
        var_bounds[j] = (x0[j].item() - eps, x0[j].item() + eps)
    prev = 0  # offset of the current layer's input
    for k, (w, b) in enumerate(layers):
        out = offsets[1 + 2 * k]
        for i in range(w.shape[0]):  # ẑ = W prev + b
            row = np.zeros(n)
            row[out + i] = 1.0
            row[prev : prev + w.shape[1]] = -w[i].numpy()
            a_eq.append(row)
            b_eq.append(b[i].item())
        if k == len(layers) - 1:
            break
        post = offsets[2 + 2 * k]
        lower, upper = bounds[k]
        lower, upper = lower.flatten(1), upper.flatten(1)
        for i in range(w.shape[0]):
            l, u = lower[0, i].item(), upper[0, i].item()
            if u <= 0:  # z = 0
                row = np.zeros(n); row[post + i] = 1.0; a_eq.append(row); b_eq.append(0.0)
            elif l >= 0:  # z = ẑ
                row = np.zeros(n); row[post + i] = 1.0; row[out + i] = -1.0; a_eq.append(row); b_eq.append(0.0)
            else:  # z ≥ 0, z ≥ ẑ, (u − l) z − u ẑ ≤ −u l
                row = np.zeros(n); row[post + i] = -1.0; a_ub.append(row); b_ub.append(0.0)
                row = np.zeros(n); row[post + i] = -1.0; row[out + i] = 1.0; a_ub.append(row); b_ub.append(0.0)
                row = np.zeros(n); row[post + i] = u - l; row[out + i] = -u; a_ub.append(row); b_ub.append(-u * l)
        prev = post
    objective = np.zeros(n)
    objective[offsets[-1] : offsets[-1] + sizes[-1]] = c
    result = linprog(objective, A_ub=np.array(a_ub) if a_ub else None, b_ub=b_ub or None,
                     A_eq=np.array(a_eq), b_eq=b_eq, bounds=var_bounds, method="highs")
    assert result.status == 0, result.message
    return result.fun


@pytest.mark.parametrize("build, epsilons", [
    (lambda: mlp([4, 8, 8, 3], seed=7), (0.05, 0.25)),
    (lambda: tiny_conv(seed=4), (0.02, 0.08)),
], ids=["mlp", "conv"])
def test_kw_dual_bound_is_below_the_exact_lp_relaxation_optimum_linf(build, epsilons):
    graph = build()
    gen = torch.Generator().manual_seed(8)
    x = torch.rand(3, *graph.input_shape, generator=gen, dtype=torch.float64)
    pred = predict(graph, x)
    for eps in epsilons:
        bounds = kw.layer_bounds(graph, x, eps, norm="linf")
        dual = kw.lower_bounds(graph, x, pred, eps, norm="linf")
        for n in range(3):
            per_sample = [(lo[n : n + 1], up[n : n + 1]) for lo, up in bounds]
            for i in range(3):
                if i == pred[n]:
                    continue
                c = np.zeros(3)
                c[pred[n]], c[i] = 1.0, -1.0
                optimum = lp_relaxation_minimum(graph, per_sample, x[n].flatten(), eps, c)
                assert dual[n, i].item() <= optimum + 1e-7 * (1 + abs(optimum))
                assert dual[n, i].item() >= optimum - 0.5 * (1 + abs(optimum))  # and not absurdly loose


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("build", [lambda: mlp([5, 12, 12, 4], seed=1), lambda: tiny_conv(seed=2)], ids=["mlp", "conv"])
def test_kw_bound_never_exceeds_the_minimum_found_by_pgd(build, norm):
    graph = build()
    gen = torch.Generator().manual_seed(9)
    x = torch.rand(5, *graph.input_shape, generator=gen, dtype=torch.float64)
    pred = predict(graph, x)
    for eps in (0.05, 0.3) if norm == "l2" else (0.02, 0.1):
        bound = kw.lower_bounds(graph, x, pred, eps, norm=norm)
        attacked = pgd_pair_margins(graph, x, pred, eps, norm=norm, steps=60, restarts=4)
        assert close_below(bound, attacked)


def test_kw_layer_bounds_contain_every_sampled_preactivation():
    graph = tiny_conv(seed=3)
    gen = torch.Generator().manual_seed(10)
    x = torch.rand(2, 1, 6, 6, generator=gen, dtype=torch.float64)
    eps = 0.4
    bounds = kw.layer_bounds(graph, x, eps)
    relu_inputs = [n.inputs[0] for n in graph.nodes if isinstance(n.op, Activation)]
    delta = torch.randn(200, 2, 1, 6, 6, generator=gen, dtype=torch.float64)
    delta = delta / delta.flatten(2).norm(dim=2)[..., None, None, None] * eps
    for (lower, upper), name in zip(bounds, relu_inputs):
        values = graph.forward((x + delta).reshape(-1, 1, 6, 6), upto=name).reshape(200, 2, *lower.shape[1:])
        assert (values >= lower - 1e-12).all() and (values <= upper + 1e-12).all()


def test_kw_certified_radius_is_nonnegative_and_certification_is_monotone_in_eps():
    graph, x = trained_mlp(seed=1)
    pred = predict(graph, x)
    radius = kw.certified_radius(graph, x, pred, eps_max=2.0, tol=1e-3)
    assert (radius >= 0).all() and (radius > 0).any()
    grid = torch.linspace(0.0, 2.0, 21, dtype=torch.float64)
    verdicts = torch.stack([kw.certify(graph, x, pred, float(e)) for e in grid], dim=1)  # (N, eps)
    for row in verdicts:
        failed = (~row).nonzero()
        if len(failed):
            assert not row[failed[0, 0]:].any()  # once lost, never regained at a larger ε
    certified = radius > 0
    assert kw.certify(graph, x[certified], pred[certified], radius[certified]).all()


# --------------------------------------------------------------------------- models through the real loader


@pytest.mark.parametrize("kind, modules", [
    ("chain", (bcp, kw)), ("normalised", (bcp, kw)), ("linear_only", (bcp, kw)), ("activations", (bcp,)),
])
def test_bounds_hold_on_loaded_onnx_models(saved_model, kind, modules):
    _, path = saved_model(kind)
    graph = load_saved(path).graph
    gen = torch.Generator().manual_seed(13)
    x = torch.rand(3, *graph.input_shape, generator=gen, dtype=torch.float64)
    pred = predict(graph, x)
    attacked = pgd_pair_margins(graph, x, pred, 0.1, steps=40, restarts=2)
    for module in modules:
        assert close_below(module.lower_bounds(graph, x, pred, 0.1), attacked)


# --------------------------------------------------------------------------- attack inside the radius


@pytest.mark.parametrize("module", [bcp, kw], ids=["bcp", "kw"])
def test_no_certified_sample_is_broken_by_a_pgd_l2_attack_inside_its_radius(module):
    graph, x = trained_mlp(seed=0)
    pred = predict(graph, x)
    radius = module.certified_radius(graph, x, pred, eps_max=3.0, tol=1e-3)
    certified = radius > 0
    assert certified.sum() >= 4  # the test means something
    assert module.certify(graph, x[certified], pred[certified], radius[certified]).all()
    bound = module.lower_bounds(graph, x[certified], pred[certified], radius[certified])
    attacked = pgd_pair_margins(graph, x[certified], pred[certified], radius[certified], steps=100, restarts=5)
    assert (attacked.amin(dim=1) > 0).all()
    assert close_below(bound, attacked)


def test_no_kw_linf_certificate_is_broken_by_a_pgd_linf_attack():
    graph, x = trained_mlp(seed=2)
    pred = predict(graph, x)
    eps = 0.15
    certified = kw.certify(graph, x, pred, eps, norm="linf")
    assert certified.any()
    attacked = pgd_margin(graph, x[certified], pred[certified], eps, norm="linf", steps=100, restarts=5)
    assert (attacked > 0).all()


def test_bcp_radius_is_at_least_the_global_lipschitz_radius():
    graph, x = trained_mlp(seed=3)
    pred = predict(graph, x)
    k = torch.tensor(compose(graph).margin_upper, dtype=torch.float64)
    y = graph(x)
    margin = y.gather(1, pred[:, None]) - y
    ratio = margin / k[pred]
    ratio[torch.arange(len(x)), pred] = math.inf
    global_radius = ratio.amin(dim=1).clamp(min=0, max=3.0)
    radius = bcp.certified_radius(graph, x, pred, eps_max=3.0, tol=1e-3)
    assert (radius >= global_radius - 1e-3 - 1e-9).all()


# --------------------------------------------------------------------------- plumbing


def test_linear_op_adjoints_match_autograd():
    gen = torch.Generator().manual_seed(11)
    cases = [
        (Conv2d(torch.randn(4, 2, 3, 2, generator=gen, dtype=torch.float64), None, (2, 1), (1, 0, 2, 1), (1, 2), 2), (4, 7, 6)),
        (Linear(torch.randn(5, 3, generator=gen, dtype=torch.float64)), (3,)),
        (Affine(torch.randn(2, 1, 1, generator=gen, dtype=torch.float64), torch.zeros(2, 1, 1, dtype=torch.float64)), (2, 3, 3)),
        (Reshape((-1,)), (2, 3, 3)),
    ]
    for op, shape in cases:
        x = torch.randn(3, *shape, generator=gen, dtype=torch.float64, requires_grad=True)
        y = op.homogeneous(x)
        v = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        (expected,) = torch.autograd.grad(y, x, v)
        assert torch.allclose(local.adjoint(op, v, shape), expected, atol=1e-12)


def branching_graph():
    w = torch.eye(4, dtype=torch.float64)
    nodes = [
        Node("fc", Linear(w), ("x",)),
        Node("relu", Activation("relu"), ("fc",)),
        Node("add", Add(), ("relu", "fc")),
        Node("out", Linear(w[:3]), ("add",)),
    ]
    return Graph("x", (4,), nodes, "out")


def with_node(op):
    return Graph("x", (1, 4, 4), [
        Node("conv", Conv2d(torch.ones(2, 1, 3, 3, dtype=torch.float64), None, (1, 1), (1, 1, 1, 1)), ("x",)),
        Node("odd", op, ("conv",)),
        Node("flat", Reshape((-1,)), ("odd",)),
        Node("fc", Linear(torch.ones(3, 32 if not isinstance(op, MaxPool) else 8, dtype=torch.float64)), ("flat",)),
    ], "fc")


@pytest.mark.parametrize(
    "module, graph, words",
    [
        (kw, lambda: with_node(MaxPool((2, 2), (2, 2))), ["ReLU networks only", "'odd'", "MaxPool"]),
        (kw, lambda: with_node(MinMax(axis=1)), ["ReLU networks only", "'odd'", "MinMax"]),
        (kw, lambda: with_node(Activation("tanh")), ["ReLU networks only", "'odd'", "tanh"]),
        (bcp, lambda: with_node(MinMax(axis=1)), ["BCP", "'odd'", "MinMax"]),
        (bcp, lambda: with_node(MaxPool((2, 2), (2, 2))), ["BCP", "'odd'", "MaxPool"]),
        (bcp, lambda: with_node(Activation("leaky_relu", -0.5)), ["monotone", "'odd'"]),
        (bcp, branching_graph, ["sequential", "'add'"]),
        (kw, branching_graph, ["sequential", "'add'"]),
    ],
)
def test_unsupported_graphs_are_refused_with_a_clear_error(module, graph, words):
    g = graph()
    x = torch.rand(2, *g.input_shape, dtype=torch.float64)
    with pytest.raises(GlorocertError) as info:
        module.certify(g, x, torch.zeros(2, dtype=torch.int64), 0.1)
    for word in words:
        assert word in str(info.value)


def test_bcp_refuses_a_network_that_does_not_end_with_a_linear_layer():
    g = Graph("x", (3,), [Node("fc", Linear(torch.eye(3, dtype=torch.float64)), ("x",)), Node("relu", Activation("relu"), ("fc",))], "relu")
    with pytest.raises(GlorocertError, match="end with a linear layer"):
        bcp.certify(g, torch.rand(1, 3), torch.zeros(1, dtype=torch.int64), 0.1)


@pytest.mark.parametrize("module", [bcp, kw], ids=["bcp", "kw"])
def test_bad_inputs_are_refused(module):
    graph = mlp([4, 6, 3])
    x = torch.rand(2, 4, dtype=torch.float64)
    good = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(GlorocertError, match="shape"):
        module.certify(graph, torch.rand(2, 5), good, 0.1)
    with pytest.raises(GlorocertError, match="NaN"):
        module.certify(graph, torch.full((2, 4), math.nan), good, 0.1)
    with pytest.raises(GlorocertError, match="classes"):
        module.certify(graph, x, torch.tensor([0, 3]), 0.1)
    with pytest.raises(GlorocertError, match="eps"):
        module.certify(graph, x, good, -0.1)
    assert module.certify(graph, x[:0], good[:0], 0.1).shape == (0,)
