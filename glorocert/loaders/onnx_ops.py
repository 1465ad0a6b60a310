"""ONNX operators → IR ops: the converters that the converter's ``convert_node`` dispatches to.

Each converter reads one ONNX node, in every opset form exporters write (attributes that later opsets
moved to inputs: Squeeze/Unsqueeze/Reduce axes, Pad pads, Clip bounds, TopK k, Resize scales/sizes), and
emits IR ops whose Lipschitz constants are written down in glorocert/graph.py. The batch axis (0) is
never permuted, padded, resized, reduced, squeezed or contracted: a node that would is refused by name.
Converters take the converter ``cv`` (its constants, traced values and ``emit``) as first argument.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from glorocert.errors import GlorocertError, UnsupportedOperator
from glorocert.graph import (
    Activation, Affine, AxisMaps, ConvTranspose2d, Linear, PReLU, Reduce, Reshape, Sort, Transpose,
)

SELU_DEFAULTS = (1.67326319217681884765625, 1.05070102214813232421875)
SIMPLE_ACTIVATIONS = {
    "Relu": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "Abs": "abs", "Softsign": "softsign",
    "Softplus": "softplus", "HardSwish": "hardswish", "Mish": "mish",
}
NO_GLOBAL_BOUND = "it has no global Lipschitz bound on unbounded inputs"
REFUSED = {  # a one-line reason for the operators glorocert knows and refuses
    "Erf": "Erf is supported only inside GELU, x·(1 + erf(x/√2))/2",
    "Pow": NO_GLOBAL_BOUND + " (x² is read only inside l2-norm pooling, √(AveragePool(x²)))",
    "Exp": NO_GLOBAL_BOUND, "Log": NO_GLOBAL_BOUND, "Reciprocal": NO_GLOBAL_BOUND,
    "Sqrt": NO_GLOBAL_BOUND + " (√ is read only inside l2-norm pooling, √(AveragePool(x²)))",
    "ThresholdedRelu": "it is discontinuous at its threshold", "Sign": "it is discontinuous",
    "Floor": "it is discontinuous", "Ceil": "it is discontinuous", "Round": "it is discontinuous",
    "LayerNormalization": "it divides by the input's own standard deviation (no global bound)",
    "InstanceNormalization": "it divides by the input's own standard deviation (no global bound)",
    "Attention": "attention multiplies the input by itself (no global bound)",
    "Max": "Max/Min of tensors are supported only as MinMax (two halves of one tensor)",
    "Min": "Max/Min of tensors are supported only as MinMax (two halves of one tensor)",
}


# --------------------------------------------------------------------------- helpers


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def opset_of(model: onnx.ModelProto) -> int:
    return max([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] or [1])


def const_input(cv, node: onnx.NodeProto, index: int, what: str) -> np.ndarray | None:
    """The constant at input ``index``, None when absent or empty; refused when it is computed from the data."""
    if len(node.input) <= index or not node.input[index]:
        return None
    if not cv.is_const(node.input[index]):
        raise UnsupportedOperator(node.op_type, node.name or node.output[0], f"its {what} is computed from the input")
    return np.asarray(cv.consts[node.input[index]])


def axes_of(cv, node, a: dict, index: int, rank: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or the input (newer ones), normalised to ``rank``; None when absent."""
    raw = a.get("axes")
    if raw is None:
        raw = const_input(cv, node, index, "axes")
    return None if raw is None else [int(v) % rank for v in np.asarray(raw).reshape(-1)]


def alias(cv, out: str, x: str) -> None:
    """``out`` is ``x`` (an identity op)."""
    cv.alias[out] = cv.tensor(x)
    cv.values[out] = cv.values[x]


def refuse_batch_axis(op: str, name: str, axes, what: str) -> None:
    if 0 in axes:
        raise UnsupportedOperator(op, name, f"{what} the batch axis")


