"""Loaders: the IR computes the native model's function, and everything else is refused clearly."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from glorocert import graph as ir
from glorocert.errors import GlorocertError, UnsupportedOperator
from glorocert.loaders import load
from glorocert.zoo import build, save_checkpoint
from helpers import SHAPE, SUPPORTED_KINDS, make_model, save_as, save_pickle


def random_inputs(n=12, seed=0) -> torch.Tensor:
    """Inside [0,1] and well outside it: the IR must agree everywhere, not just on images."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.rand(n // 2, *SHAPE, generator=gen), 3 * torch.randn(n - n // 2, *SHAPE, generator=gen)])


def assert_ir_matches_native(model, module):
    x = random_inputs()
    with torch.no_grad():
        expected = copy.deepcopy(module).double()(x.double())
        ir_out = model.graph.forward(x.double())
        native = model.runner(x.numpy())
    scale = 1.0 + expected.abs().max().item()
    assert ir_out.shape == expected.shape
    # float64 both sides; the exporter may fold BatchNorm into the conv in float32, hence 1e-6 and not 1e-12
    assert (ir_out - expected).abs().max().item() <= 1e-6 * scale
    assert np.abs(native - expected.numpy()).max() <= 1e-5 * scale  # the float32 runtime


@pytest.mark.parametrize("kind", SUPPORTED_KINDS)
def test_ir_forward_equals_native_forward_for_onnx(tmp_path, kind):
    module = make_model(kind)
    path = save_as(module, "onnx", tmp_path, kind)
    model = load(path)
    assert model.format == "onnx" and model.input_shape == SHAPE
    assert_ir_matches_native(model, module)


@pytest.mark.parametrize("kind", SUPPORTED_KINDS)
def test_ir_forward_equals_native_forward_for_torchscript(tmp_path, kind):
    """Also a regression test: TorchScript modules once failed to run under torch.inference_mode after export."""
    module = make_model(kind)
    model = load(save_as(module, "torchscript", tmp_path, kind), input_shape=SHAPE)
    assert model.format == "torchscript"
    assert_ir_matches_native(model, module)


@pytest.mark.parametrize("kind", ["chain", "concat"])
def test_ir_forward_equals_native_forward_for_torch_export_with_its_static_batch(tmp_path, kind):
    """The default torch.export (batch fixed at 2 here) must load; concat ends in a global average pool,
    which the dynamo ONNX exporter writes as ReduceMean."""
    module = make_model(kind)
    model = load(save_as(module, "torch.export", tmp_path, kind))
    assert model.format == "torch.export"
    assert_ir_matches_native(model, module)


def test_ir_forward_equals_native_forward_for_torch_export_with_a_dynamic_batch(tmp_path):
    module = make_model("mlp")
    path = tmp_path / "dynamic.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (torch.zeros(2, *SHAPE),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    assert_ir_matches_native(load(path), module)


def test_onnx_with_a_fixed_batch_of_one_loads_and_runs_any_batch(tmp_path):
    """torch.onnx.export without dynamic_axes (the default, and most model-zoo files) fixes the batch at 1."""
    module = make_model("batchnorm_pooling")
    path = tmp_path / "fixed_batch.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, *SHAPE),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
    assert_ir_matches_native(load(path), module)


@pytest.mark.parametrize("kind", ["chain", "batchnorm_pooling", "minmax_halves"])
def test_ir_forward_equals_native_forward_for_a_trusted_pickle(tmp_path, kind):
    module = make_model(kind)
    model = load(save_pickle(module, tmp_path / "model.pt"), input_shape=SHAPE, trust_pickle=True)
    assert model.format == "pickle"
    assert_ir_matches_native(model, module)


def test_ir_forward_equals_native_forward_for_a_glorocert_checkpoint(tmp_path):
    spec = {"arch": "2c2f", "activation": "minmax", "minmax_pairing": "adjacent", "input_shape": list(SHAPE), "num_classes": 10}
    torch.manual_seed(0)
    module = build(spec).eval()
    model = load(save_checkpoint(tmp_path / "model.safetensors", module, spec))
    assert model.format == "checkpoint"
    assert_ir_matches_native(model, module)


