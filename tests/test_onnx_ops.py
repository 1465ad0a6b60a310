"""ONNX operators beyond the basic set: each loads (the IR agrees with onnxruntime), and its bound is checked
against a truth computed without the code under test.

* linear operators: the exact spectral norm of the model's explicit matrix, built by running onnxruntime
  on every basis vector (float32) and by running the IR (float64), the two matrices compared;
* nonlinear operators: the largest |f'| on a dense grid (activations) or the largest difference quotient
  and gradient norm that an Adam search finds, on a torch reference written out here (and itself checked
  against the IR, so that it is the function onnxruntime computes);
* refusals: what has no global bound, or would move the batch axis, is refused naming the op and node.

Graphs are built with onnx.helper in the forms exporters write, across the opsets where an operator's
signature changed (attributes that became inputs), and by exporting small torch modules.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from glorocert import graph as ir
from glorocert.errors import GlorocertError, UnsupportedOperator
from glorocert.lipschitz import operators
from glorocert.lipschitz.compose import compose
from glorocert.loaders import load
from glorocert.loaders.onnx_loader import onnx_to_graph
from helpers import largest_quotient

RNG = np.random.default_rng(0)


# LAPACK's SVD and float64 difference quotients are accurate to a few ulps: a truth may tie with a bound
# and land 1e-15 above it.
REFERENCE_RTOL = 1e-12


# --------------------------------------------------------------------------- building and checking files


def weight(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def onnx_file(tmp_path, nodes, in_shape, *, inits=None, opset=17, flatten=True, last="y", name="model"):
    """input (batch, *in_shape) → nodes (the last writes ``last``) → Flatten → logits, saved as an ONNX file."""
    nodes = list(nodes)
    if flatten:
        nodes.append(helper.make_node("Flatten", [last], ["logits"], name="flatten"))
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *in_shape])],
        [helper.make_tensor_value_info("logits" if flatten else last, TensorProto.FLOAT, ["batch", "features"] if flatten else ["batch", *in_shape])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def exported(tmp_path, module, in_shape, *, opset=17, name="torch"):
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(1, *in_shape),), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def ort_matrix(path, in_shape) -> np.ndarray:
    """The native model's linear part (out × in), from onnxruntime on every basis vector and on zero."""
    n = math.prod(in_shape)
    basis = np.concatenate([np.eye(n, dtype=np.float32), np.zeros((1, n), np.float32)]).reshape(n + 1, *in_shape)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: basis})[0].reshape(n + 1, -1).astype(np.float64)
    return (out[:n] - out[n]).T


def ir_matrix(graph, in_shape) -> torch.Tensor:
    n = math.prod(in_shape)
    basis = torch.cat([torch.eye(n, dtype=torch.float64), torch.zeros(1, n, dtype=torch.float64)]).reshape(n + 1, *in_shape)
    with torch.no_grad():
        out = graph.forward(basis).reshape(n + 1, -1)
    return (out[:n] - out[n]).T


def check_linear(path, in_shape, *, kinds=()):
    """Loads; the IR's matrix is onnxruntime's; the bound is ≥ its exact norm (exact path: within 1e-3; per-operator path too)."""
    model = load(path)
    ops = {type(n.op).__name__ for n in model.graph.nodes}
    assert set(kinds) <= ops, ops
    native, mine = ort_matrix(path, in_shape), ir_matrix(model.graph, in_shape)
    scale = 1.0 + np.abs(native).max()
    assert np.abs(native - mine.numpy()).max() <= 1e-5 * scale
    exact = torch.linalg.svdvals(mine)[0].item()
    assert exact == pytest.approx(np.linalg.svd(native, compute_uv=False)[0], rel=1e-5)
    bound = compose(model.graph).global_upper
    assert exact <= bound <= exact * 1.001
    assert compose(model.graph, exact_side=0).global_upper >= exact * (1 - REFERENCE_RTOL)
    return model, exact


def assert_refused(path, op, words=""):
    with pytest.raises(UnsupportedOperator, match=words) as caught:
        load(path)
    assert caught.value.op == op and caught.value.node in str(caught.value)


# --------------------------------------------------------------------------- activations: constant vs autograd


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


SELU = (1.67326319217681884765625, 1.05070102214813232421875)  # ONNX defaults (float32)
ACTIVATION_CASES = {
    # id: (op, attributes, extra constant inputs, opset, torch reference written out)
    "relu": ("Relu", {}, {}, 17, torch.relu),
    "leaky_relu_negative_slope": ("LeakyRelu", {"alpha": -1.5}, {}, 17, lambda x: torch.where(x > 0, x, -1.5 * x)),
    "elu_alpha_0.5": ("Elu", {"alpha": 0.5}, {}, 17, lambda x: torch.where(x > 0, x, 0.5 * (torch.exp(x) - 1))),
    "elu_alpha_2": ("Elu", {"alpha": 2.0}, {}, 17, lambda x: torch.where(x > 0, x, 2.0 * (torch.exp(x) - 1))),
    "selu": ("Selu", {}, {}, 17, lambda x: SELU[1] * torch.where(x > 0, x, SELU[0] * (torch.exp(x) - 1))),
    "celu": ("Celu", {"alpha": 0.75}, {}, 17, lambda x: torch.clamp(x, min=0) + torch.clamp(0.75 * (torch.exp(x / 0.75) - 1), max=0)),
    "softplus": ("Softplus", {}, {}, 17, lambda x: torch.log1p(torch.exp(-x.abs())) + x.clamp(min=0)),
    "softsign": ("Softsign", {}, {}, 17, lambda x: x / (1 + x.abs())),
    "abs": ("Abs", {}, {}, 17, torch.abs),
    "neg": ("Neg", {}, {}, 17, lambda x: -x),
    "tanh": ("Tanh", {}, {}, 17, torch.tanh),
    "sigmoid": ("Sigmoid", {}, {}, 17, torch.sigmoid),
    "hardsigmoid_default": ("HardSigmoid", {}, {}, 17, lambda x: torch.clamp(0.2 * x + 0.5, 0, 1)),
    "hardsigmoid_steep": ("HardSigmoid", {"alpha": 3.0, "beta": 0.125}, {}, 17, lambda x: torch.clamp(3 * x + 0.125, 0, 1)),
    "hardswish_op14": ("HardSwish", {}, {}, 14, lambda x: x * torch.clamp(x + 3, 0, 6) / 6),
    "mish_op18": ("Mish", {}, {}, 18, lambda x: x * torch.tanh(F.softplus(x))),
    "gelu_op20": ("Gelu", {}, {}, 20, _gelu),
    "gelu_tanh_op20": ("Gelu", {"approximate": "tanh"}, {}, 20, _gelu_tanh),
    "clip_attributes_op6": ("Clip", {"min": -1.0, "max": 2.0}, {}, 6, lambda x: torch.clamp(x, -1, 2)),
    "clip_inputs_op13_relu6": ("Clip", {}, {"lo": np.float32(0.0), "hi": np.float32(6.0)}, 13, lambda x: torch.clamp(x, 0, 6)),
    "clip_min_only_op11": ("Clip", {}, {"lo": np.float32(-0.5)}, 11, lambda x: torch.clamp(x, min=-0.5)),
}


