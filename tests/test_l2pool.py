"""l2-norm pooling (deel-torchlip's ScaledL2NormPool2d, torch's LPPool2d(2)): read as one ``L2Pool`` op.

deel's layer is ``LPPool2d(2, k, stride=k)`` times its ``k_coef_lip``, which torch.onnx (dynamo=False,
opset 17) exports as Pow(x, 2) → AveragePool → Sign, Abs → Relu → Mul(sign, relu) → Mul(k²) →
Pow(·, 0.5) → Mul(coef); ScaledAdaptativeL2NormPool2d writes the same with the kernel set to the input's
size. The graphs are built here with onnx.helper in that form, and torch's LPPool2d is exported, so the
tests do not need deel-torchlip installed. The truths are written without the code under test:
torch's F.lp_pool2d for the function, c·√(gain·m/d_min) for the constant (m the largest number of windows
sharing an input, d_min the smallest divisor), and an Adam search for the largest difference quotient.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from glorocert import graph as ir
from glorocert.errors import UnsupportedOperator
from glorocert.lipschitz.compose import compose
from glorocert.loaders import load
from helpers import largest_quotient

_quotient = functools.partial(largest_quotient, restarts=6, steps=60, spread=1.0, gap=0.3)


def onnx_file(tmp_path, nodes, in_shape, inits, *, name="model", opset=17):
    """input (batch, *in_shape) → nodes (the last writes ``y``) → Flatten → logits."""
    graph = helper.make_graph(
        [*nodes, helper.make_node("Flatten", ["y"], ["logits"], name="flatten")], name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *in_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "features"])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    path = tmp_path / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10), str(path))
    return path


def deel_nodes(pool_node, area, coef):
    """ScaledL2NormPool2d as torch.onnx exports it (F.lp_pool2d's sign(s)·relu(|s|)·k² then ^0.5, times coef)."""
    nodes = [
        helper.make_node("Pow", ["input", "two"], ["sq"], name="/Pow"), pool_node,
        helper.make_node("Sign", ["pooled"], ["sign"], name="/Sign"),
        helper.make_node("Abs", ["pooled"], ["abs"], name="/Abs"),
        helper.make_node("Relu", ["abs"], ["relu"], name="/Relu"),
        helper.make_node("Mul", ["sign", "relu"], ["same"], name="/Mul"),
        helper.make_node("Mul", ["same", "area"], ["scaled"], name="/Mul_1"),
        helper.make_node("Pow", ["scaled", "half"], ["root"], name="/Pow_1"),
        helper.make_node("Mul", ["root", "coef"], ["y"], name="/Mul_2"),
    ]
    return nodes, {"two": 2.0, "area": float(area), "half": 0.5, "coef": coef}


def average_pool(kernel, stride, pads=(0, 0), ceil=0, include=1):
    return helper.make_node(
        "AveragePool", ["sq"], ["pooled"], name="/AveragePool", kernel_shape=[kernel] * 2, strides=[stride] * 2,
        pads=[*pads, *pads], ceil_mode=ceil, count_include_pad=include,
    )


def f32(value: float) -> float:
    """The float32 constant the file stores."""
    return float(np.float32(value))


def l2_ops(model):
    return [n.op for n in model.graph.nodes if isinstance(n.op, ir.L2Pool)]


# --------------------------------------------------------------------------- deel-torchlip's form


@pytest.mark.parametrize("kernel, coef, side", [(2, 1.0, 8), (3, 0.7, 9), (2, 1.0, 7)])
def test_scaled_l2_norm_pool_is_one_l2pool_with_constant_its_coefficient(tmp_path, kernel, coef, side):
    nodes, inits = deel_nodes(average_pool(kernel, kernel), kernel * kernel, coef)
    model = load(onnx_file(tmp_path, nodes, (3, side, side), inits))  # load checks the IR against onnxruntime
    assert [type(n.op) for n in model.graph.nodes] == [ir.L2Pool, ir.Reshape]
    x = torch.randn(4, 3, side, side, dtype=torch.float64)
    with torch.no_grad():
        reference = f32(coef) * F.lp_pool2d(x, 2, kernel)
        assert torch.allclose(model.graph.forward(x), reference.flatten(1), atol=1e-12)
    assert compose(model.graph).global_upper == pytest.approx(f32(coef), rel=1e-12)  # k² · (1/k²) · coef²


def test_scaled_adaptive_l2_norm_pool_global_form_is_1_lipschitz(tmp_path):
    nodes, inits = deel_nodes(helper.make_node("GlobalAveragePool", ["sq"], ["pooled"], name="/GAP"), 36, 1.0)
    model = load(onnx_file(tmp_path, nodes, (2, 6, 6), inits))
    (op,) = l2_ops(model)
    assert (op.kernel, op.gain) == ((6, 6), 36.0)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(model.graph.forward(x), x.flatten(2).norm(dim=2), atol=1e-12)  # the l2 norm per channel
    assert compose(model.graph).global_upper == pytest.approx(1.0, rel=1e-12)


class ScaledLPPool(nn.LPPool2d):
    """deel-torchlip's ScaledL2NormPool2d.forward, on torch's own LPPool2d."""

    def __init__(self, kernel, coef, ceil_mode=False):
        super().__init__(2, kernel, ceil_mode=ceil_mode)
        self.coef = coef

    def forward(self, x):
        return super().forward(x) * self.coef


def exported(tmp_path, module, in_shape):
    path = tmp_path / "torch.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(1, *in_shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def test_a_lipschitz_network_with_l2_pooling_exported_by_torch(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), ScaledLPPool(2, 1.0), nn.Flatten(), nn.Linear(64, 5))
    model = load(exported(tmp_path, net, (2, 8, 8)))
    assert len(l2_ops(model)) == 1
    result = compose(model.graph)
    assert [b.method for b in result.blocks] == ["exact", "exact"]  # the l2 pool adds no factor: its constant is 1
    assert result.global_upper == pytest.approx(result.blocks[0].upper * result.blocks[1].upper, rel=1e-12)
    assert _quotient(model.graph.forward, (2, 8, 8)) <= result.global_upper


def test_ceil_mode_partial_windows_keep_their_own_divisor(tmp_path):
    """LPPool2d multiplies by k² whatever the divisor: a corner window of one input gives 2|x| (constant 2, not 1)."""
    model = load(exported(tmp_path, nn.Sequential(ScaledLPPool(2, 1.0, ceil_mode=True), nn.Flatten()), (1, 5, 5)))
    assert compose(model.graph).global_upper == pytest.approx(2.0, rel=1e-12)
    corner = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    corner[0, 0, 4, 4] = 0.5
    assert model.graph.forward(corner).norm().item() == pytest.approx(1.0)  # attained: ‖f(x) − f(0)‖ = 2‖x‖


# --------------------------------------------------------------------------- overlapping windows, other forms


OVERLAPPING = {
    # id: (square as Pow or Mul, kernel, stride, pads, count_include_pad, eps, scale, gain, m/d_min)
    "k2_s1": ("Pow", 2, 1, (0, 0), 1, 0.0, 1.5, 1.0, 4 / 4),
    "k3_s2_eps": ("Mul", 3, 2, (0, 0), 1, 1e-3, 2.0, 1.0, 4 / 9),
    "k3_s1_pad_exclude": ("Pow", 3, 1, (1, 1), 0, 0.0, 1.0, 9.0, 9 / 4),
    "k3_s2_pad_include_div": ("Mul", 3, 2, (1, 1), 1, 0.5, -0.5, 0.25, 4 / 9),
}


def overlapping_file(tmp_path, case):
    square, kernel, stride, pads, include, eps, scale, gain, _ = OVERLAPPING[case]
    nodes = [
        helper.make_node(square, ["input", "two" if square == "Pow" else "input"], ["sq"], name="square"),
        average_pool(kernel, stride, pads, include=include),
        helper.make_node("Div", ["pooled", "inverse_gain"], ["inner"], name="gain"),
        helper.make_node("Add", ["eps", "inner"], ["shifted"], name="eps"),
        helper.make_node("Sqrt", ["shifted"], ["root"], name="sqrt"),
        helper.make_node("Mul", ["root", "scale"], ["y"], name="scale"),
    ]
    inits = {"two": 2.0, "inverse_gain": 1.0 / gain, "eps": eps, "scale": scale}
    return onnx_file(tmp_path, nodes, (2, 7, 7), inits, name=case)


@pytest.mark.parametrize("case", list(OVERLAPPING))
def test_overlapping_l2_pooling_bound_is_above_the_attack_and_at_most_c_sqrt_gain_m_over_d(tmp_path, case):
    _, kernel, stride, pads, include, eps, scale, gain, m_over_d = OVERLAPPING[case]
    model = load(overlapping_file(tmp_path, case))
    assert len(l2_ops(model)) == 1
    x = torch.randn(3, 2, 7, 7, dtype=torch.float64)
    average = F.avg_pool2d(x * x, kernel, stride, pads, False, bool(include))
    with torch.no_grad():
        reference = f32(scale) * torch.sqrt(average / f32(1 / gain) + f32(eps))
        assert torch.allclose(model.graph.forward(x), reference.flatten(1), atol=1e-6)
    bound = compose(model.graph).global_upper
    theory = abs(scale) * math.sqrt(gain * m_over_d)
    assert _quotient(model.graph.forward, (2, 7, 7)) <= bound <= theory * 1.0001


# --------------------------------------------------------------------------- everything else stays refused


REFUSALS = {
    # id: (nodes, constants, refused op, refused node)
    "cube": ([helper.make_node("Pow", ["input", "three"], ["sq"], name="cube"), average_pool(2, 2),
              helper.make_node("Sqrt", ["pooled"], ["y"], name="root")], {"three": 3.0}, "Pow", "cube"),
    "sqrt_of_relu": ([helper.make_node("Relu", ["input"], ["r"], name="relu"),
                      helper.make_node("Sqrt", ["r"], ["y"], name="root")], {}, "Sqrt", "root"),
    "square_without_root": ([helper.make_node("Pow", ["input", "two"], ["sq"], name="square"), average_pool(2, 2),
                             helper.make_node("Relu", ["pooled"], ["y"], name="relu")], {"two": 2.0}, "Pow", "square"),
    "max_pool_between": ([helper.make_node("Pow", ["input", "two"], ["sq"], name="square"),
                          helper.make_node("MaxPool", ["sq"], ["pooled"], name="max", kernel_shape=[2, 2], strides=[2, 2]),
                          helper.make_node("Sqrt", ["pooled"], ["y"], name="root")], {"two": 2.0}, "Pow", "square"),
    "negative_eps": ([helper.make_node("Pow", ["input", "two"], ["sq"], name="square"), average_pool(2, 2),
                      helper.make_node("Add", ["pooled", "eps"], ["shifted"], name="eps"),
                      helper.make_node("Sqrt", ["shifted"], ["y"], name="root")], {"two": 2.0, "eps": -1e-3}, "Pow", "square"),
    "square_read_twice": ([helper.make_node("Pow", ["input", "two"], ["sq"], name="square"), average_pool(2, 2),
                           helper.make_node("Sqrt", ["pooled"], ["root"], name="root"),
                           helper.make_node("AveragePool", ["sq"], ["again"], name="again", kernel_shape=[2, 2], strides=[2, 2]),
                           helper.make_node("Add", ["root", "again"], ["y"], name="sum")], {"two": 2.0}, "Pow", "square"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_other_pow_and_sqrt_are_refused_by_name(tmp_path, case):
    nodes, inits, op, node = REFUSALS[case]
    with pytest.raises(UnsupportedOperator, match=node) as caught:
        load(onnx_file(tmp_path, nodes, (2, 4, 4), inits, name=case))
    assert (caught.value.op, caught.value.node) == (op, node)
