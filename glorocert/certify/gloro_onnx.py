"""The GloRo ONNX model: any classifier's ONNX graph with the ⊥ logit of the frozen margin matrix baked in.

:func:`export_gloro_onnx` appends to the graph the GloRo certification rule
of :mod:`glorocert.certify.gloro`, with the frozen margin matrix as
constants, so that *any* ONNX runtime certifies by argmax::

    j      = ArgMax(y)                                   first index on ties
    slack  = rtol · (1 + max_i |y_i|)                    float rounding budget
    y_⊥    = max_{i≠j} ( y_i + ε·K[j, i] ) + slack
    output = [y_0 … y_{C−1}, y_⊥']                       shape (N, C + 1)

with ``y_⊥' > y_j`` whenever ``y_⊥ ≥ y_j`` (so the argmax is ⊥, index C, on
every tie between ⊥ and the top logit) and ``y_⊥' = y_⊥ < y_j`` otherwise.
The argmax is not ⊥ exactly when ``min_{i≠j} (y_j − y_i − slack) / K[j, i] > ε``
— certify's rule — up to float32 rounding, and every rounding step is pushed
towards ⊥: ``ε·K`` is rounded up to float32 and the float32 sums are inflated
by a relative ``2⁻²⁰`` (more than their half-ulp rounding error). With
``rounding_rtol=0`` the rule is the paper's plain ``y_⊥ ≥ y_j``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

import onnx
from onnx import TensorProto, helper, numpy_helper

from glorocert.errors import GlorocertError
from glorocert.files import atomic_write
from glorocert.loaders import ROUNDING_RTOL

GLORO_OUTPUT = "gloro_logits"
PREFIX = "gloro_bottom/"
MIN_OPSET = 13
_RELATIVE_SLACK = 2.0 ** -20   # ≥ 8 ulps of float32: covers rounding of one addition
_ABSOLUTE_SLACK = 1e-30        # makes y_⊥' > y_j also when y_j == 0


def _round_up_float32(values: np.ndarray) -> np.ndarray:
    """float64 → float32, never below the float64 value."""
    values = np.asarray(values, dtype=np.float64)
    rounded = values.astype(np.float32)
    low = rounded.astype(np.float64) < values
    rounded[low] = np.nextafter(rounded[low], np.float32(np.inf))
    return rounded


def export_gloro_onnx(
    model_onnx_path: str | os.PathLike,
    margin_matrix,
    eps: float,
    out_path: str | os.PathLike,
    rounding_rtol: float | None = None,
) -> Path:
    """Write an ONNX model whose single output is the C logits plus the ⊥ logit (N×(C+1)).

    ``rounding_rtol`` is the margin slack relative to ``1 + max|y|``; by
    default :data:`glorocert.loaders.ROUNDING_RTOL` (pass ``model.rounding_rtol``
    to match ``certify`` on a loaded model exactly).

    ``margin_matrix[j][i]`` must bound the Lipschitz constant of ``y_j − y_i``
    (the frozen bound's margin matrix); ``eps`` is the l2 radius. The
    original graph must have one output of shape (N, C). Guarantee: when
    ``K`` is a sound bound, argmax of the output ≠ C implies the original
    model's prediction is constant on the l2 ball of radius ``eps``.
    """
    if rounding_rtol is None:
        rounding_rtol = ROUNDING_RTOL
    model, logits_info, opset = _checked_inputs(model_onnx_path, margin_matrix, eps, rounding_rtol)
    K = np.asarray(margin_matrix, dtype=np.float64)
    num_classes = K.shape[0]
    graph = model.graph
    graph.node.extend(_bottom_nodes(logits_info.name, opset))
    graph.initializer.extend(_constants(K, eps, rounding_rtol))
    dims = logits_info.type.tensor_type.shape.dim
    batch = dims[0].dim_param or (str(dims[0].dim_value) if dims[0].HasField("dim_value") else "batch")
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info(GLORO_OUTPUT, TensorProto.FLOAT, [batch, num_classes + 1])
    )
    doc = (f"GloRo net: logits + bottom logit at eps={eps!r} (l2); argmax == {num_classes} "
           "means not certified.")
    model.doc_string = (model.doc_string + "\n" if model.doc_string else "") + doc
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise GlorocertError(f"the GloRo ONNX graph fails the ONNX checker: {exc}") from None
    with atomic_write(out_path) as tmp:
        onnx.save(model, str(tmp))
    return Path(out_path)


def _checked_inputs(model_onnx_path, margin_matrix, eps: float, rounding_rtol: float):
    """The loaded model, its logits output and its opset, after refusing anything the ⊥ rule cannot be appended to."""
    try:
        model = onnx.load(str(model_onnx_path))
    except Exception as exc:
        raise GlorocertError(f"cannot read ONNX model {model_onnx_path}: {exc}") from None
    if len(model.graph.output) != 1:
        raise GlorocertError(f"{model_onnx_path}: expected one output (the logits), found {len(model.graph.output)}")
    K = np.asarray(margin_matrix, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] < 2:
        raise GlorocertError(f"margin matrix must be C×C with C >= 2, got shape {K.shape}")
    if not np.all(np.isfinite(K)) or np.any(K < 0):
        raise GlorocertError("margin matrix must be finite and non-negative")
    if not (eps >= 0 and np.isfinite(eps)):
        raise GlorocertError(f"eps must be a finite number >= 0, got {eps}")
    if not (rounding_rtol >= 0 and np.isfinite(rounding_rtol)):
        raise GlorocertError(f"rounding_rtol must be a finite number >= 0, got {rounding_rtol}")
    num_classes = K.shape[0]
    logits_info = model.graph.output[0]
    dims = logits_info.type.tensor_type.shape.dim
    if logits_info.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise GlorocertError(f"{model_onnx_path}: output {logits_info.name!r} must be float32")
    if len(dims) != 2 or (dims[1].HasField("dim_value") and dims[1].dim_value != num_classes):
        raise GlorocertError(
            f"{model_onnx_path}: output {logits_info.name!r} is not (N, {num_classes}) "
            f"to match the {num_classes}×{num_classes} margin matrix"
        )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), MIN_OPSET)
    if opset < MIN_OPSET:
        raise GlorocertError(f"{model_onnx_path}: opset {opset} is too old (need >= {MIN_OPSET})")
    return model, logits_info, opset


def _constants(K: np.ndarray, eps: float, rounding_rtol: float) -> list:
    """The rule's constants as initializers (ε·K rounded up to float32, the slacks)."""
    eps_k = _round_up_float32(eps * K)
    constants = {
        "eps_margin": eps_k,                                              # (C, C)
        "class_index": np.arange(K.shape[0], dtype=np.int64)[None, :],   # (1, C)
        "minus_inf": np.array(-np.inf, dtype=np.float32),
        "slack_rel": np.array(_RELATIVE_SLACK, dtype=np.float32),
        "slack_abs": np.array(_ABSOLUTE_SLACK, dtype=np.float32),
        "rounding_rtol": _round_up_float32(np.array(rounding_rtol)),
        "one": np.array(1.0, dtype=np.float32),
        "axis1": np.array([1], dtype=np.int64),
    }
    return [numpy_helper.from_array(v, PREFIX + k) for k, v in constants.items()]


def _bottom_nodes(logits: str, opset: int) -> list:
    """The nodes computing the ⊥ logit from ``logits`` and appending it (see the module docstring)."""
    c = lambda name: PREFIX + name  # noqa: E731 - local naming helper

    def reduce_max(source: str, target: str):
        if opset >= 18:  # axes became an input in opset 18
            return helper.make_node("ReduceMax", [source, c("axis1")], [target], keepdims=1)
        return helper.make_node("ReduceMax", [source], [target], axes=[1], keepdims=1)

    return [
        # j = first argmax, as (N,) and (N, 1)
        helper.make_node("ArgMax", [logits], [c("j")], axis=1, keepdims=0, select_last_index=0),
        helper.make_node("Unsqueeze", [c("j"), c("axis1")], [c("j_col")]),
        # y_j
        helper.make_node("GatherElements", [logits, c("j_col")], [c("top")], axis=1),
        # candidates y_i + ε K[j, i], with i = j masked out
        helper.make_node("Gather", [c("eps_margin"), c("j")], [c("eps_margin_rows")], axis=0),
        helper.make_node("Add", [logits, c("eps_margin_rows")], [c("candidates")]),
        helper.make_node("Equal", [c("class_index"), c("j_col")], [c("is_predicted")]),
        helper.make_node("Where", [c("is_predicted"), c("minus_inf"), c("candidates")], [c("others")]),
        reduce_max(c("others"), c("strongest_other")),
        # slack = rtol · (1 + max|y|), as certify subtracts it from every margin
        helper.make_node("Abs", [logits], [c("logits_abs")]),
        reduce_max(c("logits_abs"), c("logits_scale")),
        helper.make_node("Add", [c("logits_scale"), c("one")], [c("scale_plus_one")]),
        helper.make_node("Mul", [c("scale_plus_one"), c("rounding_rtol")], [c("slack")]),
        helper.make_node("Add", [c("strongest_other"), c("slack")], [c("bottom_raw")]),
        # push the float32 rounding of the sums towards ⊥
        helper.make_node("Abs", [c("bottom_raw")], [c("bottom_abs")]),
        helper.make_node("Mul", [c("bottom_abs"), c("slack_rel")], [c("bottom_up_gap")]),
        helper.make_node("Add", [c("bottom_raw"), c("bottom_up_gap")], [c("bottom")]),
        # ⊥ must win a tie with y_j: lift it strictly above y_j when y_⊥ ≥ y_j
        helper.make_node("GreaterOrEqual", [c("bottom"), c("top")], [c("is_bottom")]),
        helper.make_node("Abs", [c("top")], [c("top_abs")]),
        helper.make_node("Mul", [c("top_abs"), c("slack_rel")], [c("top_slack")]),
        helper.make_node("Add", [c("top_slack"), c("slack_abs")], [c("top_gap")]),
        helper.make_node("Add", [c("top"), c("top_gap")], [c("above_top")]),
        helper.make_node("Max", [c("bottom"), c("above_top")], [c("bottom_lifted")]),
        helper.make_node("Where", [c("is_bottom"), c("bottom_lifted"), c("bottom")], [c("bottom_final")]),
        helper.make_node("Concat", [logits, c("bottom_final")], [GLORO_OUTPUT], axis=1),
    ]
