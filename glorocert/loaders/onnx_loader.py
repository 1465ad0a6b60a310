"""The one converter: an onnx ModelProto → the IR (the native runners live in runners.py).

Supported operators (the converters of the newer ones live in onnx_ops.py, and the
multi-node patterns in onnx_patterns.py; the Lipschitz constants are in graph.py):

* linear: Conv, ConvTranspose, Gemm, MatMul (a constant on either side, any rank),
  BatchNormalization, Add/Sub/Mul/Div by constants, Add/Sub of two tensors, Neg,
  Pad (all modes), Resize/Upsample, AveragePool, GlobalAveragePool, ReduceMean over
  the spatial axes, and the isometries Flatten, Reshape, Transpose, Squeeze,
  Unsqueeze, DepthToSpace, SpaceToDepth, Identity, Dropout;
* elementwise: Relu, LeakyRelu, PRelu, Elu, Selu, Celu, Tanh, Sigmoid, HardSigmoid,
  HardSwish, Clip, Abs, Softplus, Softsign, Gelu, Mish, and SiLU / GELU / Mish /
  HardSwish / Softsign written out as exporters decompose them;
* sorting: MaxPool, GlobalMaxPool, ReduceMax/ReduceMin, TopK (values), GroupSort
  (ReduceMin + ReduceMax → Concat), MaxMin (Concat(Relu(x), Relu(−x))), MinMax
  written as Split/Slice → Max + Min → Concat (channel halves) or, for adjacent
  pairs, the same between two Reshapes, and Concat;
* l2-norm pooling: c·√(AveragePool(x²)·a + b) (deel-torchlip's ScaledL2NormPool2d, torch's
  LPPool2d(2)), the only form in which Pow and Sqrt are read.

Shape-only arithmetic (Shape, Gather, Unsqueeze, Concat of shape values, …) is folded
to constants. Any other operator is refused with its name and node, and so is every
form that would move the batch axis or has no global Lipschitz bound.
"""

from __future__ import annotations


import numpy as np
import onnx
import torch
from onnx import numpy_helper

from glorocert.errors import GlorocertError, UnsupportedOperator
from glorocert.graph import (
    Add, Affine, AvgPool, Concat, Conv2d, GlobalAvgPool, Graph, MaxPool, MinMax, Node, Reshape, Transpose,
)
from glorocert.loaders.onnx_ops import CONVERTERS, REFUSED, pool_window
from glorocert.loaders.onnx_patterns import emit_fused, find_patterns

PASS_THROUGH = {"Identity", "Dropout"}
TRACE_BATCH = 2
SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Slice", "ConstantOfShape", "Range", "Mul", "Div", "Add", "Sub"}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _static_shape(value_info) -> list[int | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def input_shape_of(model: onnx.ModelProto) -> tuple[str, tuple[int | None, ...]]:
    name, shape = _input(model)
    return name, tuple(shape[1:])


def _input(model: onnx.ModelProto) -> tuple[str, list[int | None]]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise GlorocertError(f"the model has {len(inputs)} inputs ({[i.name for i in inputs]}); glorocert certifies single-input classifiers")
    shape = _static_shape(inputs[0])
    if not shape:
        raise GlorocertError("the model's input has no declared rank; re-export it with its input shape")
    return inputs[0].name, shape


