"""`glorocert export --gloro`: onnxruntime's argmax on the exported model equals certify's verdicts."""

from __future__ import annotations

import subprocess
import sys

import onnxruntime as ort

from glorocert.api import certify, compute_bound, load, open_dataset


def test_exported_bottom_logit_agrees_with_certify(trained_digits_model, tmp_path):
    _, onnx_path, _ = trained_digits_model
    model = load(onnx_path)
    bound = compute_bound(model)
    bound_file = tmp_path / "b.json"
    bound.save(bound_file)
    out = tmp_path / "gloro.onnx"
    eps = 0.05
    done = subprocess.run([sys.executable, "-m", "glorocert.cli", "export", str(onnx_path), str(out), "--eps", str(eps),
                           "--bound", str(bound_file)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = certify(model, open_dataset("digits"), [eps], bound=bound).rows
    x = next(open_dataset("digits").batches(10_000)).x
    session = ort.InferenceSession(str(out))
    outputs = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert outputs.shape[1] == model.num_classes + 1
    bottom = outputs.argmax(1) == model.num_classes
    assert (bottom == rows[f"bottom@{eps:g}"]).all()
    assert (outputs.argmax(1)[~bottom] == rows["predicted"][~bottom]).all()


def test_export_refuses_non_onnx_paths(tmp_path):
    """Refused for its suffix, before the (absent) model is opened: a missing file would be another refusal."""
    for model, out in (("model.pt", "x.onnx"), ("model.onnx", "x.pt")):
        done = subprocess.run([sys.executable, "-m", "glorocert.cli", "export", model, str(tmp_path / out)], capture_output=True, text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and "reads and writes .onnx files" in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []
