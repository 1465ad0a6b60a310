"""Read an ONNX file and rewrite it, provably without changing the decision, into the form the converter takes.

Files from other exporters differ in ways that do not matter to the function
they compute; each rewrite below keeps the model's argmax on every input:

* **gzip** (``.onnx.gz``, how VNN-COMP ships models) is unpacked in memory;
  external-data files are read from beside the model, and a missing one is named.
* **Topological order**: keras2onnx writes nodes out of order (onnxruntime runs
  them anyway); they are sorted.
* **One output**: ``--output NAME`` picks the logits among several outputs (or
  any tensor in the graph); nodes that do not feed it are dropped.
* **Trailing Softmax / LogSoftmax** over the class axis is removed: both are
  strictly increasing in the sense that matters (z_i > z_j ⇔ s_i > s_j, ties
  kept), so the argmax is unchanged and the logits before them are certified.
* **Constant folding**: every node that does not depend on the model's input
  (Constant, Cast/Concat chains, and weight parametrisations computed inside
  the graph: spectral normalisation, Björck orthogonalisation, weight norm,
  AOL rescaling) is evaluated once by onnx's reference evaluator and stored
  as a plain weight.
* **Layout**: samples are channels-first everywhere in glorocert. A
  channels-last input whose every consumer is a Transpose(0, 3, 1, 2)
  (tf2onnx, keras2onnx) takes them directly; any other input declared H×W×C
  (C of 1, 3 or 4) or H×W gets a Transpose (or a Reshape adding the unit
  channel) put in front, and so does one whose declared shape is another
  arrangement of the given input shape. Both are isometries, so bounds are
  unchanged; the model is the same function of the same pixels.

The native runner runs the prepared model, so the IR/native equivalence check
compares against what is certified; every rewrite is reported as a note.
"""

from __future__ import annotations

import gzip
import heapq
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from glorocert.errors import GlorocertError, UnsupportedOperator, one_line

GZIP_MAGIC = b"\x1f\x8b"
ARGMAX_PRESERVING = {"Softmax", "LogSoftmax", "Identity"}
RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def read_onnx(path: Path) -> onnx.ModelProto:
    """Parse ``path`` (plain or gzipped), load its external data, and run onnx's checker (with nodes sorted)."""
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise GlorocertError(f"{path}: a damaged gzip file ({one_line(str(e))}); is it truncated?") from None
    try:
        model = onnx.load_from_string(raw)
    except Exception as e:  # protobuf raises several types on garbage
        raise GlorocertError(f"{path}: not a readable ONNX file ({type(e).__name__}); is it truncated or another format?") from None
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, onnx.checker.ValidationError) as e:
        files = sorted({str(f) for f in (_external_file(t, path.parent) for t in _external_tensors(model)) if not f.is_file()})
        where = f"; missing: {', '.join(files)}" if files else f" ({one_line(str(e))})"
        raise GlorocertError(f"{path}: its weights are stored in external data files that cannot be read{where}. "
                             "Keep them beside the model, under the names it records") from None
    sort_nodes(model.graph)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise GlorocertError(f"{path}: invalid ONNX model: {one_line(str(e))}") from None
    return model