class _Converter:
    def __init__(self, model: onnx.ModelProto, input_shape: tuple[int, ...]):
        self.model = model
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.input_name, declared = input_shape_of(model)
        self.input_shape = input_shape
        if len(declared) != len(input_shape) or any(d not in (None, s) for d, s in zip(declared, input_shape)):
            raise GlorocertError(f"input shape {input_shape} does not match the model's declared input {declared}")
        validate_shapes(model, input_shape)
        # shapes are tracked by running each converted op on a batch of zeros (the model's own batch size
        # when it fixes one, else TRACE_BATCH), so Shape arithmetic folds to constants and a Reshape that
        # mixes samples is caught
        self.batch = _input(model)[1][0] or TRACE_BATCH
        self.values: dict[str, torch.Tensor] = {self.input_name: torch.zeros(self.batch, *input_shape, dtype=torch.float64)}
        self.nodes: list[Node] = []
        self.alias: dict[str, str] = {}  # ONNX tensor name → IR tensor name
        self.views: dict[str, tuple[str, int, int, int, int]] = {}  # Split/Slice outputs: (source, axis, start, stop, size)
        self.rank: dict[str, int] = {}
        self.pending_minmax: dict[str, dict] = {}
        self.fused: dict[str, tuple] = {}  # multi-node patterns read as one op (onnx_patterns.py)
        self.fused_skip: set[str] = set()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.values[name].shape)

    def tensor(self, name: str) -> str:
        if name in self.views:
            raise UnsupportedOperator("Split/Slice", name, "glorocert reads Split/Slice only as part of a MinMax pattern")
        return self.alias.get(name, name)

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def emit(self, name: str, op, *inputs: str) -> None:
        self.nodes.append(Node(name, op, tuple(self.tensor(i) for i in inputs)))
        try:
            self.values[name] = op.forward(*(self.values[i] for i in inputs))
        except RuntimeError as e:
            raise GlorocertError(f"node {name!r} ({op.describe()}) cannot run on its input shape: {str(e).splitlines()[0][:200]}") from None

    def per_sample_constant(self, value: np.ndarray, data_name: str, node_name: str) -> torch.Tensor:
        """A constant that broadcasts against a batched tensor, as a per-sample tensor."""
        value = np.asarray(value, dtype=np.float64)
        shape = self.shape(data_name)
        if value.ndim > len(shape):  # broadcasting prepends axes to the data: its batch axis would no longer be first
            raise UnsupportedOperator("broadcast over batch", node_name, f"a constant of shape {value.shape} would move the batch axis")
        if value.ndim and value.ndim == len(shape):
            if value.shape[0] != 1:
                raise UnsupportedOperator("broadcast over batch", node_name, "constants must not vary along the batch axis")
            value = value[0]
        return torch.from_numpy(value.copy())

    def fold_constant(self, node: onnx.NodeProto) -> bool:
        """Evaluate nodes whose inputs are all constants (shape arithmetic, Constant)."""
        if node.op_type == "Constant":
            a = _attrs(node)
            if "value" in a:
                self.consts[node.output[0]] = numpy_helper.to_array(a["value"])
            else:
                key = next(iter(a))
                self.consts[node.output[0]] = np.array(a[key])
            return True
        if node.op_type == "Shape" and node.input[0] in self.values:
            shape = np.array(self.shape(node.input[0]), dtype=np.int64)
            a = _attrs(node)
            self.consts[node.output[0]] = shape[a.get("start", 0) : a.get("end", len(shape))]
            return True
        if all(i == "" or self.is_const(i) for i in node.input) and node.op_type in SHAPE_OPS | {"Identity", "Reshape", "Transpose", "Expand", "Equal", "Where", "Not", "Neg", "Sqrt", "Reciprocal", "Pow"}:
            from onnx.reference import ReferenceEvaluator

            graph = onnx.helper.make_graph(
                [node], "fold", [],
                [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output],
                [numpy_helper.from_array(np.asarray(self.consts[i]), i) for i in node.input if i],
            )
            opset = [o for o in self.model.opset_import if o.domain in ("", "ai.onnx")]
            results = ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=opset)).run(None, {})
            for name, value in zip(node.output, results):
                self.consts[name] = np.asarray(value)
            return True
        return False

    def convert(self) -> Graph:
        self.find_minmax()
        for node in self.model.graph.node:
            if self.fold_constant(node):
                continue
            self.convert_node(node)
        outputs = [o.name for o in self.model.graph.output]
        if len(outputs) != 1:
            raise GlorocertError(f"the model has {len(outputs)} outputs {outputs}; glorocert certifies one logits output")
        out = self.tensor(outputs[0])
        if out == self.input_name:
            raise GlorocertError("the model's output is its input; nothing to certify")
        declared = _static_shape(self.model.graph.output[0])[1:]
        actual = self.shape(outputs[0])[1:]
        if self.model.graph.output[0].type.tensor_type.HasField("shape") and len(declared) != len(actual) or any(d not in (None, s) for d, s in zip(declared, actual)):
            raise GlorocertError(f"the model declares output shape {declared} but computes {list(actual)}")
        return Graph(self.input_name, self.input_shape, self.nodes, out)

    # ----------------------------------------------------------- MinMax patterns
    def find_minmax(self) -> None:
        """Concat(Max(a, b), Min(a, b)) of the two halves a, b of one tensor (Split/Slice) → MinMax. torch's
        ``unbind`` writes the halves with a Squeeze after the Split, and ``stack`` an Unsqueeze before the Concat."""
        self.fused, self.fused_skip = find_patterns(self.model)
        producers = {o: n for n in self.model.graph.node for o in n.output}
        for concat in self.model.graph.node:
            if concat.op_type != "Concat" or len(concat.input) != 2:
                continue
            (first, second), stacked = self.through(producers, concat.input, "Unsqueeze")
            if not first or not second or {first.op_type, second.op_type} != {"Max", "Min"}:
                continue
            if set(first.input) != set(second.input) or len(first.input) != 2:
                continue
            halves, squeezed = self.through(producers, first.input, "Squeeze")
            self.pending_minmax[concat.output[0]] = {
                "parts": [h.input[0] for h in halves] if squeezed is not None else list(first.input),
                "axis": _attrs(concat)["axis"], "max_first": first.op_type == "Max", "squeezed": squeezed, "stacked": stacked,
                "skip": {first.output[0], second.output[0]} | (set(first.input) if squeezed is not None else set())
                        | (set(concat.input) if stacked is not None else set()),
            }

    def through(self, producers: dict, names, op_type: str) -> tuple[list, int | None]:
        """The producers of ``names``, looked through when both are ``op_type`` (Squeeze/Unsqueeze) of one axis
        each, the same: (producers, that axis), else (producers, None)."""
        nodes = [producers.get(n) for n in names]
        if not all(n is not None and n.op_type == op_type for n in nodes):
            return nodes, None
        axes = [_attrs(n).get("axes") for n in nodes]
        axes = [list(a) if a is not None else (self.consts[n.input[1]].tolist() if len(n.input) > 1 and n.input[1] in self.consts else None)
                for a, n in zip(axes, nodes)]
        if axes[0] is None or axes[0] != axes[1] or len(axes[0]) != 1:
            return nodes, None
        inner = [producers.get(n.input[0]) for n in nodes]
        return (nodes if op_type == "Squeeze" else inner), int(axes[0][0])

    def minmax(self, node: onnx.NodeProto) -> None:
        p = self.pending_minmax[node.output[0]]
        a, b = (self.views.get(x) for x in p["parts"])
        if a is None or b is None or a[0] != b[0] or a[1] != b[1]:
            raise UnsupportedOperator("Max/Min", node.name or node.output[0], "MinMax must pair two halves of one tensor (Split or Slice)")
        src, axis, a0, a1, size = a
        _, _, b0, b1, _ = b
        rank = self.rank[src]
        if sorted([(a0, a1), (b0, b1)]) != [(0, size // 2), (size // 2, size)]:
            raise UnsupportedOperator("Max/Min", node.name or node.output[0], "MinMax must split one axis in two halves")
        if p["squeezed"] is None and p["stacked"] is None:
            if p["axis"] % rank != axis:
                raise UnsupportedOperator("Max/Min", node.name or node.output[0], "MinMax must split and re-join the same axis")
            return self.emit(node.output[0], MinMax(axis=axis, max_first=p["max_first"]), src)
        self.unbound_minmax(node, p, src, axis, size, rank)

    def unbound_minmax(self, node, p, src: str, axis: int, size: int, rank: int) -> None:
        """Halves of size 1 squeezed away (unbind), re-joined along another axis j: MinMax on the split axis puts
        (max, min) there; moving that axis to j is a Transpose, and a Concat (not a stack) then merges it with
        the next axis: a Reshape. Both are isometries, so the pattern stays 1-Lipschitz."""
        name = node.name or node.output[0]
        if p["squeezed"] is None or p["squeezed"] % rank != axis or size != 2:
            raise UnsupportedOperator("Max/Min", name, "a stacked MinMax must pair the two entries of one axis (unbind)")
        out_rank = rank if p["stacked"] is not None else rank - 1
        j = p["axis"] % out_rank
        if j == 0 or (p["stacked"] is not None and p["stacked"] % out_rank != j):
            raise UnsupportedOperator("Max/Min", name, "MinMax of an unbound pair must re-join the pair along one axis")
        paired = node.output[0] + "/minmax"
        self.emit(paired, MinMax(axis=axis, max_first=p["max_first"]), src)
        perm = [d for d in range(rank) if d != axis]
        perm.insert(j, axis)
        moved = node.output[0] + "/moved" if p["stacked"] is None else node.output[0]
        self.emit(moved, Transpose(tuple(perm)), paired)
        if p["stacked"] is None:
            shape = list(self.shape(moved))
            shape[j : j + 2] = [shape[j] * shape[j + 1]]
            self.emit(node.output[0], Reshape(tuple(shape[1:])), moved)

    # ---------------------------------------------------------------- operators
    def convert_node(self, node: onnx.NodeProto) -> None:
        op, a, name, out = node.op_type, _attrs(node), node.name or node.output[0], node.output[0]
        if out in self.fused_skip or any(out in p["skip"] for p in self.pending_minmax.values()):
            return
        if out in self.pending_minmax:
            return self.minmax(node)
        if out in self.fused:
            return emit_fused(self, node, self.fused[out])
        data = [i for i in node.input if i and not self.is_const(i)]
        if not data:
            raise UnsupportedOperator(op, name, "cannot fold this constant expression")
        x = node.input[0]
        if op in PASS_THROUGH:
            self.alias[out] = self.tensor(x)
            self.values[out] = self.values[x]
        elif op in CONVERTERS:
            CONVERTERS[op](self, node, a, name, out)
        elif op == "Conv":
            self.conv(node, a, out)
        elif op in ("Add", "Sub", "Mul", "Div"):
            self.arithmetic(node, op, data, name, out)
        elif op == "Flatten":
            if a.get("axis", 1) != 1:
                raise UnsupportedOperator(op, name, "only Flatten(axis=1) keeps the batch axis")
            self.emit(out, Reshape((-1,)), x)
        elif op == "Reshape":
            self.reshape(node, a, name, out)
        elif op in ("MaxPool", "AveragePool"):
            self.pool(node, op, a, name, out)
        elif op == "GlobalAveragePool":
            self.emit(out, GlobalAvgPool(), x)
        elif op == "ReduceMean":
            self.reduce_mean(node, a, name, out)
        elif op == "Concat":
            axis = a["axis"] % len(self.shape(x))
            if axis == 0:
                raise UnsupportedOperator(op, name, "concatenation along the batch axis")
            if any(self.is_const(i) for i in node.input):
                raise UnsupportedOperator(op, name, "concatenating a constant tensor (e.g. coordinate channels) is not supported")
            self.emit(out, Concat(axis), *node.input)
        elif op in ("Split", "Slice"):
            self.view(node, op, a, name)
        elif op in ("Softmax", "LogSoftmax"):
            raise UnsupportedOperator(op, name, "certification needs the logits, and a softmax inside the network "
                                      "(attention) has no global Lipschitz bound")
        else:
            raise UnsupportedOperator(op, name, REFUSED.get(op, ""))

    def conv(self, node, a, out):
        w = self.consts.get(node.input[1])
        if w is None or w.ndim != 4:
            raise UnsupportedOperator("Conv", node.name or out, "only 2-D convolutions with constant weights are supported")
        b = self.consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        pads = list(a.get("pads", [0, 0, 0, 0]))
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto not in ("NOTSET", "VALID"):
            in_h, in_w = self.shape(node.input[0])[2:]
            pads = []
            strides, dil, k = a.get("strides", [1, 1]), a.get("dilations", [1, 1]), w.shape[2:]
            for size, s, d, kk in zip((in_h, in_w), strides, dil, k):
                total = max(0, (-(-size // s) - 1) * s + (kk - 1) * d + 1 - size)
                pads.append((total // 2, total - total // 2) if auto == "SAME_UPPER" else (total - total // 2, total // 2))
            pads = [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]
        top, left, bottom, right = pads
        self.emit(out, Conv2d(
            torch.from_numpy(w.astype(np.float64)), None if b is None else torch.from_numpy(b.astype(np.float64)),
            tuple(a.get("strides", [1, 1])), (top, bottom, left, right), tuple(a.get("dilations", [1, 1])), a.get("group", 1),
        ), node.input[0])

    def arithmetic(self, node, op, data, name, out):
        x, y = node.input[0], node.input[1]
        if len(data) == 2:
            if op == "Add":
                return self.emit(out, Add(), x, y)
            if op == "Sub":
                neg = out + "/negated"
                self.emit(neg, Affine(torch.tensor(-1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)), y)
                return self.emit(out, Add(), x, neg)
            raise UnsupportedOperator(op, name, "a product or quotient of two tensors has no global Lipschitz bound")
        tensor_first = not self.is_const(x)
        t, c = (x, y) if tensor_first else (y, x)
        const = self.per_sample_constant(self.consts[c], t, name)
        one, zero = torch.ones_like(const), torch.zeros_like(const)
        if op == "Add":
            affine = Affine(one, const)
        elif op == "Sub":
            affine = Affine(one, -const) if tensor_first else Affine(-one, const)
        elif op == "Mul":
            affine = Affine(const, zero)
        elif tensor_first:  # Div by a constant
            affine = Affine(1.0 / const, zero)
        else:
            raise UnsupportedOperator(op, name, "dividing a constant by a tensor is not Lipschitz")
        self.emit(out, affine, t)

    def reduce_mean(self, node, a, name, out):
        """ReduceMean over the two spatial axes (how torch.export writes global average pooling)."""
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = [int(v) for v in self.consts[node.input[1]]]
        rank = len(self.shape(node.input[0]))
        if rank != 4 or axes is None or sorted(int(v) % rank for v in axes) != [2, 3]:
            raise UnsupportedOperator("ReduceMean", name, "only a mean over the two spatial axes (global average pooling) is supported")
        if a.get("keepdims", 1):
            return self.emit(out, GlobalAvgPool(), node.input[0])
        pooled = out + "/pooled"
        self.emit(pooled, GlobalAvgPool(), node.input[0])
        self.emit(out, Reshape((self.shape(node.input[0])[1],)), pooled)

    def reshape(self, node, a, name, out):
        if not self.is_const(node.input[1]):
            raise UnsupportedOperator("Reshape", name, "its target shape is not a constant")
        dims = [int(d) for d in self.consts[node.input[1]]]
        source = self.shape(node.input[0])
        if not a.get("allowzero", 0):
            dims = [source[i] if d == 0 else d for i, d in enumerate(dims)]
        try:
            target = tuple(self.values[node.input[0]].reshape(dims).shape)
        except RuntimeError:
            raise GlorocertError(f"Reshape {name!r}: cannot reshape {source[1:]} to {dims[1:]}") from None
        if target[0] != self.batch:
            raise UnsupportedOperator("Reshape", name, "it mixes samples of the batch (is the batch size fixed in the export?)")
        self.emit(out, Reshape(target[1:]), node.input[0])

    def pool(self, node, op, a, name, out):
        k, stride, padding, ceil = pool_window(node, a, name)
        if op == "MaxPool":
            if len(node.output) > 1 and node.output[1]:
                raise UnsupportedOperator(op, name, "MaxPool with indices output")
            self.emit(out, MaxPool(k, stride, padding, tuple(a.get("dilations", [1, 1])), ceil), node.input[0])
        else:
            self.emit(out, AvgPool(k, stride, padding, ceil, bool(a.get("count_include_pad", 0))), node.input[0])

    def view(self, node, op, a, name):
        src = node.input[0]
        rank = len(self.shape(src))
        if op == "Split":
            axis = a.get("axis", 0) % rank
            size = self.shape(node.input[0])[axis]
            if len(node.input) > 1 and node.input[1]:
                sizes = [int(s) for s in self.consts[node.input[1]]]
            elif "split" in a:
                sizes = list(a["split"])
            else:
                n = len(node.output)
                sizes = [-(-size // n)] * (n - 1) + [size - (-(-size // n)) * (n - 1)]
            start = 0
            for o, s in zip(node.output, sizes):
                self.views[o] = (src, axis, start, start + s, size)
                start += s
        else:
            starts, ends = (self.consts[i].astype(np.int64) for i in node.input[1:3])
            axes = self.consts[node.input[3]] if len(node.input) > 3 and node.input[3] else np.arange(len(starts))
            steps = self.consts[node.input[4]] if len(node.input) > 4 and node.input[4] else np.ones_like(starts)
            if len(starts) != 1 or int(steps[0]) != 1:
                raise UnsupportedOperator(op, name, "only a contiguous slice along one axis (as part of MinMax)")
            axis = int(axes[0]) % rank
            size = self.shape(node.input[0])[axis]
            lo, hi = (int(np.clip(v if v >= 0 else v + size, 0, size)) for v in (starts[0], ends[0]))
            self.views[node.output[0]] = (src, axis, lo, hi, size)
        self.rank[src] = rank
        if axis == 0:
            raise UnsupportedOperator(op, name, "splitting the batch axis")


def validate_shapes(model: onnx.ModelProto, input_shape: tuple[int, ...]) -> None:
    """ONNX's own shape inference in strict mode: declared shapes that contradict the graph are refused."""
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:
        raise GlorocertError(f"the ONNX graph's declared shapes contradict its operators: {str(e).splitlines()[0][:300]}") from None


def onnx_to_graph(model: onnx.ModelProto, input_shape: tuple[int, ...]) -> Graph:
    return _Converter(model, input_shape).convert()
