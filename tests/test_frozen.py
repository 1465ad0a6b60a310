"""certify's fast path (certify/frozen.py): an ONNX file whose bound file vouches for it runs without the IR.

What could go wrong, and is tested here: the fast path runs when it should not (another file, output,
normalisation, runner or a rewritten graph: the full path must check those), it gives other certificates
than the full path (other logits or another rounding budget), or it still imports torch or onnx.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import chain_model_with_bound, make_model, run_main, save_as

from glorocert.api import Bound, compute_bound, default_path, frozen_model, load
from glorocert.data import open_dataset
from glorocert.files import write_json
from glorocert.lipschitz.boundfile import _checksum
from glorocert.normalization import Normalization


@pytest.fixture
def model(tmp_path) -> Path:
    return chain_model_with_bound(tmp_path)


@pytest.fixture
def digits(tmp_path) -> Path:
    batch = next(open_dataset("digits", limit=120).batches(1000))
    path = tmp_path / "digits.npz"
    np.savez(path, x=batch.x.astype(np.float32), y=batch.y.astype(np.int64))
    return path


def test_the_bound_file_records_what_loading_checked(model):
    bound = Bound.load(default_path(model))
    loaded = load(model)
    assert loaded.runs_file and bound.checked_runner == loaded.runner.description
    assert bound.equivalence_gap == loaded.equivalence_gap
    np.testing.assert_array_equal(np.asarray(bound.check_logits), loaded.check_logits)


def test_a_rewritten_graph_or_torchscript_records_no_runner(tmp_path):
    softmax = save_as(make_model("softmax"), "onnx", tmp_path, "softmax")  # its Softmax tail is stripped
    script = save_as(make_model("chain"), "torchscript", tmp_path, "script")
    for path in (softmax, script):
        loaded = load(path, input_shape=(1, 8, 8))
        assert not loaded.runs_file
        assert compute_bound(loaded).checked_runner == ""
        assert frozen_model(path, None, None) is None


def test_fast_path_model_matches_the_full_load(model):
    fast, full = frozen_model(model, None, None), load(model)
    assert fast is not None and fast.graph is None
    assert (fast.sha256, fast.input_shape, fast.num_classes, fast.format, fast.output) == \
           (full.sha256, full.input_shape, full.num_classes, full.format, full.output)
    assert fast.rounding_rtol == full.rounding_rtol  # the same budget: the same radii
    x = np.random.default_rng(0).random((7, *full.input_shape)).astype(np.float32)
    np.testing.assert_array_equal(fast.runner(x), full.runner(x))


def test_fast_and_full_certify_write_the_same_rows(monkeypatch, capsys, model, digits, tmp_path):
    args = ["certify", model, "--data", digits, "--eps", "0.05,0.1"]
    assert run_main(monkeypatch, capsys, *args, "--out", tmp_path / "fast.csv")[0] == 0
    # --verify-bound takes the full path (IR, equivalence check, recomputed bound), same certificates
    assert run_main(monkeypatch, capsys, *args, "--verify-bound", "--out", tmp_path / "full.csv")[0] == 0
    assert (tmp_path / "fast.csv").read_text() == (tmp_path / "full.csv").read_text()


def _rewritten(bound_path: Path, **fields) -> None:
    body = json.loads(bound_path.read_text())
    body.update(fields)
    body.pop("content_sha256")
    body["content_sha256"] = _checksum(body)
    write_json(bound_path, body)


@pytest.mark.parametrize("fields", [
    {"checked_runner": ""},                                   # checked on a rewritten graph or torch module
    {"check_logits": None},                                   # a bound file from before the fast path
    {"output": "hidden"},                                     # computed for another tensor
    {"model_format": "torchscript"},
])
def test_fast_path_is_declined_unless_the_bound_vouches_for_this_run(model, fields):
    _rewritten(default_path(model), **fields)
    assert frozen_model(model, None, None) is None


def test_a_runner_that_does_not_reproduce_the_recorded_ir_logits_is_declined(model):
    """The fast path re-measures the IR/native gap here; logits off by 1 % (another function) fail the check."""
    logits = np.asarray(Bound.load(default_path(model)).check_logits)
    _rewritten(default_path(model), check_logits=(logits * 1.01).tolist())
    assert frozen_model(model, None, None) is None
    _rewritten(default_path(model), check_logits=(logits + 1e-6).tolist())  # within rounding: accepted, gap larger
    fast = frozen_model(model, None, None)
    assert fast is not None and fast.equivalence_gap > load(model).equivalence_gap


def test_fast_path_is_declined_for_other_options(model):
    assert frozen_model(model, None, None) is not None
    assert frozen_model(model, None, None, device="cuda") is None
    assert frozen_model(model, None, None, output="logits") is None
    assert frozen_model(model, None, None, input_shape=(3, 8, 8)) is None
    assert frozen_model(model, None, Normalization.of(0.5, 0.25)) is None  # the bound has none folded in


def test_an_edited_model_file_takes_the_full_path_which_refuses_the_bound(monkeypatch, capsys, model, digits):
    model.write_bytes(save_as(make_model("chain", seed=1), "onnx", model.parent, "other").read_bytes())
    assert frozen_model(model, None, None) is None
    code, _, err = run_main(monkeypatch, capsys, "certify", model, "--data", digits)
    assert code == 2 and "belongs to another model file" in err


def test_a_corrupt_bound_file_takes_the_full_path_which_says_why(monkeypatch, capsys, model, digits):
    default_path(model).write_text(default_path(model).read_text().replace('"global_upper": ', '"global_upper": 1'))
    assert frozen_model(model, None, None) is None
    code, _, err = run_main(monkeypatch, capsys, "certify", model, "--data", digits)
    assert code == 2 and "checksum mismatch" in err


def test_certify_on_the_fast_path_imports_neither_torch_nor_onnx_nor_ray_nor_pydantic(model, digits, tmp_path):
    script = ("import sys; from glorocert.launch import run; code = run(); "
              "print('IMPORTED', sorted(m for m in ('torch', 'onnx', 'ray', 'pyarrow', 'pydantic') if m in sys.modules), code)")
    out = subprocess.run([sys.executable, "-c", script, "certify", str(model), "--data", str(digits), "--out",
                          str(tmp_path / "rows.csv")], capture_output=True, text=True, timeout=120, check=False)
    assert "IMPORTED [] 0" in out.stdout, out.stdout + out.stderr
    # and without the bound file the same command loads through the IR (torch and onnx)
    default_path(model).unlink()
    out = subprocess.run([sys.executable, "-c", script, "certify", str(model), "--data", str(digits)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert "IMPORTED ['onnx', 'torch'] 0" in out.stdout, out.stdout + out.stderr
