"""Multi-node ONNX patterns read as one IR op, found before conversion.

* **CReLU / MaxMin** (deel-torchlip): Concat(Relu(x), Relu(Neg(x))) → ``CReLU`` (1-Lipschitz; the generic
  Concat rule would give √2).
* **GroupSort** (deel-torchlip GroupSort2 / GroupSort(k)): Concat(ReduceMin(t, A), ReduceMax(t, A)) over the
  same axes → ``GroupMinMax`` (1-Lipschitz, a projection of sorting each group).
* **l2-norm pooling** (deel-torchlip's ScaledL2NormPool2d / ScaledAdaptativeL2NormPool2d, torch's LPPool2d(2)):
  x² (Pow(x, 2) with the exponent exactly 2, or Mul(x, x)) → AveragePool / GlobalAveragePool → steps that
  keep the pooled s ≥ 0 an affine a·s + b with a > 0, b ≥ 0 (Mul or Div by a positive scalar constant, Add of
  a non-negative one, and torch's sign(s)·relu(|s|), which is s for s ≥ 0) → Sqrt or Pow(·, 0.5) → optional
  Mul / Div by scalar constants → ``L2Pool`` (constant in graph.py). Every intermediate tensor must be read
  by the pattern alone; any other Pow or Sqrt is left to the converter, which refuses it by name.
* **Decomposed activations**: exporters write SiLU as x·σ(x), GELU as x·(1 + erf(x/√2))/2 or its tanh
  form, Mish as x·tanh(softplus(x)), HardSwish as x·HardSigmoid(x) or x·relu6(x + 3)/6, Softsign as
  x/(1 + |x|), and torch.export writes Softplus as where(x > 20, x, softplus(x)). A *region* is the set
  of elementwise nodes with scalar constants between a tensor x (the region's root: the nearest tensor
  every path to the end passes through) and the region's end, a product, quotient or Where of tensors;
  its other nodes must not be read from outside. The region is matched in two steps, both required:

  1. *structure*: besides affine scalar steps (±, × by a scalar constant, ÷ by one, Neg) it may hold only the
     non-affine nodes of one template (e.g. SiLU: one Sigmoid and one product of two tensors), so it
     computes a member of a small parametric family, such as (αx + β)·(γσ(δx + ε) + ζ)·η + θ for SiLU;
  2. *values*: evaluated by onnx's reference evaluator on 4,801 points in [−12, 12] and 400 out to ±10³⁵, it
     must equal c·h(x) + d for the template's activation h to 2e-6 relative at every point, which pins
     the family's parameters to the float32 rounding of the canonical ones (the margins of the constants
     in graph.py cover that much).

  A region with a Where is matched by its exact wiring instead (:func:`softplus_where`).
  The region becomes Activation(h) followed by Affine(c, d) when (c, d) ≠ (1, 0). Anything else (x·x,
  x·y, a Div by a tensor …) is left to the converter, which refuses it by name.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from glorocert.errors import UnsupportedOperator
from glorocert.graph import ACTIVATIONS, Activation, Affine, CReLU, GroupMinMax, L2Pool
from glorocert.loaders.onnx_ops import attrs, axes_of, opset_of, pool_window, refuse_batch_axis

ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Neg", "Erf", "Tanh", "Sigmoid", "Softplus", "Pow", "Exp", "Log",
    "HardSigmoid", "Clip", "Relu", "Abs", "Greater", "Where",
}
AFFINE = {"Add", "Sub", "Mul", "Div", "Neg"}
TEMPLATES = {  # activation → the non-affine nodes (exactly these) of each way exporters write it
    "silu": ({"Sigmoid": 1, "Mul2": 1},),
    "gelu": ({"Erf": 1, "Mul2": 1},),
    "gelu_tanh": ({"Tanh": 1, "Mul2": 3, "Add2": 1}, {"Tanh": 1, "Pow": 1, "Mul2": 1, "Add2": 1}),  # x³ as x·x·x or Pow
    "mish": ({"Softplus": 1, "Tanh": 1, "Mul2": 1}, {"Exp": 1, "Log": 1, "Tanh": 1, "Mul2": 1}),
    "hardswish": ({"HardSigmoid": 1, "Mul2": 1}, {"Clip": 1, "Mul2": 1}),
    "softsign": ({"Abs": 1, "Div2": 1},),
    # torch.export's softplus: where(x > 20, x, softplus(x)); the branches differ by 2e-9 at the threshold,
    # below float32 resolution there, and the match on the grid bounds that gap
    "softplus": ({"Softplus": 1, "Greater": 1, "Where": 1},),
}
# out to ±1e35 (float32's range): a spare sum or product in a template that adds a growing term (c·x², however
# small c) overflows there or leaves the template's asymptote, so the fit fails
_FAR = np.geomspace(12, 1e35, 200)
GRID = np.concatenate([np.linspace(-12, 12, 4801), _FAR, -_FAR])
MATCH_RTOL = 2e-6  # float32 evaluation of the exporters' forms stays below 3e-7
MAX_REGION = 24


class OnnxTables:
    """The ONNX graph's tables that the pattern search reads."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.nodes = list(model.graph.node)
        self.consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        for n in self.nodes:
            a = attrs(n) if n.op_type == "Constant" else {}
            if "value" in a:
                self.consts[n.output[0]] = numpy_helper.to_array(a["value"])
            elif len(a) == 1 and not isinstance(next(iter(a.values())), (onnx.TensorProto, onnx.SparseTensorProto)):
                self.consts[n.output[0]] = np.array(next(iter(a.values())))  # value_float, value_ints, …
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.position = {o: k for k, n in enumerate(self.nodes) for o in n.output}
        self.readers: dict[str, list] = {}
        for n in self.nodes:
            for i in set(n.input):
                self.readers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in model.graph.output}

    def private(self, tensor: str, allowed: list) -> bool:
        """Whether only the nodes ``allowed`` read ``tensor``."""
        ids = {id(n) for n in allowed}
        return tensor not in self.outputs and all(id(n) in ids for n in self.readers.get(tensor, []))

    def data_inputs(self, node) -> list[str]:
        return [i for i in node.input if i and i not in self.consts]