def _external_tensors(model: onnx.ModelProto):
    return [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def _external_file(tensor: onnx.TensorProto, base: Path) -> Path:
    location = {e.key: e.value for e in tensor.external_data}.get("location", "")
    return base / location


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Kahn's algorithm over tensor names, keeping the file's order among ready nodes; a cycle or missing tensor is named."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output}
    waiting_on = [{producer[i] for i in n.input if i not in available and i in producer} for n in graph.node]
    missing = sorted({i for n in graph.node for i in n.input if i not in available and i not in producer})
    if missing:
        raise GlorocertError(f"the ONNX graph reads {missing[:3]}, which neither an input, a weight nor a node provides")
    if all(not w or max(w) < k for k, w in enumerate(waiting_on)):
        return  # already in order
    users: dict[int, list[int]] = {}
    for k, waits in enumerate(waiting_on):
        for j in waits:
            users.setdefault(j, []).append(k)
    ready = [k for k, w in enumerate(waiting_on) if not w]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users.get(k, []):
            waiting_on[u].discard(k)
            if not waiting_on[u]:
                heapq.heappush(ready, u)
    if len(order) != len(graph.node):
        stuck = next(n for k, n in enumerate(graph.node) if k not in set(order))
        raise GlorocertError(f"the ONNX graph has a cycle through node {stuck.name or stuck.op_type!r}")
    nodes = [graph.node[k] for k in order]
    del graph.node[:]
    graph.node.extend(nodes)


def prepare(
    model: onnx.ModelProto, *, output: str | None = None, data_shape: tuple[int, ...] | None = None
) -> tuple[onnx.ModelProto, list[str]]:
    """The rewrites of the module docstring, on a copy; returns it with one note per rewrite made."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    notes: list[str] = []
    branching = next((n for n in model.graph.node if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                         for a in n.attribute)), None)
    if branching is not None:  # the rewrites below read one flat graph
        raise UnsupportedOperator(branching.op_type, branching.name or branching.output[0],
                                  "control flow (a subgraph inside the node) has no static Lipschitz analysis")
    _select_output(model, output, notes)
    _strip_argmax_tail(model, notes)
    _prune(model.graph)
    _fold_constants(model, notes)
    _channels_first(model, data_shape, notes)
    return model, notes


def _select_output(model: onnx.ModelProto, output: str | None, notes: list[str]) -> None:
    graph = model.graph
    names = [o.name for o in graph.output]
    if output is None:
        if len(names) != 1:
            raise GlorocertError(f"the model has {len(names)} outputs {names}; choose the logits with --output NAME")
        return
    if output in names:
        kept = [o for o in graph.output if o.name == output]
    elif any(output in n.output for n in graph.node):
        kept = [_value_info(model, output)]
    else:
        raise GlorocertError(f"--output {output!r}: the model computes no such tensor; its outputs are {names}")
    del graph.output[:]
    graph.output.extend(kept)
    if names != [output]:
        notes.append(f"certifying the output {output!r} (the model's outputs are {names})")


def _value_info(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto:
    inferred = onnx.shape_inference.infer_shapes(model)
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        if info.name == name:
            return info
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)


def _strip_argmax_tail(model: onnx.ModelProto, notes: list[str]) -> None:
    """Remove Softmax/LogSoftmax (and Identity) at the end when they act on the class axis of (batch, classes)."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    out = graph.output[0]
    node, stripped, logits = producers.get(out.name), [], out.name
    while node is not None and node.op_type in ARGMAX_PRESERVING and _on_class_axis(node, model, out):
        stripped.append(node.op_type)
        logits = node.input[0]
        node = producers.get(logits)
    if not any(op != "Identity" for op in stripped):
        return
    renamed = onnx.ValueInfoProto()
    renamed.CopyFrom(out)
    renamed.name = logits
    del graph.output[:]
    graph.output.append(renamed)
    notes.append(f"certifying the logits before the final {' → '.join(reversed([s for s in stripped if s != 'Identity']))}: "
                 "it is increasing in each logit's lead, so the decision (argmax) is the same")


def _on_class_axis(node: onnx.NodeProto, model: onnx.ModelProto, out: onnx.ValueInfoProto) -> bool:
    if node.op_type == "Identity":
        return True
    rank = len(out.type.tensor_type.shape.dim)
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), None)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if axis is None:
        axis = -1 if opset >= 13 else 1
    return rank == 2 and axis in (1, -1)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes (and initializers) the output does not depend on."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    unused = [t for t in graph.initializer if t.name not in needed]
    for tensor in unused:
        graph.initializer.remove(tensor)
    for value in [i for i in graph.input if i.name not in needed]:  # IR ≤ 3 lists weights as inputs too
        graph.input.remove(value)


def _input_dependent(graph: onnx.GraphProto) -> set[str]:
    inits = {t.name for t in graph.initializer}
    dependent = {i.name for i in graph.input if i.name not in inits}
    for node in graph.node:
        if any(i in dependent for i in node.input) or node.op_type in RANDOM_OPS:
            dependent.update(node.output)
    return dependent


def _fold_constants(model: onnx.ModelProto, notes: list[str]) -> None:
    """Evaluate, in one pass of onnx's reference evaluator, every node that does not depend on the input."""
    graph = model.graph
    dependent = _input_dependent(graph)
    nodes = list(graph.node)
    random = [n.op_type for n in nodes if n.op_type in RANDOM_OPS]
    if random:
        raise GlorocertError(f"the model draws random numbers ({random[0]}); glorocert certifies deterministic models only")
    folded = [k for k, n in enumerate(nodes) if not any(o in dependent for o in n.output)]
    if not folded:
        return
    constant = [nodes[k] for k in folded]
    kept = [n for k, n in enumerate(nodes) if k not in set(folded)]
    produced = {o for n in constant for o in n.output}
    needed = [t for t in dict.fromkeys(i for n in kept for i in n.input) if t in produced]
    needed += [o.name for o in graph.output if o.name in produced and o.name not in needed]
    values = _evaluate(model, constant, needed)
    kept = [onnx.NodeProto.FromString(n.SerializeToString()) for n in kept]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v), name) for name, v in zip(needed, values))
    _prune(graph)
    computed = sorted({n.op_type for n in constant if n.op_type != "Constant"})
    if computed:
        notes.append(f"folded the operations that do not depend on the input ({', '.join(computed)}) into constant weights")


