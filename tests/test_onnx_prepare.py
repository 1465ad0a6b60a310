"""ONNX files as other exporters write them: out-of-order nodes, gzip, external data, several outputs, Softmax tails,
in-graph weight computations, channels-last inputs. Each loads without hand editing and computes what onnxruntime
computes on the original file; rewrites that would change the decision are refused."""

from __future__ import annotations

import gzip
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from glorocert.errors import GlorocertError, UnsupportedOperator
from glorocert.lipschitz.compose import compose
from glorocert.lipschitz.freeze import compute_bound
from glorocert.loaders import load
from helpers import run_main

CLASSES = 10


def _weights(seed: int = 0):
    gen = np.random.default_rng(seed)
    return {
        "conv_w": (gen.standard_normal((4, 1, 3, 3)) * 0.3).astype(np.float32),
        "conv_b": (gen.standard_normal(4) * 0.1).astype(np.float32),
        "dense_w": (gen.standard_normal((4 * 26 * 26, CLASSES)) * 0.05).astype(np.float32),
        "dense_b": (gen.standard_normal(CLASSES) * 0.1).astype(np.float32),
    }


def keras_like(opset: int = 13, *, nhwc: bool = True, tail: str | None = "Softmax", shuffle: bool = False,
               extra_output: bool = False) -> onnx.ModelProto:
    """A tf2onnx/keras2onnx-shaped MNIST classifier: NHWC input, Transpose, Conv, Relu, Flatten, MatMul, Add, Softmax."""
    w = _weights()
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw") if nhwc else
        helper.make_node("Identity", ["input"], ["nchw"], name="same"),
        helper.make_node("Conv", ["nchw", "conv_w", "conv_b"], ["conv"], name="conv2d"),
        helper.make_node("Relu", ["conv"], ["act"], name="relu"),
        helper.make_node("Flatten", ["act"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "dense_w"], ["mm"], name="dense/MatMul"),
        helper.make_node("Add", ["mm", "dense_b"], ["logits"], name="dense/BiasAdd"),
    ]
    output = "logits"
    if tail:
        nodes.append(helper.make_node(tail, ["logits"], ["probs"], name="dense/" + tail, **({"axis": -1} if opset >= 13 else {})))
        output = "probs"
    if shuffle:
        nodes = nodes[::-1]
    shape = ["N", 28, 28, 1] if nhwc else ["N", 1, 28, 28]
    outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", CLASSES])]
    if extra_output:
        nodes.append(helper.make_node("ArgMax", [output], ["label"], axis=1, keepdims=0, name="argmax"))
        outputs.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
    graph = helper.make_graph(nodes, "keras", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)], outputs,
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tf2onnx")


def ort_run(model: onnx.ModelProto, x: np.ndarray, output: int = 0) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[output]