def find_patterns(model: onnx.ModelProto) -> tuple[dict[str, tuple], set[str]]:
    """Fused patterns: end tensor → (kind, data input, details); and the outputs of the nodes they absorb."""
    g = OnnxTables(model)
    fused: dict[str, tuple] = {}
    skip: set[str] = set()
    for node in g.nodes:
        if node.op_type == "Concat" and len(node.input) == 2:
            found = crelu_pattern(g, node) or group_minmax_pattern(g, node)
            if found:
                fused[node.output[0]], absorbed = found
                skip |= absorbed
    l2pool_patterns(g, fused, skip)
    activation_regions(g, fused, skip)
    return fused, skip


def crelu_pattern(g: OnnxTables, concat):
    first, second = (g.producer.get(i) for i in concat.input)
    if not first or not second or first.op_type != "Relu" or second.op_type != "Relu":
        return None
    for pos, neg, neg_first in ((first, second, False), (second, first, True)):
        flip = g.producer.get(neg.input[0])
        if flip is None or flip.op_type != "Neg" or flip.input[0] != pos.input[0]:
            continue
        if g.private(pos.output[0], [concat]) and g.private(neg.output[0], [concat]) and g.private(flip.output[0], [neg]):
            entry = ("crelu", pos.input[0], {"axis": attrs(concat)["axis"], "neg_first": neg_first})
            return entry, {pos.output[0], neg.output[0], flip.output[0]}
    return None


def group_minmax_pattern(g: OnnxTables, concat):
    first, second = (g.producer.get(i) for i in concat.input)
    if not first or not second or {first.op_type, second.op_type} != {"ReduceMin", "ReduceMax"}:
        return None
    if first.input[0] != second.input[0] or attrs(first) != attrs(second):
        return None
    axes = [np.asarray(g.consts[n.input[1]]).tolist() if len(n.input) > 1 and n.input[1] in g.consts else None for n in (first, second)]
    if axes[0] != axes[1] or any(len(n.input) > 1 and n.input[1] and n.input[1] not in g.consts for n in (first, second)):
        return None
    if not (g.private(first.output[0], [concat]) and g.private(second.output[0], [concat])):
        return None
    details = {"reduce": first, "axis": attrs(concat)["axis"], "min_first": first.op_type == "ReduceMin"}
    return ("group_minmax", first.input[0], details), {first.output[0], second.output[0]}


# --------------------------------------------------------------------------- l2-norm pooling


def l2pool_patterns(g: OnnxTables, fused: dict, skip: set) -> None:
    for square in g.nodes:
        found = l2pool_pattern(g, square)
        if found and not any(n.output[0] in skip for n in found[2]):
            entry, end, nodes = found
            fused[end] = entry
            skip |= {n.output[0] for n in nodes if n.output[0] != end}


def scalar_operand(g: OnnxTables, node, tensor: str) -> float | None:
    """The other operand of the binary ``node`` that reads ``tensor`` once, when it is a finite scalar constant
    that cannot change the shape (rank ≤ 4, the rank of pooled 2-d data)."""
    others = [i for i in node.input if i != tensor]
    if len(node.input) != 2 or len(others) != 1 or others[0] not in g.consts:
        return None
    value = np.asarray(g.consts[others[0]])
    if value.size != 1 or value.ndim > 4 or value.dtype.kind not in "fiu" or not np.isfinite(value).all():
        return None
    return float(value.reshape(-1)[0])


def squared_input(g: OnnxTables, node) -> str | None:
    """x when ``node`` computes x², as Pow(x, 2) (the exponent exactly 2) or Mul(x, x)."""
    x = node.input[0] if node.input else ""
    if not x or x in g.consts or len(node.input) != 2:
        return None
    if node.op_type == "Mul" and node.input[1] == x:
        return x
    return x if node.op_type == "Pow" and scalar_operand(g, node, x) == 2.0 else None


def single_reader(g: OnnxTables, tensor: str):
    readers = g.readers.get(tensor, [])
    return readers[0] if len(readers) == 1 and g.private(tensor, readers) else None


def sign_relu_abs(g: OnnxTables, tensor: str):
    """torch's lp_pool tail sign(s)·relu(|s|) (= s for s ≥ 0): (its Mul, its four nodes), or None."""
    readers = {n.op_type: n for n in g.readers.get(tensor, [])}
    if len(g.readers.get(tensor, [])) != 2 or set(readers) != {"Sign", "Abs"} or tensor in g.outputs:
        return None
    sign, relu = readers["Sign"], single_reader(g, readers["Abs"].output[0])
    mul = single_reader(g, relu.output[0]) if relu is not None and relu.op_type == "Relu" else None
    if mul is None or mul.op_type != "Mul" or sorted(mul.input) != sorted([sign.output[0], relu.output[0]]):
        return None
    return (mul, [sign, readers["Abs"], relu, mul]) if g.private(sign.output[0], [mul]) else None


def inner_step(g: OnnxTables, node, tensor: str, gain: float, shift: float):
    """Under the root, s ↦ gain·s + shift stays so with gain > 0, shift ≥ 0: the new (gain, shift), "sqrt", or None."""
    if node.op_type == "Sqrt" or (node.op_type == "Pow" and node.input[0] == tensor and scalar_operand(g, node, tensor) == 0.5):
        return "sqrt"
    v = scalar_operand(g, node, tensor) if node.op_type in ("Mul", "Div", "Add") else None
    if v is None:
        return None
    if node.op_type == "Add":
        return (gain, shift + v) if v >= 0 else None
    if v <= 0 or (node.op_type == "Div" and node.input[0] != tensor):
        return None
    return (gain * v, shift * v) if node.op_type == "Mul" else (gain / v, shift / v)


def outer_scale(g: OnnxTables, tensor: str, nodes: list) -> tuple[str, float]:
    """The product of the scalar Mul / Div steps after the root: (the end tensor, the scale); extends ``nodes``."""
    scale = 1.0
    while (node := single_reader(g, tensor)) is not None and node.op_type in ("Mul", "Div"):
        v = scalar_operand(g, node, tensor)
        if v is None or (node.op_type == "Div" and (node.input[0] != tensor or v == 0)):
            break
        scale, tensor = (scale * v if node.op_type == "Mul" else scale / v), node.output[0]
        nodes.append(node)
    return tensor, scale


