"""Tests that FAIL against the current package: each one pins down a bug found while writing the suite.

They are deliberately not marked skip/xfail. Once a bug is fixed, move its test next to its
siblings (test_loaders.py, test_bounds.py, test_cli.py) and delete it here.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import SHAPE, make_model, save_as
from glorocert.api import certify, compute_bound
from glorocert.graph import Affine, Conv2d, Graph, Node, Reshape
from glorocert.lipschitz import operators
from glorocert.lipschitz.compose import compose
from glorocert.loaders import load
from test_bounds import NAMED_CONVS, explicit_conv, explicit_matrix, exact_norm
from test_cli import run_main, workspace  # noqa: F401  (workspace is a fixture)
from test_loaders import assert_ir_matches_native


# --------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("kind", ["mlp", "concat", "minmax_halves", "ends_with_relu"])
def test_torchscript_model_runs_after_loading(tmp_path, kind):
    """glorocert/loaders/runners.py, TorchRunner.torch: ``torch.inference_mode()`` makes these TorchScript
    modules fail ("Inference tensors cannot be saved for backward") once torch_to_onnx has exported them,
    so load() refuses them with "the model does not run on inputs of shape (1, 8, 8)".
    Fix: run under ``torch.no_grad()`` (and/or ``module.requires_grad_(False)`` in TorchRunner.__init__)."""
    module = make_model(kind)
    model = load(save_as(module, "torchscript", tmp_path, kind), input_shape=SHAPE)
    assert_ir_matches_native(model, module)


@pytest.mark.parametrize("kind", ["chain", "mlp", "batchnorm_pooling", "minmax_halves", "concat"])
def test_torch_export_archive_loads_and_matches_native(tmp_path, kind):
    """glorocert/loaders/__init__.py, torch_to_onnx / _load_torch for .pt2: the program is re-exported with
    a batch-1 example, so the ONNX Reshape/Flatten gets a static [1, F] target and the converter (which
    traces with TRACE_BATCH=2) fails ("cannot reshape"); a program exported with the default static batch
    (here 2) also fails its guard at batch 1. Every .pt2 is refused. Fix: export the ExportedProgram itself
    (torch.onnx.export(program, ..., dynamo=True)) with its own example batch size, mark the batch dynamic
    when the program allows it, and for a static batch N run the native module in chunks of N (padding the
    last). The dynamo exporter also writes GlobalAvgPool as ReduceMean(axes=[2,3]), which onnx_loader.py
    does not accept: map ReduceMean over the spatial axes to GlobalAvgPool (+ Reshape when keepdims=0)."""
    module = make_model(kind)
    model = load(save_as(module, "torch.export", tmp_path, kind))
    assert model.format == "torch.export"
    assert_ir_matches_native(model, module)


def test_torch_export_archive_with_a_dynamic_batch_loads(tmp_path):
    module = make_model("chain")
    path = tmp_path / "dynamic.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (torch.zeros(2, *SHAPE),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    assert_ir_matches_native(load(path), module)


def test_torch_export_torchscript_and_onnx_give_the_same_bound(tmp_path):
    module = make_model("batchnorm_pooling", seed=5)
    bounds = [compute_bound(load(save_as(module, fmt, tmp_path), input_shape=SHAPE)) for fmt in ("onnx", "torchscript", "torch.export")]
    for other in bounds[1:]:
        assert other.global_upper == pytest.approx(bounds[0].global_upper, rel=1e-6)


def test_onnx_exported_with_a_fixed_batch_of_one_loads_and_certifies(tmp_path):
    """glorocert/loaders/__init__.py check_equivalence + runners.OrtRunner: an ONNX file whose batch
    dimension is fixed (torch.onnx.export without dynamic_axes, the default; most model-zoo files) is
    refused with the misleading "the model does not run on inputs of shape (1, 8, 8)" because the check
    feeds a batch of 16. Fix: when the declared batch dim is an integer N, run ORT in chunks of N (pad the
    last chunk) in OrtRunner, and let the converter treat a leading N in Reshape targets as the batch."""
    module = make_model("chain")
    path = tmp_path / "fixed_batch.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, *SHAPE),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
    model = load(path)
    assert_ir_matches_native(model, module)
    assert len(certify(model, "digits", [0.05], bound=compute_bound(model)).rows["radius"]) == 359


# --------------------------------------------------------------------------- bounds


def test_power_iteration_is_within_1e_4_when_it_reports_convergence():
    """glorocert/lipschitz/operators.py power_iteration (and power_iteration_gram): the stopping rule
    "relative change of ‖Ax‖ between two iterates < tol" (tol 1e-7) fires on a plateau. On this conv
    (σ₂/σ₁ = 0.9991) it stops after 75 iterations at 6.6474 with converged=True while σ_max = 6.6531
    (−8.6e-4; issue 2 asks for 1e-4). Fix: stop on the residual ‖AᵀAx − λx‖ ≤ tol·λ rather than on the
    change of λ (or use torch.lobpcg / a Lanczos step), and when the exact Gram matrix is at hand report
    its top eigenvalue's lower-rounded value as the estimate."""
    conv, in_shape = NAMED_CONVS["asymmetric_padding"]
    exact = exact_norm(explicit_conv(conv, in_shape))
    estimate = operators.power_iteration(conv.homogeneous, in_shape)
    assert estimate.converged
    assert estimate.value == pytest.approx(exact, rel=1e-4)