def nchw_samples(n: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def reference_logits(opset: int = 13) -> np.ndarray:
    """The original file's logits (its output before the Softmax), on NHWC samples, from onnxruntime."""
    plain = keras_like(opset, tail=None)
    return ort_run(plain, nchw_samples().transpose(0, 2, 3, 1).copy())


@pytest.mark.parametrize("opset", [9, 11, 13, 17])
@pytest.mark.parametrize("tail", ["Softmax", "LogSoftmax"])
def test_a_keras_export_loads_channels_first_and_certifies_its_logits(tmp_path, opset, tail):
    path = tmp_path / "keras.onnx"
    onnx.save(keras_like(opset, tail=tail), path)
    model = load(path)
    assert model.input_shape == (1, 28, 28) and model.output == "logits"
    assert any("NHWC" in n for n in model.notes) and any(tail in n for n in model.notes)
    x = nchw_samples()
    expected = reference_logits(opset)
    assert np.allclose(model.runner(x), expected, atol=1e-5)
    assert np.allclose(model.graph.forward(torch.from_numpy(x).double()).numpy(), expected, atol=1e-4)
    # the decision is the original file's: argmax of its probabilities on the same images
    probs = ort_run(keras_like(opset, tail=tail), x.transpose(0, 2, 3, 1).copy())
    assert (probs.argmax(1) == expected.argmax(1)).all()


def test_nodes_out_of_order_are_sorted_and_a_gzipped_file_loads(tmp_path):
    shuffled = keras_like(shuffle=True)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(shuffled)  # as keras2onnx writes it: the checker refuses it, onnxruntime runs it
    path = tmp_path / "model.onnx.gz"
    path.write_bytes(gzip.compress(shuffled.SerializeToString()))
    model = load(path)
    assert np.allclose(model.runner(nchw_samples()), reference_logits(), atol=1e-5)


def test_a_gzipped_file_certifies_from_the_cli(tmp_path, monkeypatch, capsys):
    path = tmp_path / "model.onnx.gz"
    path.write_bytes(gzip.compress(keras_like().SerializeToString()))
    code, out, err = run_main(monkeypatch, capsys, "certify", str(path), "--data", "mnist-5k", "--limit", "20",
                              "--summary", str(tmp_path / "s.json"))
    assert code == 0, err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["certified_output"] == "logits" and summary["num_samples"] == 20
    bound = json.loads((tmp_path / "model.onnx.gz.bound.json").read_text())
    assert bound["output"] == "logits"


def test_a_damaged_gzip_file_is_one_clear_line(tmp_path):
    path = tmp_path / "model.onnx.gz"
    path.write_bytes(gzip.compress(keras_like().SerializeToString())[:200])
    with pytest.raises(GlorocertError, match="gzip") as caught:
        load(path)
    assert "\n" not in str(caught.value)


def test_external_data_loads_and_a_missing_file_is_named(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(keras_like(tail=None), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    assert np.allclose(load(path).runner(nchw_samples()), reference_logits(), atol=1e-5)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(GlorocertError, match="weights.bin") as caught:
        load(path)
    assert "\n" not in str(caught.value)


def test_several_outputs_need_output_and_the_choice_is_kept_in_the_bound(tmp_path):
    path = tmp_path / "two.onnx"
    onnx.save(keras_like(tail=None, extra_output=True), path)
    with pytest.raises(GlorocertError, match="--output") as caught:
        load(path)
    assert "'logits'" in str(caught.value) and "'label'" in str(caught.value)
    with pytest.raises(GlorocertError, match="no such tensor"):
        load(path, output="nonexistent")
    model = load(path, output="logits")
    assert model.output == "logits" and np.allclose(model.runner(nchw_samples()), reference_logits(), atol=1e-5)
    bound = compute_bound(model)
    assert bound.output == "logits"
    other = load(path, output="mm")  # the logits without their bias: another function of the same file
    with pytest.raises(GlorocertError, match="output"):
        bound.check_matches(other.sha256, other.input_shape, None, output=other.output)


def test_softmax_inside_the_network_stays_refused(tmp_path):
    model = keras_like(tail=None)
    graph = model.graph
    graph.node.insert(3, helper.make_node("Softmax", ["act"], ["soft"], axis=1, name="attention_like"))
    graph.node[4].input[0] = "soft"
    path = tmp_path / "inner.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedOperator) as caught:
        load(path)
    assert caught.value.op == "Softmax" and "attention_like" in str(caught.value)


def test_weights_computed_inside_the_graph_are_folded(tmp_path):
    """A spectral-normalised dense layer as parametrisation libraries export it: W / ‖W‖ computed in the graph."""
    w = _weights()["dense_w"]
    model = keras_like(tail=None, nhwc=False)
    graph = model.graph
    raw = [t for t in graph.initializer if t.name == "dense_w"][0]
    raw.name = "raw_w"
    graph.node.extend([
        helper.make_node("Mul", ["raw_w", "raw_w"], ["sq"], name="sn/square"),
        helper.make_node("ReduceSum", ["sq"], ["ss"], keepdims=1, name="sn/sum"),
        helper.make_node("Sqrt", ["ss"], ["norm"], name="sn/sqrt"),
        helper.make_node("Div", ["raw_w", "norm"], ["dense_w"], name="sn/divide"),
    ])
    onnx.save(model, tmp_path / "param.onnx")
    loaded = load(tmp_path / "param.onnx")
    assert any("folded" in n and "Sqrt" in n for n in loaded.notes)
    x = nchw_samples()
    assert np.allclose(loaded.runner(x), ort_run(model, x), atol=1e-5)
    # the folded dense layer has Frobenius norm 1, so its spectral norm is at most 1
    dense = [b for b in compose(loaded.graph).blocks if "Linear" in b.op]
    assert dense and dense[-1].upper <= 1.0 + 1e-5
    assert np.linalg.norm(w / np.linalg.norm(w), 2) <= 1.0


def test_a_model_that_draws_random_numbers_is_refused(tmp_path):
    model = keras_like(tail=None, nhwc=False)
    model.graph.node.append(helper.make_node("RandomNormal", [], ["noise"], shape=[1, CLASSES], name="noise"))
    model.graph.node[-2].output[0] = "pre"
    model.graph.node.append(helper.make_node("Add", ["pre", "noise"], ["logits"], name="noisy"))
    onnx.save(model, tmp_path / "random.onnx")
    with pytest.raises(GlorocertError, match="random"):
        load(tmp_path / "random.onnx")


@pytest.mark.parametrize("declared", [(28, 28, 1), (28, 28)])
def test_a_channels_last_model_without_transpose_takes_channels_first_data(tmp_path, monkeypatch, capsys, declared):
    """A Keras MLP declares 28×28×1 (or 28×28) and flattens it: bound, then certify on mnist-5k, with no flag."""
    gen = np.random.default_rng(1)
    w = numpy_helper.from_array((gen.standard_normal((784, CLASSES)) * 0.05).astype(np.float32), "w")
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *declared])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], [w])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "mlp.onnx"
    onnx.save(original, path)
    model = load(path)
    assert model.input_shape == (1, 28, 28) and any("puts its samples" in n for n in model.notes)
    assert load(path, input_shape=declared).input_shape == declared  # asked for as declared: left as it is
    x = nchw_samples()
    as_declared = x.transpose(0, 2, 3, 1).reshape(len(x), *declared).copy()
    assert np.allclose(model.runner(x), ort_run(original, as_declared), atol=1e-5)
    code, out, err = run_main(monkeypatch, capsys, "bound", str(path))
    assert code == 0, err
    code, out, err = run_main(monkeypatch, capsys, "certify", str(path), "--data", "mnist-5k", "--limit", "10")
    assert code == 0, err  # the cached bound is for the same (channels-first) model