def l2pool_pattern(g: OnnxTables, square):
    """(entry, end tensor, nodes) of the l2-norm pooling that starts with ``square``, or None."""
    x = squared_input(g, square)
    pool = single_reader(g, square.output[0]) if x else None
    if pool is None or pool.op_type not in ("AveragePool", "GlobalAveragePool") or pool.input[0] != square.output[0]:
        return None
    nodes, tensor, gain, shift = [square, pool], pool.output[0], 1.0, 0.0
    while True:
        tail = sign_relu_abs(g, tensor)
        if tail:
            nodes += tail[1]
            tensor = tail[0].output[0]
            continue
        node = single_reader(g, tensor)
        step = inner_step(g, node, tensor, gain, shift) if node is not None else None
        if step is None:
            return None
        nodes.append(node)
        tensor = node.output[0]
        if step == "sqrt":
            break
        gain, shift = step
    end, scale = outer_scale(g, tensor, nodes)
    return ("l2pool", x, {"pool": pool, "gain": gain, "shift": shift, "scale": scale}), end, nodes


# --------------------------------------------------------------------------- decomposed activations


def scalar_elementwise(g: OnnxTables, node) -> bool:
    return (
        node.op_type in ELEMENTWISE and len(node.output) == 1 and bool(g.data_inputs(node))
        and all(np.size(g.consts[i]) == 1 for i in node.input if i in g.consts)
    )


def region_of(g: OnnxTables, end):
    """(root, nodes in order) of the elementwise region ending at ``end``, or None: the frontier of tensors is
    expanded latest-first until it is one tensor, the nearest one every path from the inputs passes through."""
    frontier, nodes = {end.output[0]}, []
    while len(nodes) < MAX_REGION:
        tensor = max(frontier, key=lambda t: g.position.get(t, -1))
        node = g.producer.get(tensor)
        if node is None or not scalar_elementwise(g, node):
            return None
        frontier.remove(tensor)
        nodes.append(node)
        frontier |= set(g.data_inputs(node))
        if len(frontier) == 1:
            return frontier.pop(), nodes[::-1]
    return None


def kind_of(g: OnnxTables, node) -> str | None:
    """The node's role in a template: None for an affine scalar step, Mul2/Add2/Div2 for two tensors."""
    if node.op_type in AFFINE:
        if len(g.data_inputs(node)) == 2:
            return {"Sub": "Add2"}.get(node.op_type, node.op_type + "2")
        if node.op_type == "Div" and node.input[1] not in g.consts:
            return "Reciprocal"  # constant ÷ tensor: not affine, and in no template
        return None
    return node.op_type


def activation_regions(g: OnnxTables, fused: dict, skip: set) -> None:
    """Match the regions ending at every product, quotient or selection (Where) of tensors, latest first (the largest wins)."""
    for end in reversed(g.nodes):
        if end.output[0] in skip or end.op_type not in ("Mul", "Div", "Where") or len(g.data_inputs(end)) < 2:
            continue
        region = region_of(g, end)
        if region is None:
            continue
        root, nodes = region
        if any(not g.private(n.output[0], nodes) for n in nodes[:-1]) or any(n.output[0] in skip for n in nodes):
            continue
        counts = Counter(k for k in (kind_of(g, n) for n in nodes) if k)
        candidates = [kind for kind, forms in TEMPLATES.items() if any(counts == Counter(f) for f in forms)]
        if "Where" in counts and not softplus_where(g, root, nodes):
            continue  # a selection is matched by its wiring, never by values alone: a branch may jump off the grid
        match = identify(g, root, nodes, candidates) if candidates else None
        if match:
            fused[end.output[0]] = ("activation", root, match)
            skip |= {n.output[0] for n in nodes[:-1]}


def softplus_where(g: OnnxTables, root: str, nodes: list) -> bool:
    """torch.export's softplus exactly: where(x > T, x, softplus(x)) with T in [20, 50] (torch writes 20), where
    the branches differ by log(1 + e^−T) ≤ 2.1e-9, below float32's resolution at T."""
    if sorted(n.op_type for n in nodes) != ["Greater", "Softplus", "Where"]:
        return False
    greater, soft, where = (next(n for n in nodes if n.op_type == t) for t in ("Greater", "Softplus", "Where"))
    threshold = g.consts.get(greater.input[1])
    return (
        greater.input[0] == root and soft.input[0] == root and list(where.input) == [greater.output[0], root, soft.output[0]]
        and threshold is not None and np.size(threshold) == 1 and 20.0 <= float(np.asarray(threshold).reshape(())) <= 50.0
    )


