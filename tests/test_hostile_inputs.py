"""What a careless or hostile user tries (issue 15): every parameter refused up front with one clear line, no
stray log or warning, and the messages and documents name what the tool really does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from glorocert import cli
from glorocert.errors import GlorocertError
from glorocert.loaders import parse_shape
from helpers import SHAPE, make_model, run_main, save_export

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    return lines[0]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if a command loads a model: parameter errors must come before any work."""
    loaded = []
    monkeypatch.setattr(cli.api, "load", lambda path, **kwargs: loaded.append(path) or pytest.fail(f"loaded {path}"))
    return loaded


# --------------------------------------------------------------------------- compare-rs and audit parameters


@pytest.mark.parametrize("option, value, word", [
    ("--skip", "0", "--skip"), ("--skip", "-3", "--skip"), ("--sigma", "0", "--sigma"), ("--sigma", "nan", "--sigma"),
    ("--sigma", "-1", "--sigma"), ("--n0", "0", "n0"), ("--n", "0", "n"), ("--alpha", "2", "alpha"),
    ("--alpha", "0", "alpha"), ("--batch-size", "0", "--batch-size"),
])
def test_compare_rs_refuses_a_bad_parameter_before_loading_anything(monkeypatch, capsys, workspace, out_dir,
                                                                     no_model_loading, option, value, word):
    code, out, err = run_main(monkeypatch, capsys, "compare-rs", workspace["onnx"], "--data", workspace["data"] / "digits.npz",
                              "--n", "1000", "--out", out_dir / "rs", option, value)
    assert code == 2, (out, err)
    assert word in _one_error_line(err)
    assert "Traceback" not in out + err and "GloRo certify" not in out + err
    assert no_model_loading == [] and list(out_dir.iterdir()) == []


@pytest.mark.parametrize("option, value", [("--steps", "0"), ("--steps", "-5"), ("--restarts", "-1")])
def test_audit_refuses_no_attack_steps_or_negative_restarts_before_loading_anything(monkeypatch, capsys, workspace,
                                                                                    no_model_loading, option, value):
    code, out, err = run_main(monkeypatch, capsys, "audit", workspace["onnx"], "--data", workspace["data"] / "digits.npz",
                              option, value)
    assert code == 2, (out, err)
    assert option in _one_error_line(err)
    assert "violations" not in out + err and no_model_loading == []


# --------------------------------------------------------------------------- option values


@pytest.mark.parametrize("option, example, wrong", [
    ("--eps", "e.g. 0.3 or 0.1,0.3", "0.485"),
    ("--mean", "0.485,0.456,0.406", None),
    ("--std", "0.229,0.224,0.225", None),
])
def test_a_non_number_gets_an_example_that_fits_its_option(monkeypatch, capsys, workspace, option, example, wrong):
    code, out, err = run_main(monkeypatch, capsys, "certify", workspace["onnx"], "--data", workspace["data"] / "digits.npz",
                              option, "abc")
    line = _one_error_line(err)
    assert code == 2 and option in line and example in line, line
    assert wrong is None or wrong not in line
    if option != "--eps":
        assert "per-channel" in line


@pytest.mark.parametrize("text, shape", [("1,28,28", (1, 28, 28)), ("1x28x28", (1, 28, 28)), (" 3, 32, 32 ", (3, 32, 32)),
                                         ("784", (784,))])
def test_input_shape_is_commas_or_x_between_positive_integers(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["1,x,28", "1,,28", "1,28,28,", "1x28,28", "x28x28", "1 28 28", "1.0,28,28", "1,0,28",
                                  "1,-28,28", "", "one,8,8", "1xx28"])
def test_input_shape_with_anything_else_is_refused_naming_the_accepted_forms(text):
    with pytest.raises(GlorocertError, match=r"--input-shape .*1,28,28 or 1x28x28"):
        parse_shape(text)


@pytest.mark.parametrize("value", ["2", "1.01", "-0.1", "nan"])
def test_fail_under_is_a_fraction_between_0_and_1(monkeypatch, capsys, workspace, out_dir, no_model_loading, value):
    code, out, err = run_main(monkeypatch, capsys, "certify", workspace["onnx"], "--data", workspace["data"] / "digits.npz",
                              "--fail-under", value, "--out", out_dir / "rows.csv")
    assert code == 2, (out, err)
    line = _one_error_line(err)
    assert "--fail-under" in line and "[0, 1]" in line
    assert list(out_dir.iterdir()) == []


# --------------------------------------------------------------------------- stray output


def test_a_corrupt_torch_export_archive_is_one_line_without_torch_log(tmp_path):
    good = save_export(make_model("chain"), tmp_path / "good.pt2")
    data = good.read_bytes()
    for name, damaged in {"truncated": data[: len(data) // 2], "garbage": b"not a zip at all" * 64}.items():
        path = tmp_path / f"{name}.pt2"
        path.write_bytes(damaged)
        done = subprocess.run([sys.executable, "-m", "glorocert.cli", "bound", str(path), "--out", str(tmp_path / "b.json")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        line = _one_error_line(done.stderr)
        assert str(path.name) in line and "torch.export" in line
        assert done.stdout.strip() == ""


def test_pixels_too_large_for_float32_are_one_clear_line_without_a_numpy_warning(workspace, tmp_path):
    huge = tmp_path / "huge.npy"
    np.save(huge, np.full((4, *SHAPE), 1e300))
    done = subprocess.run([sys.executable, "-W", "default", "-m", "glorocert.cli", "certify", str(workspace["onnx"]),
                           "--data", str(huge)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Warning" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("note:")]  # the scaling note
    _one_error_line("\n".join(lines))


# --------------------------------------------------------------------------- documents name the real files


def test_no_document_or_help_names_model_bound_json_where_model_onnx_bound_json_is_written():
    sources = [ROOT / "README.md", *sorted((ROOT / "glorocert").rglob("*.py")), *sorted((ROOT / "models").rglob("*.md"))]
    found = [f"{path.relative_to(ROOT)}:{n}" for path in sources
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if re.search(r"\bmodel\.bound\.json", line)]
    assert found == []
    help_text = CliRunner().invoke(cli.app, ["train", "--help"], env={"COLUMNS": "300"}).output
    assert "model.onnx.bound.json" in help_text and "model.bound.json" not in help_text.replace("model.onnx.bound.json", "")