def _evaluate(model: onnx.ModelProto, nodes: list, outputs: list[str]) -> list:
    from onnx.reference import ReferenceEvaluator  # the reference evaluator is slow to import; only folding needs it

    graph = helper.make_graph(
        nodes, "constants", [], [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in outputs],
        list(model.graph.initializer),
    )
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        return ReferenceEvaluator(sub).run(None, {})
    except Exception as e:
        raise GlorocertError(f"could not evaluate the model's constant subgraph ({type(e).__name__}: {one_line(str(e))})") from None


def _channels_first(model: onnx.ModelProto, data_shape: tuple[int, ...] | None, notes: list[str]) -> None:
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        return  # the converter says what is wrong
    x = inputs[0]
    dims = x.type.tensor_type.shape.dim
    consumers = [n for n in graph.node if x.name in n.input]
    if len(dims) == 4 and consumers and all(_is_to_channels_first(n) for n in consumers):
        _drop_transposes(graph, x, consumers)
        notes.append("the model takes channels-last (NHWC) input and transposes it first; "
                     "glorocert feeds it channels-first samples directly")
    else:
        _adapt_to_data(model, x, tuple(data_shape) if data_shape is not None else _channels_first_form(x), notes)


def _channels_first_form(x: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """(C, H, W) for a declared H×W×C (C of 1, 3 or 4) or (1, H, W) for H×W: images read channels-first everywhere."""
    dims = [d.dim_value if d.HasField("dim_value") else None for d in x.type.tensor_type.shape.dim[1:]]
    if None in dims or not all(dims):
        return None
    if len(dims) == 3 and dims[2] in (1, 3, 4) and min(dims[:2]) > 4:
        return dims[2], dims[0], dims[1]
    if len(dims) == 2 and min(dims) > 4:
        return 1, dims[0], dims[1]
    return None


def _is_to_channels_first(node: onnx.NodeProto) -> bool:
    perm = next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)
    return node.op_type == "Transpose" and perm == [0, 3, 1, 2]


def _drop_transposes(graph: onnx.GraphProto, x: onnx.ValueInfoProto, transposes: list) -> None:
    n, h, w, c = (_copy_dim(d) for d in x.type.tensor_type.shape.dim)
    for node in transposes:
        node.op_type = "Identity"
        del node.attribute[:]
    shape = x.type.tensor_type.shape
    del shape.dim[:]
    shape.dim.extend([n, c, h, w])


def _copy_dim(dim):
    copy = onnx.TensorShapeProto.Dimension()
    copy.CopyFrom(dim)
    return copy


def _adapt_to_data(model: onnx.ModelProto, x: onnx.ValueInfoProto, data_shape: tuple[int, ...] | None, notes: list[str]) -> None:
    """Put a Transpose (H,W,C ← C,H,W) or a Reshape (H,W ← 1,H,W) in front when the data is the channels-first form."""
    declared = tuple(d.dim_value if d.HasField("dim_value") else None for d in x.type.tensor_type.shape.dim[1:])
    if data_shape is None or len(data_shape) != 3 or declared == data_shape or None in declared:
        return
    c, h, w = data_shape
    graph = model.graph
    fed = x.name + "/channels_first"
    if declared == (h, w, c):
        front = helper.make_node("Transpose", [fed], [x.name], perm=[0, 2, 3, 1], name=fed + "/to_nhwc")
        what = "channels-last (NHWC)"
    elif declared == (h, w) and c == 1:
        target = x.name + "/target_shape"
        graph.initializer.append(numpy_helper.from_array(np.array([-1, h, w], dtype=np.int64), target))
        front = helper.make_node("Reshape", [fed, target], [x.name], name=fed + "/drop_channel")
        what = f"{h}×{w} (no channel axis)"
    else:
        return
    graph.node.insert(0, front)
    new_input = helper.make_tensor_value_info(fed, x.type.tensor_type.elem_type, [_dim_value(x), c, h, w])
    graph.input.remove(x)
    graph.input.insert(0, new_input)
    notes.append(f"the model takes {what} input; glorocert puts its samples, of shape {data_shape}, into that form first")


def _dim_value(x: onnx.ValueInfoProto):
    batch = x.type.tensor_type.shape.dim[0]
    return batch.dim_value if batch.HasField("dim_value") else (batch.dim_param or "batch")