def evaluate_region(g: OnnxTables, root: str, nodes: list) -> tuple[np.ndarray, np.ndarray] | None:
    """(x, region(x)) on GRID, by onnx's reference evaluator, in the dtype of the region's constants."""
    from onnx.reference import ReferenceEvaluator

    names = {i for n in nodes for i in n.input if i in g.consts}
    dtype = next((np.asarray(g.consts[i]).dtype for i in sorted(names) if np.asarray(g.consts[i]).dtype.kind == "f"), np.float32)
    x = GRID.astype(dtype)
    graph = helper.make_graph(
        nodes, "region",
        [helper.make_tensor_value_info(root, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [len(x)])],
        [helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.UNDEFINED, None)],
        [numpy_helper.from_array(np.asarray(g.consts[i]), i) for i in sorted(names)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset_of(g.model))])
    try:
        (y,) = ReferenceEvaluator(model).run(None, {root: x})
    except Exception:
        return None
    y = np.asarray(y, np.float64)
    return (x.astype(np.float64), y) if y.shape == x.shape and np.isfinite(y).all() else None


def identify(g: OnnxTables, root: str, nodes: list, candidates: list[str]) -> tuple[str, float, float] | None:
    """(activation, c, d) with region(x) = c·h(x) + d on GRID to MATCH_RTOL, or None."""
    evaluated = evaluate_region(g, root, nodes)
    if evaluated is None:
        return None
    x, y = evaluated
    weight = 1.0 / (1.0 + np.abs(y))
    for kind in candidates:
        h = ACTIVATIONS[kind][0](torch.from_numpy(x), 0.0).numpy()
        (c, d), *_ = np.linalg.lstsq(np.stack([h, np.ones_like(h)], 1) * weight[:, None], y * weight, rcond=None)
        c, d = snap(c), (0.0 if abs(d) <= 1e-6 else float(d))
        if c != 0 and (np.abs(y - c * h - d) <= MATCH_RTOL * (1.0 + np.abs(y))).all():
            return kind, c, d
    return None


def snap(value: float) -> float:
    """A float32-rounded fit (2.0000002) read as the constant it stands for (2.0)."""
    nice = float(f"{value:.4g}")
    return nice if abs(value - nice) <= 1e-6 * abs(value) else float(value)


# --------------------------------------------------------------------------- emission


def emit_fused(cv, node: onnx.NodeProto, entry: tuple) -> None:
    kind, x, details = entry
    out, name = node.output[0], node.name or node.output[0]
    rank = len(cv.shape(x))
    if kind == "crelu":
        axis = details["axis"] % rank
        refuse_batch_axis("Concat", name, [axis], "concatenating along")
        return cv.emit(out, CReLU(axis, details["neg_first"]), x)
    if kind == "group_minmax":
        reduce = details["reduce"]
        a = attrs(reduce)
        axes = axes_of(cv, reduce, a, 1, rank)
        if not axes:
            raise UnsupportedOperator(reduce.op_type, reduce.name or reduce.output[0], "a reduction over all axes includes the batch axis")
        refuse_batch_axis(reduce.op_type, reduce.name or reduce.output[0], axes, "reducing over")
        keep = bool(a.get("keepdims", 1))
        axis = details["axis"] % (rank if keep else rank - len(set(axes)))
        refuse_batch_axis("Concat", name, [axis], "concatenating along")
        return cv.emit(out, GroupMinMax(tuple(sorted(set(axes))), axis, keep, details["min_first"]), x)
    if kind == "l2pool":
        return emit_l2pool(cv, out, x, details)
    act, c, d = details
    if (c, d) == (1.0, 0.0):
        return cv.emit(out, Activation(act), x)
    cv.emit(out + "/" + act, Activation(act), x)
    cv.emit(out, Affine(torch.tensor(c, dtype=torch.float64), torch.tensor(d, dtype=torch.float64)), out + "/" + act)


def emit_l2pool(cv, out: str, x: str, details: dict) -> None:
    pool = details["pool"]
    name, shape = pool.name or pool.output[0], cv.shape(x)
    if len(shape) != 4:
        raise UnsupportedOperator(pool.op_type, name, "only 2-D l2-norm pooling is supported")
    if pool.op_type == "GlobalAveragePool":
        kernel, stride, padding, ceil, include = shape[2:], shape[2:], (0, 0), False, True
    else:
        a = attrs(pool)
        kernel, stride, padding, ceil = pool_window(pool, a, name)
        include = bool(a.get("count_include_pad", 0))
    op = L2Pool(tuple(kernel), tuple(stride), padding, ceil, include, details["gain"], details["shift"], details["scale"])
    cv.emit(out, op, x)