def test_per_width_scale_after_a_conv_is_not_taken_for_a_per_channel_scale():
    """glorocert/lipschitz/compose.py _channel_scale: a scale of shape (W,) after a conv with W output
    channels broadcasts along the WIDTH axis, but ``s.numel() == channels and s.shape[0] == channels``
    accepts it as per-channel and folds it into the conv weight. On operators too large to materialise
    the bound is then too small (10 here, true norm 20); bound_segment's power-iteration cross-check turns
    this into an AssertionError traceback. Fix: require s.shape == (channels,) + (1,)*spatial_dims (or a
    single element) before folding; otherwise bound the Affine on its own."""
    conv = Conv2d(torch.ones(4, 1, 1, 1, dtype=torch.float64))  # copies the input into 4 channels
    width_scale = Affine(torch.tensor([10.0, 0.0, 0.0, 0.0], dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    graph = Graph("x", (1, 4, 4), [Node("c", conv, ("x",)), Node("a", width_scale, ("c",)), Node("f", Reshape((-1,)), ("a",))], "f")
    exact = exact_norm(explicit_matrix(lambda x: graph.forward(x), (1, 4, 4)))
    assert exact == pytest.approx(20.0)
    assert compose(graph, exact_side=0).global_upper >= exact


def test_affine_bound_accounts_for_a_scale_that_broadcasts_to_more_elements():
    """glorocert/lipschitz/operators.py upper_bound(Affine): max|scale| is the norm only when the scale does
    not enlarge the tensor; x of shape (1,) times a scale of shape (10,) has norm √10·max|scale|.
    Fix: multiply by √(numel(output)/numel(input)) (or refuse broadcasts that enlarge the tensor)."""
    affine = Affine(torch.ones(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64))
    upper, _ = operators.upper_bound(affine, (1,))
    assert upper >= np.sqrt(10)


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("args", [
    ["certify", "--no-such-option"],
    ["certify"],
    ["certify", "model.onnx", "--batch-size", "many"],
], ids=["unknown_option", "missing_model_argument", "non_integer_option"])
def test_usage_errors_exit_2_without_a_traceback(monkeypatch, capsys, args):
    """glorocert/cli.py main(): typer 0.29 vendors click as ``typer._click``; its UsageError/NoSuchOption/
    MissingParameter are not ``click.ClickException``, so ``except Exception`` re-raises them: a Python
    traceback and exit code 1 for a mistyped option. Fix: also catch ``typer._click.exceptions.ClickException``
    (or any exception with ``show`` and ``exit_code``): ``e.show(); sys.exit(e.exit_code)``."""
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2
    assert "Traceback" not in out + err


def test_bad_plot_extension_is_refused_before_anything_is_written(monkeypatch, capsys, workspace, tmp_path):  # noqa: F811
    """glorocert/cli.py certify: --out and --summary are written before --plot's extension is checked, so
    ``--plot curve.txt`` exits 2 but leaves rows.csv and summary.json behind (and wastes the whole run).
    Fix: validate every output path's extension (results.ROW_FORMATS / PLOT_FORMATS) before loading."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run_main(
        monkeypatch, capsys, "certify", workspace["onnx"], "--data", workspace["data"] / "digits.npz", "--eps", "0.05",
        "--out", out_dir / "rows.csv", "--summary", out_dir / "summary.json", "--plot", out_dir / "curve.txt",
    )
    assert code == 2 and ".txt" in err
    assert list(out_dir.iterdir()) == []


def test_interrupted_run_says_so_on_stderr(monkeypatch, capsys, workspace, tmp_path):  # noqa: F811
    """glorocert/cli.py main(): typer turns KeyboardInterrupt into Exit(130) inside app(), so main()'s
    ``except KeyboardInterrupt`` (which prints "interrupted; no partial output was written") never runs and
    the user sees nothing. Fix: ``if code == 130: err.print("interrupted; no partial output was written")``."""
    import glorocert.results

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(glorocert.results, "write_json", interrupted)
    code, _, err = run_main(
        monkeypatch, capsys, "certify", workspace["onnx"], "--data", workspace["data"] / "digits.npz", "--eps", "0.05",
        "--summary", tmp_path / "summary.json",
    )
    assert code == 130
    assert "interrupted" in err