def test_torchscript_without_input_shape_is_refused_with_a_hint(tmp_path):
    path = save_as(make_model("chain"), "torchscript", tmp_path)
    with pytest.raises(GlorocertError, match="--input-shape"):
        load(path)


def test_missing_model_file_is_refused(tmp_path):
    with pytest.raises(GlorocertError, match="no such model file"):
        load(tmp_path / "absent.onnx")


# --------------------------------------------------------------------------- unsupported operators


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_product_of_two_tensors_is_refused_naming_the_operator_and_node(tmp_path, fmt):
    path = save_as(make_model("square"), fmt, tmp_path)
    with pytest.raises(UnsupportedOperator) as caught:
        load(path, input_shape=SHAPE)
    assert caught.value.op == "Mul"  # x·x has no global Lipschitz bound (GELU, SiLU… are recognised: test_onnx_ops.py)
    assert caught.value.node and caught.value.node in str(caught.value) and "Mul" in str(caught.value)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_final_softmax_is_recognised_and_the_logits_before_it_are_certified(tmp_path, fmt):
    module = make_model("softmax")
    model = load(save_as(module, fmt, tmp_path), input_shape=SHAPE)
    assert model.output and any("Softmax" in note for note in model.notes)
    x = torch.rand(32, *SHAPE)
    with torch.no_grad():
        logits = module[:-1](x).double()
    assert torch.allclose(model.graph.forward(x.double()), logits, atol=1e-5)  # the logits, not the probabilities
    assert np.allclose(model.runner(x.numpy()), logits.numpy(), atol=1e-5)  # the runner computes the same tensor
    assert (logits.argmax(1) == module(x).argmax(1)).all()


def test_onnx_operator_outside_the_ir_is_refused_naming_it_and_its_node(tmp_path):
    gen = np.random.default_rng(0)
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w", "b"], ["hidden"], name="dense", transB=1),
        helper.make_node("Sin", ["hidden"], ["logits"], name="my_sin"),
    ]
    graph = helper.make_graph(
        nodes, "sin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(gen.standard_normal((10, 64)).astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros(10, np.float32), "b")],
    )
    path = tmp_path / "sin.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(UnsupportedOperator) as caught:
        load(path)
    assert (caught.value.op, caught.value.node) == ("Sin", "my_sin")
    assert "Sin" in str(caught.value) and "my_sin" in str(caught.value)


# --------------------------------------------------------------------------- untrusted and broken files


def _legacy_pickle(module, path):
    """torch.save's format before PyTorch 1.6 (a plain pickle stream, not a zip archive)."""
    torch.save(module, path, _use_new_zipfile_serialization=False)
    return path


@pytest.mark.parametrize("save", [save_pickle, _legacy_pickle], ids=["zip", "legacy"])
def test_pickled_module_is_refused_without_trust_pickle(tmp_path, save):
    path = save(make_model("chain"), tmp_path / "model.pt")
    with pytest.raises(GlorocertError, match="--trust-pickle"):
        load(path, input_shape=SHAPE)


@pytest.mark.parametrize("save", [save_pickle, _legacy_pickle], ids=["zip", "legacy"])
def test_pickled_module_is_never_unpickled_without_trust_pickle(tmp_path, monkeypatch, save):
    path = save(make_model("chain"), tmp_path / "model.pt")
    unsafe = []
    real_load = torch.load

    def spy(*args, **kwargs):
        unsafe.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(GlorocertError):
        load(path, input_shape=SHAPE)
    assert all(flag is True for flag in unsafe)


def test_trusted_pickle_still_needs_an_input_shape(tmp_path):
    path = save_pickle(make_model("chain"), tmp_path / "model.pt")
    with pytest.raises(GlorocertError, match="--input-shape"):
        load(path, trust_pickle=True)


