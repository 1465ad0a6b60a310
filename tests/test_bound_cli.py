"""`glorocert bound`: the bound file next to the model, TorchScript input shapes, estimate mode labelled."""

from __future__ import annotations



from glorocert.api import default_path
from glorocert.lipschitz.boundfile import Bound
from helpers import SHAPE, make_model, run_main, save_as


# --------------------------------------------------------------------------- bound


def test_bound_on_onnx_writes_the_bound_file_next_to_the_model(monkeypatch, capsys, tmp_path):
    model = save_as(make_model("residual"), "onnx", tmp_path, "residual")
    code, out, err = run_main(monkeypatch, capsys, "bound", model)
    assert code == 0, err
    bound = Bound.load(default_path(model))
    assert default_path(model).name == "residual.onnx.bound.json"
    assert bound.mode == "sound" and bound.model_format == "onnx" and bound.input_shape == list(SHAPE)
    assert "guaranteed upper bound" in out


def test_bound_on_torchscript_needs_and_uses_input_shape(monkeypatch, capsys, tmp_path):
    model = save_as(make_model("chain"), "torchscript", tmp_path)
    code, _, err = run_main(monkeypatch, capsys, "bound", model)
    assert code == 2 and "--input-shape" in err and not default_path(model).exists()
    code, _, err = run_main(monkeypatch, capsys, "bound", model, "--input-shape", "1,8,8", "--out", tmp_path / "b.json")
    assert code == 0, err
    assert Bound.load(tmp_path / "b.json").model_format == "torchscript"


def test_bound_in_estimate_mode_says_it_is_not_a_certificate(monkeypatch, capsys, tmp_path):
    model = save_as(make_model("chain"), "onnx", tmp_path)
    code, out, _ = run_main(monkeypatch, capsys, "bound", model, "--mode", "estimate")
    assert code == 0 and "ESTIMATE" in out and Bound.load(default_path(model)).mode == "estimate"