def test_a_model_with_weights_listed_as_inputs_loads_after_folding(tmp_path):
    """Files of IR version ≤ 3 (CNTK, old exporters) list every weight as a graph input as well."""
    model = keras_like(tail=None, nhwc=False)
    raw = [t for t in model.graph.initializer if t.name == "dense_b"][0]
    raw.name = "half_b"
    model.graph.node.append(helper.make_node("Add", ["half_b", "half_b"], ["dense_b"], name="folded_bias"))
    for tensor in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    model.ir_version = 3
    model.opset_import[0].version = 8
    onnx.save(model, tmp_path / "old.onnx")
    loaded = load(tmp_path / "old.onnx")
    assert loaded.input_shape == (1, 28, 28)
    x = nchw_samples()
    assert np.allclose(loaded.runner(x), ort_run(model, x), atol=1e-5)


def test_torchscript_takes_its_input_shape_from_the_data(tmp_path, monkeypatch, capsys):
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, CLASSES)).eval()
    path = tmp_path / "model.ts.pt"
    torch.jit.save(torch.jit.trace(module, torch.zeros(1, 1, 28, 28)), str(path))
    code, out, err = run_main(monkeypatch, capsys, "certify", str(path), "--data", "mnist-5k", "--limit", "10")
    assert code == 0, err
    code, out, err = run_main(monkeypatch, capsys, "bound", str(path))
    assert code == 2 and "--input-shape" in err


def test_an_invalid_model_is_refused_in_one_complete_line(tmp_path):
    model = keras_like(tail=None, nhwc=False)
    model.graph.node[1].input[1] = "missing_weight"
    onnx.save(model, tmp_path / "broken.onnx")
    with pytest.raises(GlorocertError, match="missing_weight") as caught:
        load(tmp_path / "broken.onnx")
    assert "\n" not in str(caught.value)


def test_control_flow_is_refused_naming_the_node(tmp_path):
    branch = helper.make_graph([helper.make_node("Identity", ["x_const"], ["b"])], "branch", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])],
                               [numpy_helper.from_array(np.ones(1, np.float32), "x_const")])
    model = keras_like(tail=None, nhwc=False)
    model.graph.node.extend([
        helper.make_node("Constant", [], ["flag"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node("If", ["flag"], ["offset"], then_branch=branch, else_branch=branch, name="branching"),
    ])
    model.graph.node[5].output[0] = "pre"
    model.graph.node.append(helper.make_node("Add", ["pre", "offset"], ["logits"], name="shifted"))
    onnx.save(model, tmp_path / "if.onnx")
    with pytest.raises(UnsupportedOperator) as caught:
        load(tmp_path / "if.onnx")
    assert caught.value.op == "If" and "branching" in str(caught.value)