def pool_window(node: onnx.NodeProto, a: dict, name: str) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], bool]:
    """(kernel, stride, (pad_h, pad_w), ceil_mode) of a 2-D MaxPool / AveragePool with explicit symmetric pads
    (AveragePool: undilated, as F.avg_pool2d computes it)."""
    op = node.op_type
    k = tuple(a["kernel_shape"])
    if len(k) != 2:
        raise UnsupportedOperator(op, name, "only 2-D pooling is supported")
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if text(a.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        raise UnsupportedOperator(op, name, "auto_pad SAME is not supported; export with explicit pads")
    if pads[0] != pads[2] or pads[1] != pads[3]:
        raise UnsupportedOperator(op, name, "asymmetric pooling pads")
    if op == "AveragePool" and any(d != 1 for d in a.get("dilations", [1, 1])):
        raise UnsupportedOperator(op, name, "dilated average pooling (opset 19) is not supported")
    return k, tuple(a.get("strides", [1, 1])), (pads[0], pads[1]), bool(a.get("ceil_mode", 0))


# --------------------------------------------------------------------------- activations


def activation(cv, node, a, name, out):
    op, x = node.op_type, node.input[0]
    if op in SIMPLE_ACTIVATIONS:
        act = Activation(SIMPLE_ACTIVATIONS[op])
    elif op in ("LeakyRelu", "Elu"):
        act = Activation("leaky_relu" if op == "LeakyRelu" else "elu", float(a.get("alpha", 0.01 if op == "LeakyRelu" else 1.0)))
    elif op == "Celu":
        if float(a.get("alpha", 1.0)) <= 0:
            raise UnsupportedOperator(op, name, "CELU with alpha ≤ 0 has an unbounded slope")
        act = Activation("celu", float(a.get("alpha", 1.0)))
    elif op == "Selu":
        act = Activation("selu", params=(float(a.get("alpha", SELU_DEFAULTS[0])), float(a.get("gamma", SELU_DEFAULTS[1]))))
    elif op == "HardSigmoid":
        act = Activation("hardsigmoid", params=(float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))))
    elif op == "Gelu":
        act = Activation("gelu" if text(a.get("approximate", "none")) == "none" else "gelu_tanh")
    elif op == "Clip":
        act = Activation("clip", params=clip_bounds(cv, node, a))
    else:  # Neg
        act = Affine(torch.tensor(-1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    cv.emit(out, act, x)


def clip_bounds(cv, node, a) -> tuple[float, float]:
    """(min, max): attributes up to opset 10, optional constant inputs from opset 11 on."""
    lo, hi = a.get("min"), a.get("max")
    if "min" not in a and "max" not in a:
        lo, hi = const_input(cv, node, 1, "minimum"), const_input(cv, node, 2, "maximum")
    for v in (lo, hi):
        if v is not None and np.size(v) != 1:
            raise UnsupportedOperator("Clip", node.name or node.output[0], "Clip bounds must be scalars")
    lo = -float("inf") if lo is None else float(np.asarray(lo).reshape(-1)[0])
    hi = float("inf") if hi is None else float(np.asarray(hi).reshape(-1)[0])
    return lo, hi


def prelu(cv, node, a, name, out):
    x = node.input[0]
    slope = const_input(cv, node, 1, "slope")
    s = cv.per_sample_constant(slope, x, name)
    if s.numel() == 1:  # one shared slope: a leaky ReLU (negative slopes allowed: the constant is max(1, |a|))
        return cv.emit(out, Activation("leaky_relu", float(s.reshape(-1)[0])), x)
    cv.emit(out, PReLU(s), x)


# --------------------------------------------------------------------------- layout (isometries)


def transpose(cv, node, a, name, out):
    x = node.input[0]
    rank = len(cv.shape(x))
    perm = [int(p) % rank for p in a.get("perm", list(range(rank))[::-1])]
    if perm[0] != 0:
        raise UnsupportedOperator("Transpose", name, "it moves the batch axis; only per-sample axes may be permuted")
    if perm == list(range(rank)):
        return alias(cv, out, x)
    cv.emit(out, Transpose(tuple(perm)), x)


def squeeze(cv, node, a, name, out):
    x = node.input[0]
    shape = cv.shape(x)
    axes = axes_of(cv, node, a, 1, len(shape))
    if axes is None:
        raise UnsupportedOperator("Squeeze", name, "without axes it also drops a batch of size 1; export with explicit axes")
    refuse_batch_axis("Squeeze", name, axes, "squeezing")
    if any(shape[i] != 1 for i in axes):
        raise GlorocertError(f"Squeeze {name!r}: axes {axes} of shape {shape[1:]} are not all of size 1")
    cv.emit(out, Reshape(tuple(d for i, d in enumerate(shape) if i not in axes)[1:]), x)


def unsqueeze(cv, node, a, name, out):
    x = node.input[0]
    shape = list(cv.shape(x))
    raw = a.get("axes")
    raw = const_input(cv, node, 1, "axes") if raw is None else raw
    axes = sorted(int(v) % (len(shape) + np.size(raw)) for v in np.asarray(raw).reshape(-1))
    refuse_batch_axis("Unsqueeze", name, axes, "a new leading axis would displace")
    for axis in axes:
        shape.insert(axis, 1)
    cv.emit(out, Reshape(tuple(shape[1:])), x)


def depth_space(cv, node, a, name, out):
    """DepthToSpace / SpaceToDepth (pixel shuffle): Reshape → Transpose → Reshape, a permutation of each sample."""
    x = node.input[0]
    _, c, h, w = cv.shape(x)
    b = int(a["blocksize"])
    if node.op_type == "SpaceToDepth":
        split, perm, joined = (c, h // b, b, w // b, b), (0, 3, 5, 1, 2, 4), (c * b * b, h // b, w // b)
    elif text(a.get("mode", "DCR")) == "DCR":
        split, perm, joined = (b, b, c // (b * b), h, w), (0, 3, 4, 1, 5, 2), (c // (b * b), h * b, w * b)
    else:  # CRD
        split, perm, joined = (c // (b * b), b, b, h, w), (0, 1, 4, 2, 5, 3), (c // (b * b), h * b, w * b)
    cv.emit(out + "/split", Reshape(split), x)
    cv.emit(out + "/permute", Transpose(perm), out + "/split")
    cv.emit(out, Reshape(joined), out + "/permute")


# --------------------------------------------------------------------------- linear maps


def matmul(cv, node, a, name, out):
    left, right = node.input[:2]
    if not cv.is_const(left) and not cv.is_const(right):
        raise UnsupportedOperator("MatMul", name, "a product of two tensors (attention) has no global Lipschitz bound")
    if cv.is_const(right):
        return matmul_right(cv, left, np.asarray(cv.consts[right], np.float64), name, out)
    return matmul_left(cv, np.asarray(cv.consts[left], np.float64), right, name, out)


def as_matrix(w: np.ndarray, data_rank: int, name: str) -> np.ndarray:
    """A constant MatMul operand as a matrix: a vector is one row, unit leading (stack) axes are dropped."""
    if w.ndim > 2 and all(d == 1 for d in w.shape[:-2]) and w.ndim <= data_rank:
        w = w.reshape(w.shape[-2:])
    if w.ndim > 2:
        raise UnsupportedOperator("MatMul", name, "a stack of constant matrices (batched MatMul) is not supported")
    return w


def matmul_right(cv, x, w, name, out):
    """data · W: W acts on the last axis of every sample (a block-diagonal map of copies of W, norm ‖W‖₂)."""
    shape = cv.shape(x)
    if len(shape) < 2:
        raise UnsupportedOperator("MatMul", name, "the data has no per-sample axis left to multiply")
    w = as_matrix(w, len(shape), name)
    if w.ndim == 1:  # x · v drops the last axis
        cv.emit(out + "/row", Linear(torch.from_numpy(w[None, :].copy())), x)
        return cv.emit(out, Reshape(tuple(shape[1:-1])), out + "/row")
    cv.emit(out, Linear(torch.from_numpy(w.T.copy())), x)


def matmul_left(cv, w, x, name, out):
    """W · data: W acts on axis −2, written as Transpose → Linear on the last axis → Transpose back."""
    shape = cv.shape(x)
    if len(shape) < 3:
        raise UnsupportedOperator("MatMul", name, "a constant on the left of (batch, features) contracts the batch axis")
    w = as_matrix(w, len(shape), name)
    perm = list(range(len(shape)))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    cv.emit(out + "/swap", Transpose(tuple(perm)), x)
    row = w[None, :] if w.ndim == 1 else w
    cv.emit(out + "/linear", Linear(torch.from_numpy(row.copy())), out + "/swap")
    if w.ndim == 1:  # v · X drops axis −2
        return cv.emit(out, Reshape(tuple(shape[1:-2]) + (shape[-1],)), out + "/linear")
    cv.emit(out, Transpose(tuple(perm)), out + "/linear")


def gemm(cv, node, a, name, out):
    """alpha·A'·B' + beta·C with the data as A (transA = 0) and a constant B, in either layout (transB)."""
    x, b = node.input[:2]
    if cv.is_const(x) or not cv.is_const(b):
        raise UnsupportedOperator("Gemm", name, "only data·W (+ C) with a constant W keeps the batch axis first")
    if a.get("transA", 0):
        raise UnsupportedOperator("Gemm", name, "transA = 1 would move the batch axis into the features")
    w = np.asarray(cv.consts[b], np.float64) * float(a.get("alpha", 1.0))
    w = w if a.get("transB", 0) else w.T  # (out, in)
    c = const_input(cv, node, 2, "bias")
    bias = None
    if c is not None:
        c = np.asarray(c, np.float64) * float(a.get("beta", 1.0))
        if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
            raise UnsupportedOperator("Gemm", name, f"a bias of shape {c.shape} varies along the batch axis")
        bias = torch.from_numpy(np.broadcast_to(c.reshape(-1) if c.ndim else c, (w.shape[0],)).copy())
    cv.emit(out, Linear(torch.from_numpy(w.copy()), bias), x)


def batchnorm(cv, node, a, name, out):
    """Inference BatchNormalization on (N, C, …): a per-channel affine map (1-d, 2-d or more)."""
    if a.get("training_mode", 0) or any(o for o in node.output[1:]):
        raise UnsupportedOperator("BatchNormalization", name, "training mode (batch statistics) mixes samples")
    gamma, beta, mean, var = (np.asarray(const_input(cv, node, i, "statistics"), np.float64) for i in range(1, 5))
    scale = gamma / np.sqrt(var + a.get("epsilon", 1e-5))
    view = (-1,) + (1,) * (len(cv.shape(node.input[0])) - 2)
    shift = (beta - mean * scale).reshape(view)
    cv.emit(out, Affine(torch.from_numpy(scale.reshape(view)), torch.from_numpy(shift)), node.input[0])


def conv_transpose(cv, node, a, name, out):
    w = cv.consts.get(node.input[1])
    if w is None or np.ndim(w) != 4:
        raise UnsupportedOperator("ConvTranspose", name, "only 2-D transposed convolutions with constant weights are supported")
    b = const_input(cv, node, 2, "bias")
    stride, dil = tuple(a.get("strides", [1, 1])), tuple(a.get("dilations", [1, 1]))
    extra = tuple(a.get("output_padding", [0, 0]))
    top, left, bottom, right = conv_transpose_pads(cv.shape(node.input[0])[2:], w.shape[2:], stride, dil, extra, a, name)
    op = ConvTranspose2d(
        torch.from_numpy(np.asarray(w, np.float64)), None if b is None else torch.from_numpy(np.asarray(b, np.float64)),
        stride, (top, bottom, left, right), extra, dil, int(a.get("group", 1)),
    )
    cv.emit(out, op, node.input[0])


def conv_transpose_pads(size, kernel, stride, dil, extra, a, name) -> list[int]:
    """[top, left, bottom, right]: explicit pads, or (output_shape / SAME) the ONNX split of the total padding."""
    auto = text(a.get("auto_pad", "NOTSET"))
    if "output_shape" not in a and auto not in ("SAME_UPPER", "SAME_LOWER"):
        return [0, 0, 0, 0] if auto == "VALID" else list(a.get("pads", [0, 0, 0, 0]))
    target = list(a["output_shape"])[-2:] if "output_shape" in a else [n * s for n, s in zip(size, stride)]
    total = [s * (n - 1) + e + (k - 1) * d + 1 - t for n, k, s, d, e, t in zip(size, kernel, stride, dil, extra, target)]
    if any(t < 0 for t in total):
        raise UnsupportedOperator("ConvTranspose", name, f"output_shape {target} is larger than the full transposed convolution")
    begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
    return begin + [t - s for t, s in zip(total, begin)]


# --------------------------------------------------------------------------- separable copies: Pad, Resize


def pad(cv, node, a, name, out):
    """Pad in every mode as an AxisMaps (per-axis copy matrices); all-zero pads are an identity."""
    x = node.input[0]
    shape = cv.shape(x)
    mode = text(a.get("mode", "constant"))
    if "pads" in a:  # opset ≤ 10
        pads, value, axes = list(a["pads"]), float(a.get("value", 0.0)), None
    else:
        pads = const_input(cv, node, 1, "pads")
        given = const_input(cv, node, 2, "constant value")
        value = 0.0 if given is None or np.size(given) == 0 else float(np.asarray(given).reshape(-1)[0])
        axes = axes_of(cv, node, {}, 3, len(shape))
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes = list(range(len(shape))) if axes is None else axes
    begin, end = dict(zip(axes, pads[: len(axes)])), dict(zip(axes, pads[len(axes) :]))
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise UnsupportedOperator("Pad", name, f"mode {mode!r}")
    refuse_batch_axis("Pad", name, [ax for ax in axes if begin[ax] or end[ax]], "padding")
    maps = tuple((ax, pad_matrix(shape[ax], begin[ax], end[ax], mode)) for ax in axes if begin[ax] or end[ax])
    if not maps:  # how PyTorch 1.6 exported AvgPool2d: Pad(all zeros) → AveragePool
        return alias(cv, out, x)
    op = AxisMaps(maps, None, f"Pad({mode})")
    if mode == "constant" and value != 0.0:  # the padded cells hold the value: an affine shift
        op.shift = value * (1.0 - op.homogeneous(torch.ones(1, *shape[1:], dtype=torch.float64))[0])
    cv.emit(out, op, x)


def pad_matrix(n: int, begin: int, end: int, mode: str) -> torch.Tensor:
    """(n + begin + end) × n: row j copies the input element that output j reads (none for constant cells)."""
    size = n + begin + end
    if size <= 0:
        raise GlorocertError(f"Pad crops an axis of size {n} to {size}")
    src = np.arange(size) - begin
    if mode == "edge":
        src = np.clip(src, 0, n - 1)
    elif mode == "wrap":
        src = src % n
    elif mode == "reflect":  # reflect about the first and last element: period 2(n − 1)
        period = max(2 * (n - 1), 1)
        src = src % period
        src = np.where(src < n, src, period - src)
    keep = (src >= 0) & (src < n)
    matrix = torch.zeros(size, n, dtype=torch.float64)
    matrix[torch.from_numpy(np.nonzero(keep)[0]), torch.from_numpy(src[keep])] = 1.0
    return matrix


def resize(cv, node, a, name, out):
    """Resize / Upsample: separable, so one matrix per resized axis, read off the ONNX reference implementation."""
    x = node.input[0]
    shape = cv.shape(x)
    if text(a.get("coordinate_transformation_mode", "")) == "tf_crop_and_resize":
        raise UnsupportedOperator(node.op_type, name, "tf_crop_and_resize extrapolates constants outside its box")
    if text(a.get("keep_aspect_ratio_policy", "stretch")) != "stretch":
        raise UnsupportedOperator(node.op_type, name, "keep_aspect_ratio_policy other than stretch")
    scales, sizes = resize_targets(cv, node, a, shape)
    maps = []
    for axis, n in enumerate(shape):
        scale, size = (None, sizes[axis]) if sizes is not None else (scales[axis], None)
        if (size == n) if size is not None else (scale == 1.0):
            continue  # unchanged: every mode is the identity at scale 1
        refuse_batch_axis(node.op_type, name, [axis], "resizing")
        maps.append((axis, resize_matrix(cv, node, a, n, scale, size)))
    if not maps:
        return alias(cv, out, x)
    cv.emit(out, AxisMaps(tuple(maps), None, f"Resize({text(a.get('mode', 'nearest'))})"), x)


def resize_targets(cv, node, a, shape) -> tuple[list | None, list | None]:
    """Per-axis (scales, sizes) — one of them None — from the attribute or inputs of each opset's form."""
    if node.op_type == "Upsample" or opset_of(cv.model) < 11:
        scales = a["scales"] if "scales" in a else const_input(cv, node, 1, "scales")
        return [float(s) for s in np.asarray(scales).reshape(-1)], None
    scales, sizes = const_input(cv, node, 2, "scales"), const_input(cv, node, 3, "sizes")
    scales = None if scales is None or scales.size == 0 else [float(s) for s in scales.reshape(-1)]
    sizes = None if sizes is None or sizes.size == 0 else [int(s) for s in sizes.reshape(-1)]
    axes = a.get("axes")
    if axes is not None:  # opset 18: the targets of the listed axes only
        full_scales, full_sizes = [1.0] * len(shape), list(shape)
        for k, axis in enumerate(int(v) % len(shape) for v in axes):
            if scales is not None:
                full_scales[axis] = scales[k]
            else:
                full_sizes[axis] = sizes[k]
        scales, sizes = (full_scales, None) if scales is not None else (None, full_sizes)
    return scales, sizes


def resize_matrix(cv, node, a, n: int, scale: float | None, size: int | None) -> torch.Tensor:
    """The (out × n) matrix of the resize along one axis: the same node run on the identity, resizing axis 0 only."""
    from onnx.reference import ReferenceEvaluator

    opset = max(opset_of(cv.model), 13)
    keep = ("mode", "coordinate_transformation_mode", "nearest_mode", "cubic_coeff_a", "exclude_outside", "antialias")
    kwargs = {k: v for k, v in a.items() if k in keep}
    if node.op_type == "Upsample" or opset_of(cv.model) < 11:  # Upsample and Resize-10: asymmetric coordinates, and
        # onnxruntime's nearest pixel truncates when enlarging and rounds up when shrinking
        kwargs.update(coordinate_transformation_mode="asymmetric", nearest_mode="floor" if scale >= 1 else "ceil")
    inits = [numpy_helper.from_array(np.array([], np.float32), "roi")]
    if size is None:
        inits.append(numpy_helper.from_array(np.array([scale, 1.0], np.float32), "scales"))
        inputs = ["x", "roi", "scales"]
    else:
        inits.append(numpy_helper.from_array(np.array([size, n], np.int64), "sizes"))
        inputs = ["x", "roi", "", "sizes"]
    graph = helper.make_graph(
        [helper.make_node("Resize", inputs, ["y"], **kwargs)], "resize_axis",
        [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, [n, n])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, None)], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        (matrix,) = ReferenceEvaluator(model).run(None, {"x": np.eye(n)})
    except Exception as e:
        raise UnsupportedOperator(node.op_type, node.name or node.output[0], f"cannot evaluate this resize ({type(e).__name__})") from None
    return torch.from_numpy(np.asarray(matrix, np.float64).copy())


# --------------------------------------------------------------------------- reductions and sorting


def reduce_extreme(cv, node, a, name, out):
    """ReduceMax / ReduceMin over per-sample axes (GlobalMaxPool: over every spatial axis)."""
    x = node.input[0]
    rank = len(cv.shape(x))
    if node.op_type == "GlobalMaxPool":
        return cv.emit(out, Reduce("max", tuple(range(2, rank)), True), x)
    axes = axes_of(cv, node, a, 1, rank)
    if not axes:
        if axes is not None and a.get("noop_with_empty_axes", 0):
            return alias(cv, out, x)
        raise UnsupportedOperator(node.op_type, name, "a reduction over all axes includes the batch axis")
    refuse_batch_axis(node.op_type, name, axes, "reducing over")
    kind = "max" if node.op_type == "ReduceMax" else "min"
    cv.emit(out, Reduce(kind, tuple(sorted(set(axes))), bool(a.get("keepdims", 1))), x)


def topk(cv, node, a, name, out):
    """TopK values (sorted): the first k entries of a sort along ``axis``; its indices are not Lipschitz."""
    x = node.input[0]
    shape = cv.shape(x)
    if len(node.output) > 1 and node.output[1] and reads(cv.model, node.output[1]):
        raise UnsupportedOperator("TopK", name, "its indices output is used; only the sorted values are Lipschitz")
    if not a.get("sorted", 1):
        raise UnsupportedOperator("TopK", name, "unsorted TopK leaves the order of its values undefined")
    axis = int(a.get("axis", -1)) % len(shape)
    refuse_batch_axis("TopK", name, [axis], "sorting along")
    k = a["k"] if "k" in a else const_input(cv, node, 1, "k")
    k = int(np.asarray(k).reshape(-1)[0])
    cv.emit(out, Sort(axis, bool(a.get("largest", 1)), None if k == shape[axis] else k), x)


def reads(model: onnx.ModelProto, tensor: str) -> bool:
    """Whether any node or the graph's outputs read ``tensor``."""
    return any(tensor in n.input for n in model.graph.node) or any(o.name == tensor for o in model.graph.output)


CONVERTERS = {
    **{op: activation for op in [*SIMPLE_ACTIVATIONS, "LeakyRelu", "Elu", "Celu", "Selu", "HardSigmoid", "Gelu", "Clip", "Neg"]},
    "PRelu": prelu, "Transpose": transpose, "Squeeze": squeeze, "Unsqueeze": unsqueeze,
    "DepthToSpace": depth_space, "SpaceToDepth": depth_space,
    "MatMul": matmul, "Gemm": gemm, "BatchNormalization": batchnorm, "ConvTranspose": conv_transpose,
    "Pad": pad, "Resize": resize, "Upsample": resize,
    "ReduceMax": reduce_extreme, "ReduceMin": reduce_extreme, "GlobalMaxPool": reduce_extreme, "TopK": topk,
}