def test_state_dict_is_refused_as_weights_without_architecture(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(make_model("chain").state_dict(), str(path))
    with pytest.raises(GlorocertError, match="only weights") as caught:
        load(path, input_shape=SHAPE)
    assert "--trust-pickle" not in str(caught.value)


@pytest.fixture
def onnx_bytes(tmp_path):
    return save_as(make_model("chain"), "onnx", tmp_path).read_bytes()


@pytest.mark.parametrize("damage", ["first_half", "second_half", "random_bytes", "empty"])
def test_corrupt_or_truncated_onnx_is_a_clear_error(tmp_path, onnx_bytes, damage):
    data = {
        "first_half": onnx_bytes[: len(onnx_bytes) // 2],
        "second_half": onnx_bytes[len(onnx_bytes) // 2 :],
        "random_bytes": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty": b"",
    }[damage]
    path = tmp_path / "broken.onnx"
    path.write_bytes(data)
    with pytest.raises(GlorocertError):
        load(path)


def test_corrupt_torchscript_is_a_clear_error(tmp_path):
    data = save_as(make_model("chain"), "torchscript", tmp_path).read_bytes()
    path = tmp_path / "broken.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GlorocertError):
        load(path, input_shape=SHAPE)


@pytest.mark.parametrize("declared", [[None, 7], [None, 10, 1]])
def test_onnx_declaring_the_wrong_output_shape_is_refused(tmp_path, onnx_bytes, declared):
    model = onnx.load_from_string(onnx_bytes)
    output = model.graph.output[0]
    output.CopyFrom(helper.make_tensor_value_info(output.name, TensorProto.FLOAT, ["batch", *declared[1:]]))
    path = tmp_path / "lying.onnx"
    onnx.save(model, str(path))
    with pytest.raises(GlorocertError):
        load(path)


def test_input_shape_that_contradicts_the_onnx_declaration_is_refused(tmp_path, onnx_bytes):
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx_bytes)
    with pytest.raises(GlorocertError):
        load(path, input_shape=(1, 9, 9))


# --------------------------------------------------------------------------- MinMax conventions


@pytest.mark.parametrize("kind, axis, max_first", [("minmax_halves", 1, True), ("minmax_adjacent", 2, False)])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_minmax_is_recognised_in_both_pairing_conventions(tmp_path, kind, axis, max_first, fmt):
    module = make_model(kind)
    model = load(save_as(module, fmt, tmp_path, kind), input_shape=SHAPE)
    minmax = [n.op for n in model.graph.nodes if isinstance(n.op, ir.MinMax)]
    assert len(minmax) == 2
    assert all(op.max_first is max_first for op in minmax)
    if kind == "minmax_adjacent":  # pairs (2k, 2k+1): Reshape(-1, 2) → MinMax on the last axis → Reshape back
        assert all(op.axis == axis for op in minmax)
        assert all(model.graph.shapes[n.name][-1] == 2 for n in model.graph.nodes if isinstance(n.op, ir.MinMax))
    else:  # channel / feature halves
        assert all(op.axis == axis for op in minmax)
    assert not any(isinstance(n.op, ir.Activation) for n in model.graph.nodes)  # nothing replaced by an assumed constant
    assert_ir_matches_native(model, module)


# --------------------------------------------------------------------------- the equivalence check


def test_a_converter_bug_is_caught_by_the_equivalence_check(tmp_path, monkeypatch):
    path = save_as(make_model("chain"), "onnx", tmp_path)
    relu_forward, relu_constant = ir.ACTIVATIONS["relu"]
    monkeypatch.setitem(ir.ACTIVATIONS, "relu", (lambda x, a: torch.nn.functional.leaky_relu(x, 0.05), relu_constant))
    with pytest.raises(GlorocertError, match="differs"):
        load(path)


def test_a_wrong_minmax_pairing_is_caught_by_the_equivalence_check(tmp_path, monkeypatch):
    path = save_as(make_model("minmax_halves"), "onnx", tmp_path)

    def swapped(self, x):  # min first where the model has max first
        a, b = x.chunk(2, dim=self.axis)
        return torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=self.axis)

    monkeypatch.setattr(ir.MinMax, "forward", swapped)
    with pytest.raises(GlorocertError, match="differs"):
        load(path)


def test_a_dropped_bias_is_caught_by_the_equivalence_check(tmp_path, monkeypatch):
    path = save_as(make_model("mlp"), "onnx", tmp_path)
    monkeypatch.setattr(ir.Linear, "forward", lambda self, x: torch.nn.functional.linear(x, self.weight.to(x.dtype)))
    with pytest.raises(GlorocertError, match="differs"):
        load(path)