def activation_file(tmp_path, case):
    op, attributes, extra, opset, _ = ACTIVATION_CASES[case]
    node = helper.make_node(op, ["input", *extra], ["y"], name="act", **attributes)
    return onnx_file(tmp_path, [node], (8,), inits=extra, opset=opset, flatten=False)


@pytest.mark.parametrize("case", list(ACTIVATION_CASES))
def test_activation_constant_is_the_largest_slope_autograd_finds(tmp_path, case):
    model = load(activation_file(tmp_path, case))
    reference = ACTIVATION_CASES[case][4]
    x = 4 * torch.randn(64, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(model.graph.forward(x), reference(x), atol=1e-9)  # the reference is the model
    grid = torch.linspace(-20, 20, 800_001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(reference(grid).sum(), grid)
    largest = slope.abs().max().item()
    bound = compose(model.graph).global_upper
    assert largest <= bound * (1 + REFERENCE_RTOL)
    assert bound <= largest * (1 + 1e-3)  # and as tight as the grid resolves


def polished_supremum(f) -> float:
    """sup |f'|: the best point of a dense grid, then L-BFGS on −|f'| from there."""
    x = torch.linspace(-6, 6, 120_001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(f(x).sum(), x)
    x0 = x[slope.abs().argmax()].detach().clone().requires_grad_()
    optimiser = torch.optim.LBFGS([x0], max_iter=100, tolerance_grad=1e-14, tolerance_change=1e-16)

    def negative_slope():
        optimiser.zero_grad()
        (g,) = torch.autograd.grad(f(x0), x0, create_graph=True)
        loss = -g.abs()
        loss.backward()
        return loss

    optimiser.step(negative_slope)
    (g,) = torch.autograd.grad(f(x0), x0)
    return max(slope.abs().max().item(), abs(g.item()))


def test_smooth_activation_constants_are_above_the_exact_suprema_by_5e_6_to_1e_5():
    """The constants written in graph.py against a polished maximisation of |f'| (closed form for GELU)."""
    exact_gelu = 0.5 * (1 + math.erf(1)) + math.sqrt(2) * math.exp(-1) / math.sqrt(2 * math.pi)  # Φ(√2) + √2·φ(√2)
    assert exact_gelu + 5e-6 <= ir.GELU_LIPSCHITZ <= exact_gelu + 1e-5
    for kind, f in [("gelu", _gelu), ("gelu_tanh", _gelu_tanh), ("silu", F.silu), ("mish", lambda v: v * torch.tanh(F.softplus(v)))]:
        supremum, constant = polished_supremum(f), ir.Activation(kind).lipschitz
        assert supremum + 5e-6 <= constant <= supremum + 1e-5, (kind, supremum, constant)


def test_prelu_with_a_slope_per_channel(tmp_path):
    slope = np.array([0.3, -2.5, 1.0], np.float32).reshape(3, 1, 1)
    path = onnx_file(tmp_path, [helper.make_node("PRelu", ["input", "slope"], ["y"])], (3, 4, 4), inits={"slope": slope})
    model = load(path)
    assert any(isinstance(n.op, ir.PReLU) for n in model.graph.nodes)
    bound = compose(model.graph).global_upper
    f = lambda x: torch.where(x >= 0, x, x * torch.from_numpy(slope).double()).flatten(1)  # noqa: E731
    assert largest_quotient(f, (3, 4, 4)) <= bound * (1 + REFERENCE_RTOL)
    assert bound == pytest.approx(2.5)


def test_prelu_with_one_shared_slope_is_a_leaky_relu(tmp_path):
    path = onnx_file(tmp_path, [helper.make_node("PRelu", ["input", "slope"], ["y"])], (8,), inits={"slope": np.array([0.25], np.float32)})
    (node,) = [n for n in load(path).graph.nodes if isinstance(n.op, ir.Activation)]
    assert node.op.kind == "leaky_relu" and node.op.slope == 0.25


# --------------------------------------------------------------------------- decomposed activations (exporters)


class Mlp(nn.Sequential):
    def __init__(self, act: nn.Module, seed=0):
        torch.manual_seed(seed)
        super().__init__(nn.Linear(8, 16), act, nn.Linear(16, 10))


TORCH_ACTIVATIONS = {
    # id: (module, opset, the IR activation expected)
    "silu": (nn.SiLU(), 17, "silu"),
    "gelu_erf": (nn.GELU(), 17, "gelu"),
    "gelu_tanh": (nn.GELU(approximate="tanh"), 17, "gelu_tanh"),
    "mish": (nn.Mish(), 17, "mish"),
    "hardswish_op13": (nn.Hardswish(), 13, "hardswish"),
    "hardswish_op17": (nn.Hardswish(), 17, "hardswish"),
    "hardsigmoid": (nn.Hardsigmoid(), 17, "hardsigmoid"),
    "softsign": (nn.Softsign(), 17, "softsign"),
    "softplus_beta2": (nn.Softplus(beta=2.0), 17, "softplus"),
    "relu6": (nn.ReLU6(), 17, "clip"),
    "hardtanh": (nn.Hardtanh(-2.0, 3.0), 17, "clip"),
    "elu": (nn.ELU(0.5), 17, "elu"),
    "selu": (nn.SELU(), 17, "selu"),
    "celu": (nn.CELU(1.5), 17, "celu"),
}


@pytest.mark.parametrize("case", list(TORCH_ACTIVATIONS))
def test_exported_activations_are_recognised_and_bounded(tmp_path, case):
    act, opset, kind = TORCH_ACTIVATIONS[case]
    module = Mlp(act)
    model = load(exported(tmp_path, module, (8,), opset=opset))
    kinds = [n.op.kind for n in model.graph.nodes if isinstance(n.op, ir.Activation)]
    assert kinds == [kind]
    bound = compose(model.graph)
    double = module.double()
    assert largest_quotient(lambda x: double(x), (8,)) <= bound.global_upper
    x = torch.randn(32, 8, dtype=torch.float64) * 3
    jac = torch.func.vmap(torch.func.jacrev(lambda v: double(v.unsqueeze(0)).squeeze(0)))(x)
    assert torch.linalg.matrix_norm(jac, ord=2).max().item() <= bound.global_upper


def _silu_nodes(order=("x", "s")):
    return [helper.make_node("Sigmoid", ["input"], ["s"]), helper.make_node("Mul", [{"x": "input", "s": "s"}[k] for k in order], ["y"])]


def test_silu_is_recognised_in_either_operand_order_and_with_a_scale(tmp_path):
    for order in (("x", "s"), ("s", "x")):
        path = onnx_file(tmp_path, _silu_nodes(order), (8,), name=f"silu_{order[0]}")
        assert [n.op.describe() for n in load(path).graph.nodes][:1] == ["silu"]
    # GELU written with the 0.5 first: Mul(Mul(x, 0.5), 1 + erf(x/√2))
    nodes = [
        helper.make_node("Mul", ["input", "half"], ["h"]), helper.make_node("Mul", ["input", "r2"], ["z"]),
        helper.make_node("Erf", ["z"], ["e"]), helper.make_node("Add", ["one", "e"], ["p"]), helper.make_node("Mul", ["h", "p"], ["y"]),
    ]
    inits = {"half": np.float32(0.5), "r2": np.float32(1 / math.sqrt(2)), "one": np.float32(1.0)}
    model = load(onnx_file(tmp_path, nodes, (8,), inits=inits, name="gelu_half_first"))
    assert [n.op.describe() for n in model.graph.nodes][:1] == ["gelu"]


STILL_REFUSED_ELEMENTWISE = {
    # id: (nodes, constants, refused op)
    "square": ([helper.make_node("Mul", ["input", "input"], ["y"], name="square")], {}, "Mul"),
    "x_tanh_x": ([helper.make_node("Tanh", ["input"], ["t"]), helper.make_node("Mul", ["input", "t"], ["y"], name="prod")], {}, "Mul"),
    "swish_beta_2": ([helper.make_node("Mul", ["input", "two"], ["b"]), helper.make_node("Sigmoid", ["b"], ["s"]),
                      helper.make_node("Mul", ["input", "s"], ["y"], name="prod")], {"two": np.float32(2.0)}, "Mul"),
    "reciprocal_div": ([helper.make_node("Div", ["one", "input"], ["y"], name="inv")], {"one": np.float32(1.0)}, "Div"),
    "div_by_tensor": ([helper.make_node("Relu", ["input"], ["r"]), helper.make_node("Div", ["input", "r"], ["y"], name="div")], {}, "Div"),
    "erf_alone": ([helper.make_node("Erf", ["input"], ["y"], name="erf")], {}, "Erf"),
    "pow": ([helper.make_node("Pow", ["input", "three"], ["y"], name="cube")], {"three": np.float32(3.0)}, "Pow"),
    "exp": ([helper.make_node("Exp", ["input"], ["y"], name="exp")], {}, "Exp"),
    "log": ([helper.make_node("Log", ["input"], ["y"], name="log")], {}, "Log"),
    "reciprocal": ([helper.make_node("Reciprocal", ["input"], ["y"], name="rec")], {}, "Reciprocal"),
    "thresholded_relu": ([helper.make_node("ThresholdedRelu", ["input"], ["y"], name="thr", alpha=1.0)], {}, "ThresholdedRelu"),
    # the sigmoid is read outside the SiLU: the product cannot be read as one activation
    "silu_with_shared_sigmoid": (_silu_nodes() + [helper.make_node("Add", ["y", "s"], ["z"], name="add")], {}, "Mul"),
}


@pytest.mark.parametrize("case", list(STILL_REFUSED_ELEMENTWISE))
def test_products_and_unbounded_elementwise_ops_stay_refused(tmp_path, case):
    nodes, inits, op = STILL_REFUSED_ELEMENTWISE[case]
    last = nodes[-1].output[0]
    assert_refused(onnx_file(tmp_path, nodes, (8,), inits=inits, last=last), op)


def test_softmax_inside_the_network_is_refused(tmp_path):
    nodes = [helper.make_node("Softmax", ["input"], ["s"], name="attention", axis=1), helper.make_node("Gemm", ["s", "w"], ["y"], transB=1)]
    assert_refused(onnx_file(tmp_path, nodes, (8,), inits={"w": weight(10, 8)}), "Softmax", "softmax")


# --------------------------------------------------------------------------- GroupSort, FullSort, MaxMin (deel-torchlip)


def group_sort(x, group):
    """deel-torchlip's functional.group_sort, written out: reshape → (min, max) or sort → reshape."""
    groups = x.reshape(x.shape[0], x.shape[1] // group, group, *x.shape[2:])
    if group == 2:
        lo, hi = torch.min(groups, 2, keepdim=True)[0], torch.max(groups, 2, keepdim=True)[0]
        return torch.cat([lo, hi], dim=2).view(x.shape)
    return torch.sort(groups, dim=2)[0].reshape(x.shape)


class GroupSort(nn.Module):
    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, x):
        return group_sort(x, self.group)


class MaxMin(nn.Module):
    """deel-torchlip's MaxMin: cat(relu(x), relu(−x)) along the channels."""

    def forward(self, x):
        return torch.cat((F.relu(x), F.relu(-x)), dim=1)


LIPSCHITZ_ACTIVATIONS = {
    "groupsort2_dense": (GroupSort(2), (8,), 11, ir.GroupMinMax),
    "groupsort2_conv": (GroupSort(2), (4, 3, 3), 17, ir.GroupMinMax),
    "groupsort2_opset18": (GroupSort(2), (8,), 18, ir.GroupMinMax),
    "groupsort4": (GroupSort(4), (8,), 17, ir.Sort),
    "fullsort": (GroupSort(8), (8,), 17, ir.Sort),
    "maxmin_dense": (MaxMin(), (8,), 17, ir.CReLU),
    "maxmin_conv": (MaxMin(), (2, 3, 3), 17, ir.CReLU),
}


@pytest.mark.parametrize("case", list(LIPSCHITZ_ACTIVATIONS))
def test_deel_torchlip_activations_are_read_as_1_lipschitz_ops(tmp_path, case):
    act, shape, opset, op = LIPSCHITZ_ACTIVATIONS[case]
    module = nn.Sequential(act, nn.Flatten())
    model = load(exported(tmp_path, module, shape, opset=opset))
    assert any(isinstance(n.op, op) for n in model.graph.nodes)
    bound = compose(model.graph).global_upper
    assert bound == pytest.approx(1.0, rel=1e-5)  # the exact constant: a sort or a disjoint CReLU is an isometry somewhere
    assert largest_quotient(lambda x: module(x), shape) <= bound * (1 + REFERENCE_RTOL)
    x = torch.randn(4, *shape, dtype=torch.float64)
    y = x.clone()
    y.view(4, -1)[:, 0] += 1e-3  # a small move of one coordinate moves the output by as much
    assert ((module(y) - module(x)).norm(dim=1) / (y - x).flatten(1).norm(dim=1)).max().item() == pytest.approx(1.0, rel=1e-6)


def _reduce_nodes(kind, opset, keepdims=1, axes=(2,)):
    if opset >= 18:
        return [helper.make_node(kind, ["input", "axes"], ["y"], name="reduce", keepdims=keepdims)], {"axes": np.array(axes, np.int64)}
    return [helper.make_node(kind, ["input"], ["y"], name="reduce", axes=list(axes), keepdims=keepdims)], {}


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("kind, keepdims", [("ReduceMax", 1), ("ReduceMin", 0)])
def test_reduce_max_and_min_over_sample_axes_are_1_lipschitz(tmp_path, opset, kind, keepdims):
    nodes, inits = _reduce_nodes(kind, opset, keepdims, axes=(2, -1))
    model = load(onnx_file(tmp_path, nodes, (3, 4, 5), inits=inits, opset=opset))
    assert any(isinstance(n.op, ir.Reduce) for n in model.graph.nodes)
    reduce = torch.amax if kind == "ReduceMax" else torch.amin
    f = lambda x: reduce(x, dim=(2, 3)).flatten(1)  # noqa: E731
    with torch.no_grad():
        x = torch.randn(5, 3, 4, 5, dtype=torch.float64)
        assert torch.equal(model.graph.forward(x), f(x))
    assert largest_quotient(f, (3, 4, 5)) <= compose(model.graph).global_upper * (1 + REFERENCE_RTOL)
    assert compose(model.graph).global_upper == pytest.approx(1.0)


def test_global_max_pool_is_1_lipschitz(tmp_path):
    model = load(onnx_file(tmp_path, [helper.make_node("GlobalMaxPool", ["input"], ["y"])], (3, 4, 4)))
    assert compose(model.graph).global_upper == pytest.approx(1.0)


@pytest.mark.parametrize("opset, largest, k", [(10, 1, 6), (11, 0, 6), (17, 1, 4), (17, 0, 2)])
def test_topk_values_are_a_1_lipschitz_sort(tmp_path, opset, largest, k):
    node = helper.make_node("TopK", ["input", "k"], ["y", "indices"], axis=-1, **({"largest": largest} if opset >= 11 else {}))
    if opset == 10 and not largest:
        pytest.skip("opset 10 has no ascending TopK")
    model = load(onnx_file(tmp_path, [node], (2, 6), inits={"k": np.array([k], np.int64)}, opset=opset))
    f = lambda x: torch.sort(x, dim=-1, descending=bool(largest))[0][..., :k].flatten(1)  # noqa: E731
    with torch.no_grad():
        x = torch.randn(5, 2, 6, dtype=torch.float64)
        assert torch.equal(model.graph.forward(x), f(x))
    bound = compose(model.graph).global_upper
    assert largest_quotient(f, (2, 6)) <= bound * (1 + REFERENCE_RTOL)
    assert bound == pytest.approx(1.0)


def test_group_minmax_pattern_from_onnx_helper_in_both_axis_forms(tmp_path):
    for opset in (13, 18):
        low, inits = _reduce_nodes("ReduceMin", opset)
        high, _ = _reduce_nodes("ReduceMax", opset)
        low[0].output[0], high[0].output[0] = "lo", "hi"
        nodes = [helper.make_node("Reshape", ["input", "shape"], ["g"]), *[helper.make_node(n.op_type, [i.replace("input", "g") for i in n.input], n.output, **{a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in (low + high)],
                 helper.make_node("Concat", ["lo", "hi"], ["y"], axis=2)]
        inits = {**inits, "shape": np.array([-1, 4, 2], np.int64)}
        model = load(onnx_file(tmp_path, nodes, (8,), inits=inits, opset=opset, name=f"gs{opset}"))
        assert any(isinstance(n.op, ir.GroupMinMax) for n in model.graph.nodes)
        assert compose(model.graph).global_upper == pytest.approx(1.0)


# --------------------------------------------------------------------------- layout: Transpose, Squeeze, Unsqueeze, DepthToSpace


def test_transpose_of_sample_axes_is_an_isometry(tmp_path):
    nodes = [helper.make_node("Transpose", ["input"], ["t"], perm=[0, 2, 3, 1]), helper.make_node("MatMul", ["t", "w"], ["y"])]
    _, exact = check_linear(onnx_file(tmp_path, nodes, (3, 4, 5), inits={"w": weight(3, 2)}), (3, 4, 5), kinds=["Transpose", "Linear"])
    assert exact == pytest.approx(np.linalg.norm(weight(3, 2), 2), rel=1e-6)  # a permutation then copies of W
    assert operators.upper_bound(ir.Transpose((0, 2, 3, 1)), (3, 4, 5)) == (1.0, "isometry")


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_and_unsqueeze_in_attribute_and_input_forms(tmp_path, opset):
    if opset < 13:
        nodes = [helper.make_node("Unsqueeze", ["input"], ["u"], axes=[2, -1]), helper.make_node("Squeeze", ["u"], ["y"], axes=[2])]
        inits = {}
    else:
        nodes = [helper.make_node("Unsqueeze", ["input", "ua"], ["u"]), helper.make_node("Squeeze", ["u", "sa"], ["y"])]
        inits = {"ua": np.array([2, -1], np.int64), "sa": np.array([2], np.int64)}
    _, exact = check_linear(onnx_file(tmp_path, nodes, (3, 4), inits=inits, opset=opset), (3, 4), kinds=["Reshape"])
    assert exact == pytest.approx(1.0)


@pytest.mark.parametrize("op, mode, shape", [("DepthToSpace", "DCR", (8, 2, 3)), ("DepthToSpace", "CRD", (8, 2, 3)), ("SpaceToDepth", None, (2, 4, 6))])
def test_pixel_shuffles_are_permutations(tmp_path, op, mode, shape):
    node = helper.make_node(op, ["input"], ["y"], blocksize=2, **({"mode": mode} if mode else {}))
    check_linear(onnx_file(tmp_path, [node], shape), shape, kinds=["Transpose"])


LAYOUT_REFUSALS = {
    # id: (nodes, constants, refused op, opset, per-sample input shape)
    "transpose_batch": ([helper.make_node("Transpose", ["input"], ["y"], name="t", perm=[1, 0, 2])], {}, "Transpose", 17, (2, 4)),
    "squeeze_without_axes": ([helper.make_node("Squeeze", ["input"], ["y"], name="s")], {}, "Squeeze", 17, (1, 4)),
    "unsqueeze_front": ([helper.make_node("Unsqueeze", ["input", "a"], ["y"], name="u")], {"a": np.array([0], np.int64)}, "Unsqueeze", 17, (2, 4)),
    "pad_batch": ([helper.make_node("Pad", ["input", "p"], ["y"], name="p")], {"p": np.array([1, 0, 0, 0, 0, 0], np.int64)}, "Pad", 17, (2, 4)),
    "reduce_batch": ([helper.make_node("ReduceMax", ["input"], ["y"], name="r", axes=[0])], {}, "ReduceMax", 13, (2, 4)),
    "reduce_everything": ([helper.make_node("ReduceMax", ["input"], ["y"], name="r")], {}, "ReduceMax", 13, (2, 4)),
    "topk_indices_used": ([helper.make_node("TopK", ["input", "k"], ["v", "i"], name="topk"), helper.make_node("Cast", ["i"], ["y"], to=1)],
                          {"k": np.array([4], np.int64)}, "TopK", 17, (2, 4)),
    "gemm_trans_a": ([helper.make_node("Gemm", ["input", "w"], ["y"], name="g", transA=1)], {"w": weight(2, 3)}, "Gemm", 17, (4,)),
    "gemm_data_as_b": ([helper.make_node("Gemm", ["w", "input"], ["y"], name="g", transB=1)], {"w": weight(3, 4)}, "Gemm", 17, (4,)),
    "matmul_two_tensors": ([helper.make_node("MatMul", ["input", "input"], ["y"], name="mm")], {}, "MatMul", 17, (4, 4)),
    "matmul_constant_left_of_features": ([helper.make_node("MatMul", ["w", "input"], ["y"], name="mm")], {"w": weight(3, 2)}, "MatMul", 17, (4,)),
    "matmul_stack_of_matrices": ([helper.make_node("MatMul", ["input", "w"], ["y"], name="mm")], {"w": weight(2, 4, 3)}, "MatMul", 17, (2, 5, 4)),
    "clip_with_tensor_bound": ([helper.make_node("Clip", ["input", "input"], ["y"], name="clip")], {}, "Clip", 13, (2, 4)),
    "mul_by_constant_of_higher_rank": ([helper.make_node("Mul", ["input", "c"], ["y"], name="mul")], {"c": weight(1, 1, 2, 4)}, "broadcast over batch", 17, (2, 4)),
}


@pytest.mark.parametrize("case", list(LAYOUT_REFUSALS))
def test_ops_that_would_move_the_batch_axis_or_have_no_bound_are_refused(tmp_path, case):
    nodes, inits, op, opset, shape = LAYOUT_REFUSALS[case]
    assert_refused(onnx_file(tmp_path, nodes, shape, inits=inits, opset=opset, last=nodes[-1].output[0]), op)


# --------------------------------------------------------------------------- MatMul and Gemm in every layout


MATMULS = {
    # id: (nodes, constants, per-sample input shape)
    "data_times_w_rank2": ([helper.make_node("MatMul", ["input", "w"], ["y"])], {"w": weight(6, 4)}, (6,)),
    "data_times_w_rank3": ([helper.make_node("MatMul", ["input", "w"], ["y"])], {"w": weight(6, 4)}, (3, 6)),
    "data_times_w_rank4": ([helper.make_node("MatMul", ["input", "w"], ["y"])], {"w": weight(1, 5, 3)}, (2, 3, 5)),
    "data_times_vector": ([helper.make_node("MatMul", ["input", "w"], ["y"])], {"w": weight(6)}, (3, 6)),
    "w_times_data": ([helper.make_node("MatMul", ["w", "input"], ["y"])], {"w": weight(5, 3)}, (3, 4)),
    "w_times_data_rank4": ([helper.make_node("MatMul", ["w", "input"], ["y"])], {"w": weight(2, 4)}, (3, 4, 2)),
    "vector_times_data": ([helper.make_node("MatMul", ["w", "input"], ["y"])], {"w": weight(3)}, (3, 4)),
    "gemm_transB": ([helper.make_node("Gemm", ["input", "w", "b"], ["y"], transB=1, alpha=0.5, beta=2.0)],
                    {"w": weight(4, 6), "b": weight(4)}, (6,)),
    "gemm_no_trans_bias_row": ([helper.make_node("Gemm", ["input", "w", "b"], ["y"])], {"w": weight(6, 4), "b": weight(1, 4)}, (6,)),
    "gemm_scalar_bias": ([helper.make_node("Gemm", ["input", "w", "b"], ["y"], alpha=-1.5)], {"w": weight(6, 4), "b": np.float32(0.3)}, (6,)),
    "gemm_no_bias": ([helper.make_node("Gemm", ["input", "w"], ["y"], transB=1)], {"w": weight(4, 6)}, (6,)),
}


@pytest.mark.parametrize("case", list(MATMULS))
def test_matmul_and_gemm_forms_are_bounded_by_the_matrix_norm(tmp_path, case):
    nodes, inits, shape = MATMULS[case]
    _, exact = check_linear(onnx_file(tmp_path, nodes, shape, inits=inits), shape, kinds=["Linear"])
    w = inits["w"].astype(np.float64).reshape(-1, inits["w"].shape[-1]) if inits["w"].ndim > 1 else inits["w"][None].astype(np.float64)
    scale = {"gemm_transB": 0.5, "gemm_scalar_bias": 1.5}.get(case, 1.0)
    assert exact == pytest.approx(scale * np.linalg.norm(w, 2), rel=1e-5)  # block-diagonal copies of W: its own norm


# --------------------------------------------------------------------------- Pad


PADS = {
    # id: (opset, mode, pads over all axes of (batch, 2, 3, 4), constant value)
    "zero_op10_attribute": (10, "constant", [0, 0, 1, 2, 0, 0, 2, 1], 0.0),
    "constant_value_op11": (11, "constant", [0, 0, 1, 0, 0, 0, 0, 2], 0.7),
    "negative_crop_op13": (13, "constant", [0, 0, -1, 1, 0, 0, 0, 0], 0.0),
    "reflect_op11": (11, "reflect", [0, 0, 2, 1, 0, 0, 1, 3], 0.0),
    "edge_op13": (13, "edge", [0, 0, 3, 0, 0, 0, 2, 4], 0.0),
    "wrap_op19": (19, "wrap", [0, 0, 1, 2, 0, 0, 2, 1], 0.0),
    "channels_reflect_op18_axes": (18, "reflect", [1, 1], 0.0),  # axes = [1]: the channel axis
}


def pad_file(tmp_path, case):
    opset, mode, pads, value = PADS[case]
    if opset <= 10:
        node = helper.make_node("Pad", ["input"], ["y"], mode=mode, pads=pads, value=value)
        return onnx_file(tmp_path, [node], (2, 3, 4), opset=opset)
    inputs, inits = ["input", "pads"], {"pads": np.array(pads, np.int64)}
    if value or len(pads) == 2:
        inputs.append("value")
        inits["value"] = np.float32(value)
    if len(pads) == 2:
        inputs.append("axes")
        inits["axes"] = np.array([1], np.int64)
    return onnx_file(tmp_path, [helper.make_node("Pad", inputs, ["y"], mode=mode)], (2, 3, 4), inits=inits, opset=opset)


@pytest.mark.parametrize("case", list(PADS))
def test_pad_norm_is_the_square_root_of_the_largest_copy_count(tmp_path, case):
    model, exact = check_linear(pad_file(tmp_path, case), (2, 3, 4), kinds=["AxisMaps"])
    (node,) = [n for n in model.graph.nodes if isinstance(n.op, ir.AxisMaps)]
    counts = [m.sum(dim=0).max().item() for _, m in node.op.maps]  # copies of one input element per axis
    assert exact == pytest.approx(math.sqrt(math.prod(counts)), rel=1e-9)
    assert operators.upper_bound(node.op, (2, 3, 4))[0] == pytest.approx(exact, rel=1e-9)


def test_all_zero_pads_are_an_identity_as_pytorch_1_6_exported_avgpool(tmp_path):
    nodes = [helper.make_node("Pad", ["input"], ["p"], mode="constant", pads=[0] * 8, value=0.0),
             helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    model = load(onnx_file(tmp_path, nodes, (1, 4, 4), opset=9))
    assert not any(isinstance(n.op, ir.AxisMaps) for n in model.graph.nodes)


def test_a_reflection_pad_exported_by_torch(tmp_path):
    module = nn.Sequential(nn.ReflectionPad2d((2, 1, 0, 3)), nn.Flatten())
    _, exact = check_linear(exported(tmp_path, module, (1, 4, 5)), (1, 4, 5), kinds=["AxisMaps"])
    assert exact == pytest.approx(2.0)  # a corner element is copied 2 × 2 times


# --------------------------------------------------------------------------- Resize / Upsample


def _resize_file(tmp_path, opset, attributes, *, scales=None, sizes=None, shape=(2, 3, 4)):
    if opset <= 8:
        node, inits = helper.make_node("Upsample", ["input"], ["y"], scales=[float(v) for v in scales], **attributes), {}
    elif opset == 9:
        node, inits = helper.make_node("Upsample", ["input", "scales"], ["y"], **attributes), {"scales": np.array(scales, np.float32)}
    elif opset == 10:
        node, inits = helper.make_node("Resize", ["input", "scales"], ["y"], **attributes), {"scales": np.array(scales, np.float32)}
    elif sizes is not None:  # sizes = [batch (read with Shape, as exporters do), *sizes[1:]]
        nodes = [helper.make_node("Shape", ["input"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
                 helper.make_node("Concat", ["n", "rest"], ["sizes"], axis=0),
                 helper.make_node("Resize", ["input", "roi", "", "sizes"], ["y"], **attributes)]
        inits = {"roi": np.array([], np.float32), "rest": np.array(sizes[1:], np.int64), "zero": np.array([0], np.int64)}
        return onnx_file(tmp_path, nodes, shape, inits=inits, opset=opset)
    else:
        node, inits = helper.make_node("Resize", ["input", "", "scales"], ["y"], **attributes), {"scales": np.array(scales, np.float32)}
    return onnx_file(tmp_path, [node], shape, inits=inits, opset=opset)


RESIZES = {
    "upsample_op7_attribute": (7, {"mode": "nearest"}, [1, 1, 3, 2], None),
    "upsample_op9_nearest": (9, {"mode": "nearest"}, [1, 1, 2, 3], None),
    "upsample_op9_linear": (9, {"mode": "linear"}, [1, 1, 2, 2], None),
    "resize_op10_nearest": (10, {"mode": "nearest"}, [1, 1, 3, 2], None),
    "resize_op10_linear": (10, {"mode": "linear"}, [1, 1, 2, 2], None),
    "nearest_torch_style": (13, {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, [1, 1, 2, 2], None),
    "nearest_half_pixel_default": (13, {"mode": "nearest"}, [1, 1, 3, 2], None),
    "nearest_sizes_non_integer": (13, {"mode": "nearest"}, None, [1, 2, 5, 7]),
    "nearest_downsample": (13, {"mode": "nearest"}, [1, 1, 0.5, 0.5], None),
    "nearest_channels": (13, {"mode": "nearest"}, [1, 2, 1, 1], None),
    "linear_half_pixel": (13, {"mode": "linear"}, [1, 1, 2, 2], None),
    "linear_align_corners": (13, {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, None, [1, 2, 5, 7]),
    "linear_pytorch_half_pixel": (13, {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, [1, 1, 2, 1.5], None),
    "cubic": (13, {"mode": "cubic"}, [1, 1, 2, 2], None),
    "linear_antialias_op18": (18, {"mode": "linear", "antialias": 1}, [1, 1, 0.5, 0.75], None),
    "nearest_axes_op18": (18, {"mode": "nearest", "axes": [3, 2]}, [2, 3], None),
}


@pytest.mark.parametrize("case", list(RESIZES))
def test_resize_norm_is_the_product_of_the_exact_per_axis_norms(tmp_path, case):
    opset, attributes, scales, sizes = RESIZES[case]
    model, exact = check_linear(_resize_file(tmp_path, opset, attributes, scales=scales, sizes=sizes), (2, 3, 4), kinds=["AxisMaps"])
    (node,) = [n for n in model.graph.nodes if isinstance(n.op, ir.AxisMaps)]
    assert operators.upper_bound(node.op, (2, 3, 4))[0] == pytest.approx(exact, rel=1e-9)  # Kronecker: exact
    if attributes["mode"] == "nearest":  # a copy: √(largest number of copies of one element)
        counts = [m.sum(dim=0).max().item() for _, m in node.op.maps]
        assert exact == pytest.approx(math.sqrt(math.prod(counts)), rel=1e-9)


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
def test_upsampling_exported_by_torch(tmp_path, mode):
    module = nn.Sequential(nn.Upsample(scale_factor=2, mode=mode), nn.Flatten())
    _, exact = check_linear(exported(tmp_path, module, (1, 3, 3)), (1, 3, 3), kinds=["AxisMaps"])
    if mode == "nearest":
        assert exact == pytest.approx(2.0)  # every element copied 2 × 2 times


def test_resizing_the_batch_axis_is_refused(tmp_path):
    path = _resize_file(tmp_path, 13, {"mode": "nearest"}, scales=[2, 1, 1, 1])
    assert_refused(path, "Resize", "batch")


# --------------------------------------------------------------------------- ConvTranspose


CONV_TRANSPOSES = {
    # id: (in channels, out channels, kernel, attributes, input spatial size)
    "stride2_pads_output_padding": (2, 3, 3, {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, (3, 3)),
    "asymmetric_pads": (2, 2, 3, {"strides": [2, 2], "pads": [0, 1, 2, 0]}, (3, 4)),
    "dilation_groups": (4, 4, 3, {"strides": [2, 1], "dilations": [2, 1], "group": 2, "pads": [1, 0, 1, 0]}, (3, 3)),
    "output_shape": (2, 2, 3, {"strides": [2, 2], "output_shape": [6, 7]}, (3, 3)),
    "same_upper": (1, 2, 4, {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, (3, 3)),
    "kernel_smaller_than_stride": (2, 1, 2, {"strides": [3, 3]}, (2, 3)),
}


def _conv_transpose_file(tmp_path, case):
    c_in, c_out, k, attributes, size = CONV_TRANSPOSES[case]
    groups = attributes.get("group", 1)
    inits = {"w": weight(c_in, c_out // groups, k, k, seed=3), "b": weight(c_out, seed=4)}
    node = helper.make_node("ConvTranspose", ["input", "w", "b"], ["y"], kernel_shape=[k, k], **attributes)
    return onnx_file(tmp_path, [node], (c_in, *size), inits=inits), (c_in, *size)


@pytest.mark.parametrize("case", list(CONV_TRANSPOSES))
def test_conv_transpose_bound_is_exact_when_small_and_the_adjoint_conv_bound_otherwise(tmp_path, case):
    path, shape = _conv_transpose_file(tmp_path, case)
    model, exact = check_linear(path, shape, kinds=["ConvTranspose2d"])
    (node,) = [n for n in model.graph.nodes if isinstance(n.op, ir.ConvTranspose2d)]
    value, how = operators.upper_bound(node.op, shape, exact_side=0)
    assert how.startswith("adjoint") and value >= exact * (1 - 1e-12)


def test_conv_transpose_exported_by_torch_matches_its_adjoint_convolution(tmp_path):
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)
    module = nn.Sequential(layer, nn.Flatten())
    _, exact = check_linear(exported(tmp_path, module, (2, 4, 4)), (2, 4, 4), kinds=["ConvTranspose2d"])
    # the adjoint: F.conv2d with the same weight on the transposed conv's output shape, via autograd
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    y = F.conv_transpose2d(x, layer.weight.double(), None, 2, 1, 1)
    matrix = torch.stack([torch.autograd.grad(y.flatten()[i], x, retain_graph=True)[0].flatten() for i in range(y.numel())])
    assert exact == pytest.approx(torch.linalg.svdvals(matrix)[0].item(), rel=1e-6)


# --------------------------------------------------------------------------- BatchNorm, broadcasting constants


@pytest.mark.parametrize("shape", [(4,), (4, 5), (4, 3, 3)], ids=["1d_NC", "1d_NCL", "2d"])
def test_batchnorm_in_one_and_two_dimensions(tmp_path, shape):
    c = shape[0]
    inits = {"g": weight(c, seed=1), "b": weight(c, seed=2), "m": weight(c, seed=3), "v": np.abs(weight(c, seed=4)) + 0.1}
    node = helper.make_node("BatchNormalization", ["input", "g", "b", "m", "v"], ["y"], epsilon=1e-3)
    _, exact = check_linear(onnx_file(tmp_path, [node], shape, inits=inits), shape, kinds=["Affine"])
    assert exact == pytest.approx(np.max(np.abs(inits["g"] / np.sqrt(inits["v"] + 1e-3))), rel=1e-5)


def test_batchnorm_in_training_mode_is_refused(tmp_path):
    inits = {k: np.ones(4, np.float32) for k in "gbmv"}
    node = helper.make_node("BatchNormalization", ["input", "g", "b", "m", "v"], ["y", "mean", "var"], name="bn", training_mode=1)
    assert_refused(onnx_file(tmp_path, [node], (4,), inits=inits, opset=15), "BatchNormalization", "training")


ARITHMETIC = {
    # id: (op, constant first?, constant, per-sample input shape)
    "sub_constant_first": ("Sub", True, weight(3, 1, 1), (3, 5, 4)),
    "add_constant_first_broadcast_rows": ("Add", True, weight(1, 4), (3, 5, 4)),
    "mul_constant_first_scalar": ("Mul", True, np.float32(-2.5), (3, 5, 4)),
    "div_by_per_channel": ("Div", False, np.abs(weight(3, 1, 1)) + 0.5, (3, 5, 4)),
    "mul_same_rank_unit_batch": ("Mul", False, weight(1, 3, 1, 4), (3, 5, 4)),
    "mul_broadcast_grows_the_tensor": ("Mul", False, weight(4), (3, 5, 1)),  # each element copied 4 times
    "sub_tensor_minus_constant": ("Sub", False, weight(5, 4), (3, 5, 4)),
}


@pytest.mark.parametrize("case", list(ARITHMETIC))
def test_arithmetic_with_constants_on_either_side_and_broadcasting(tmp_path, case):
    op, first, const, shape = ARITHMETIC[case]
    node = helper.make_node(op, ["c", "input"] if first else ["input", "c"], ["y"])
    check_linear(onnx_file(tmp_path, [node], shape, inits={"c": const}), shape, kinds=["Affine"])


# --------------------------------------------------------------------------- a network with several new ops


class Decoder(nn.Module):
    """Transposed conv → SiLU → nearest upsampling → reflection pad → conv → GELU → GroupSort2 → linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.up = nn.ConvTranspose2d(1, 2, 2, stride=2)
        self.conv = nn.Conv2d(2, 2, 3)
        self.head = nn.Linear(2 * 8 * 8, 10)

    def forward(self, x):
        x = F.silu(self.up(x))
        x = F.pad(F.interpolate(x, scale_factor=2.0, mode="nearest"), (1, 1, 1, 1), mode="reflect")
        x = group_sort(F.gelu(self.conv(x)).flatten(1), 2)
        return self.head(x)


def test_a_network_of_new_ops_is_bounded_above_its_gradients(tmp_path):
    module = Decoder().eval()
    model = load(exported(tmp_path, module, (1, 2, 2)))
    bound = compose(model.graph)
    double = module.double()
    assert largest_quotient(lambda x: double(x), (1, 2, 2), steps=60) <= bound.global_upper
    x = torch.randn(16, 1, 2, 2, dtype=torch.float64) * 2
    jac = torch.func.vmap(torch.func.jacrev(lambda v: double(v.unsqueeze(0)).squeeze(0)))(x).flatten(2)
    assert torch.linalg.matrix_norm(jac, ord=2).max().item() <= bound.global_upper
    assert compose(model.graph, exact_side=0).global_upper >= bound.global_upper * (1 - 1e-9)


class ExportedForms(nn.Module):
    """The ops above through torch.export (its ONNX exporter writes Softplus as a Where, MaxMin and sort its own way)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.up = nn.ConvTranspose2d(1, 2, 3, stride=2, padding=1, output_padding=1)
        self.conv = nn.Conv2d(2, 2, 3)
        self.head = nn.Linear(2 * 2 * 8 * 8, 10)

    def forward(self, x):
        x = F.pad(F.interpolate(F.silu(self.up(x)), scale_factor=2.0, mode="bilinear"), (1, 1, 1, 1), mode="reflect")
        x = F.softplus(self.conv(x)).flatten(1)
        x = torch.cat([F.relu(x), F.relu(-x)], 1)  # MaxMin
        return self.head(torch.sort(F.gelu(x), dim=1)[0])


def test_torch_export_forms_are_recognised_and_bounded(tmp_path):
    module = ExportedForms().eval()
    path = tmp_path / "forms.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(module, (torch.zeros(2, 1, 2, 2),)), str(path))
    model = load(path)
    kinds = {n.op.kind for n in model.graph.nodes if isinstance(n.op, ir.Activation)}
    assert kinds == {"silu", "softplus", "gelu"}
    assert {ir.ConvTranspose2d, ir.AxisMaps, ir.CReLU, ir.Sort} <= {type(n.op) for n in model.graph.nodes}
    bound = compose(model.graph).global_upper
    double = module.double()
    assert largest_quotient(lambda x: double(x), (1, 2, 2), steps=60) <= bound


def test_exported_model_is_also_loadable_from_memory_bytes():
    """torch_to_onnx's in-memory path (TorchScript / pickles) reaches the same converter."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Mlp(nn.SiLU()).eval(), (torch.zeros(1, 8),), buffer, dynamo=False, opset_version=17)
    graph = onnx_to_graph(onnx.load_from_string(buffer.getvalue()), (8,))
    assert [n.op.describe() for n in graph.nodes if isinstance(n.op, ir.Activation)] == ["silu"]
    with pytest.raises(GlorocertError):
        ir.Transpose((1, 0))


# ------------------------------------------------ patterns that look like a 1-Lipschitz form and are not one


def _single_input_model(nodes, inits, width_in: int, width_out: int, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "pattern", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, width_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, width_out])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_a_group_of_one_element_is_copied_twice_and_bounded_by_sqrt_2(tmp_path):
    """cat(min, max) over a group of size 1 is (x, x): y = x0 + x0 has constant 2, not the sort's 1·‖w‖ = √2."""
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h"]),
        helper.make_node("Reshape", ["h", "shape"], ["r"]),
        helper.make_node("ReduceMin", ["r", "axes"], ["lo"], keepdims=1),
        helper.make_node("ReduceMax", ["r", "axes"], ["hi"], keepdims=1),
        helper.make_node("Concat", ["lo", "hi"], ["c"], axis=2),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("Gemm", ["f", "w2"], ["y"]),
    ]
    w2 = np.zeros((8, 1), np.float32)
    w2[:2, 0] = 1.0
    inits = {"w": np.eye(4, dtype=np.float32), "shape": np.array([0, 4, 1], np.int64), "axes": np.array([2], np.int64), "w2": w2}
    path = tmp_path / "group_of_one.onnx"
    onnx.save(_single_input_model(nodes, inits, 4, 1, opset=18), path)
    assert compose(load(path).graph).global_upper >= 2.0


@pytest.mark.parametrize("threshold, jump", [(3e4, -1e5), (5e3, 0.009), (10.0, 0.0)])
def test_a_where_is_a_softplus_only_in_torch_exports_exact_wiring(tmp_path, threshold, jump):
    """where(h > T, h + jump, softplus(h)) agrees with softplus on any grid that stops short of T, or differs by
    less than its tolerance; only T in [20, 50] with the then-branch exactly h is torch.export's softplus."""
    nodes = [
        helper.make_node("Greater", ["x", "t"], ["cond"], name="cond"),
        helper.make_node("Add", ["x", "jump"], ["then"], name="then"),
        helper.make_node("Softplus", ["x"], ["soft"], name="soft"),
        helper.make_node("Where", ["cond", "then", "soft"], ["y"], name="select"),
    ]
    inits = {"t": np.array(threshold, np.float32), "jump": np.array(jump, np.float32)}
    path = tmp_path / "where.onnx"
    onnx.save(_single_input_model(nodes, inits, 2, 2), path)
    with pytest.raises(UnsupportedOperator):
        load(path)


def test_a_spare_sum_in_a_template_cannot_add_a_growing_term(tmp_path):
    """gelu_tanh's node counts also fit x·(½(1 + tanh(k·x·(1 + a·x²))) + ε·x), which is gelu_tanh + ε·x²."""
    k = np.float32(np.sqrt(2 / np.pi))
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["xx"]), helper.make_node("Mul", ["xx", "a"], ["axx"]),
        helper.make_node("Add", ["axx", "one"], ["p"]), helper.make_node("Mul", ["x", "p"], ["inner"]),
        helper.make_node("Mul", ["inner", "k"], ["arg"]), helper.make_node("Tanh", ["arg"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["t1"]), helper.make_node("Mul", ["t1", "half"], ["h1"]),
        helper.make_node("Mul", ["x", "eps"], ["ex"]), helper.make_node("Add", ["h1", "ex"], ["q"]),
        helper.make_node("Mul", ["x", "q"], ["y"]),
    ]
    inits = {"a": np.float32(0.044715), "one": np.float32(1.0), "k": k, "half": np.float32(0.5), "eps": np.float32(1e-14)}
    path = tmp_path / "gelu_plus_square.onnx"
    onnx.save(_single_input_model(nodes, inits, 1, 1), path)
    with pytest.raises(UnsupportedOperator):
        load(path)


class _UnboundMinMax(nn.Module):
    """MinMax written with unbind, as in issue 12: reshape to pairs, unbind (Split + Squeeze), max/min, then
    cat along channels or stack on the pair axis."""

    def __init__(self, stack: bool):
        super().__init__()
        self.stack = stack

    def forward(self, x):
        n, c, h, w = x.shape
        a, b = x.reshape(n, c // 2, 2, h, w).unbind(2)
        if self.stack:
            return torch.stack([torch.maximum(a, b), torch.minimum(a, b)], 2).reshape(n, c, h, w)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], 1)


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("stack", [False, True])
def test_minmax_written_with_unbind_is_one_1_lipschitz_minmax(tmp_path, opset, stack):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 6, 3), _UnboundMinMax(stack), nn.Flatten(), nn.Linear(6 * 6 * 6, 4)).eval()
    path = tmp_path / "unbind.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 1, 8, 8),), path, dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    model = load(path)  # includes the IR-vs-onnxruntime check
    assert any(isinstance(n.op, ir.MinMax) for n in model.graph.nodes)
    bound = compose(model.graph)
    relu_path = tmp_path / "relu.onnx"
    relu = nn.Sequential(module[0], nn.ReLU(), module[2], module[3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(relu, (torch.zeros(1, 1, 8, 8),), relu_path, dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    # the same weights with a 1-Lipschitz ReLU: the MinMax costs 1 too (not the √2 or 2 of separate reductions)
    assert bound.global_upper == pytest.approx(compose(load(relu_path).graph).global_upper, rel=1e-6)
    x = torch.rand(32, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(model.graph.forward(x), module.double()(x), atol=1e-9)
    assert largest_quotient(lambda v: model.graph.forward(v), (1, 8, 8)) <= bound.global_upper
