"""The `glorocert` command: outputs, exit codes, one-line errors, and no output left by a failed run.

Most runs go through ``glorocert.cli.main`` in-process (the console script's own entry point,
with its exit-code handling); one subprocess checks the installed script itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import glorocert.files
from glorocert import cli
from glorocert.api import Normalization, compute_bound, default_path, load, open_dataset
from glorocert.errors import GlorocertError
from glorocert.lipschitz.boundfile import Bound
from glorocert.loaders.runners import OrtRunner
from glorocert.results import read_rows
from glorocert.studies import compare_rs
from helpers import SHAPE, make_model, run_main, save_as, save_pickle


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A model directory (ONNX with its bound computed, TorchScript, broken and hostile models) and data files."""
    root = tmp_path_factory.mktemp("cli")
    models, data = root / "models", root / "data"
    models.mkdir()
    data.mkdir()
    module = make_model("chain")
    paths = {
        "onnx": save_as(module, "onnx", models, "chain"),
        "torchscript": save_as(module, "torchscript", models, "chain"),
        "other_onnx": save_as(make_model("chain", seed=1), "onnx", models, "other"),
        "gelu": save_as(make_model("gelu"), "onnx", models, "gelu"),
        "pickle": save_pickle(module, models / "pickled.pt"),
    }
    corrupt = models / "corrupt.onnx"
    corrupt.write_bytes(paths["onnx"].read_bytes()[:400])
    paths["corrupt"] = corrupt

    compute_bound(load(paths["onnx"])).save(default_path(paths["onnx"]))
    paths["other_bound"] = compute_bound(load(paths["other_onnx"])).save(models / "other.bound.json")

    batch = next(open_dataset("digits", limit=40).batches(1000))
    x, y = batch.x.astype(np.float32), batch.y.astype(np.int64)
    np.savez(data / "digits.npz", x=x, y=y)
    np.save(data / "x.npy", x)
    np.save(data / "y.npy", y)
    nan = x.copy()
    nan[7, 0, 3, 4] = np.nan
    np.save(data / "nan.npy", nan)
    np.save(data / "wrong_shape.npy", np.random.default_rng(0).random((10, 1, 9, 9), dtype=np.float32))
    bad_labels = y.copy()
    bad_labels[5] = 10
    np.save(data / "labels_out_of_range.npy", bad_labels)
    np.save(data / "empty.npy", np.zeros((0, *SHAPE), np.float32))
    (data / "garbage.npy").write_bytes(b"\x93NUMPY this is not really an array" + bytes(range(256)))
    return {**paths, "data": data, "root": root}


@pytest.fixture
def out_dir(tmp_path):
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


# --------------------------------------------------------------------------- help


def test_installed_script_help_mentions_an_example():
    result = subprocess.run(["glorocert", "--help"], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "glorocert bound" in result.stdout and "glorocert certify" in result.stdout


@pytest.mark.parametrize("command", ["bound", "certify"])
def test_command_help_mentions_an_example(command):
    result = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Example" in result.stdout and f"glorocert {command} " in result.stdout


# --------------------------------------------------------------------------- options shared by the commands


DATA_OPTIONS = ("--data", "--split", "--labels", "--start", "--limit", "--layout", "--scale", "--mean", "--std")


def _help(command: str) -> str:
    result = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", ["bound", "certify", "compare-rs", "compare-local", "audit", "export", "train"])
def test_every_command_that_runs_a_model_takes_device(command):
    assert "--device" in _help(command)


@pytest.mark.parametrize("command", ["certify", "compare-rs", "compare-local", "audit"])
def test_every_command_that_reads_a_dataset_takes_the_same_data_options_and_batch_size(command):
    text = _help(command)
    assert all(option in text for option in DATA_OPTIONS)
    assert (command == "audit") != ("--batch-size" in text)  # audit attacks in fixed groups


def test_compare_rs_hides_the_old_spelling_batch():
    assert "--batch-size" in _help("compare-rs") and "--batch " not in _help("compare-rs")


@pytest.mark.parametrize("spelling", ["--batch-size", "--batch"])
def test_compare_rs_passes_batch_size_under_both_spellings_and_the_data_normalisation(monkeypatch, capsys, workspace, spelling):
    seen = {}

    def stop(gloro_model, base_model, dataset, **options):
        seen.update(options, normalization=dataset.normalization)
        raise GlorocertError("stopped by the test")

    monkeypatch.setattr(compare_rs, "compare_rs", stop)
    code, _, err = run_main(monkeypatch, capsys, "compare-rs", workspace["onnx"], "--data", workspace["data"] / "digits.npz",
                            spelling, "7", "--mean", "0.5", "--std", "0.25")
    assert code == 2 and "stopped by the test" in err
    assert seen["batch"] == 7 and Normalization.same(seen["normalization"], Normalization((0.5,), (0.25,)))


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


# --------------------------------------------------------------------------- certify


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_certify_writes_rows_summary_and_plot(monkeypatch, capsys, workspace, out_dir, suffix):
    rows_path, summary_path, plot_path = out_dir / f"rows{suffix}", out_dir / "summary.json", out_dir / "curve.png"
    code, out, err = run_main(
        monkeypatch, capsys, "certify", workspace["onnx"], "--data", workspace["data"] / "digits.npz",
        "--eps", "0.01,0.05", "--out", rows_path, "--summary", summary_path, "--plot", plot_path,
    )
    assert code == 0, err
    rows = read_rows(rows_path)
    assert len(rows["index"]) == 40
    assert {"index", "label", "predicted", "radius", "bottom@0.05", "certified@0.01"} <= set(rows)
    summary = json.loads(summary_path.read_text())
    assert summary["num_samples"] == 40 and set(summary["vra"]) == {"0.01", "0.05"}
    assert summary["bound_mode"] == "sound"
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "VRA" in out


def test_certify_torchscript_with_labels_file(monkeypatch, capsys, workspace, out_dir):
    code, _, err = run_main(
        monkeypatch, capsys, "certify", workspace["torchscript"], "--input-shape", "1,8,8",
        "--data", workspace["data"] / "x.npy", "--labels", workspace["data"] / "y.npy", "--eps", "0.01",
        "--out", out_dir / "rows.csv", "--bound", out_dir / "absent.json",
    )
    assert code == 2 and "no such bound file" in err  # an explicit --bound must exist
    code, _, err = run_main(
        monkeypatch, capsys, "certify", workspace["torchscript"], "--input-shape", "1,8,8",
        "--data", workspace["data"] / "x.npy", "--labels", workspace["data"] / "y.npy", "--eps", "0.01",
        "--out", out_dir / "rows.csv",
    )
    assert code == 0, err
    assert len(read_rows(out_dir / "rows.csv")["radius"]) == 40


def test_fail_under_exits_1_when_vra_is_below(monkeypatch, capsys, workspace, out_dir):
    code, _, err = run_main(
        monkeypatch, capsys, "certify", workspace["onnx"], "--data", workspace["data"] / "digits.npz",
        "--eps", "0.05", "--fail-under", "1.01", "--out", out_dir / "rows.csv",
    )
    assert code == 1
    assert "below --fail-under" in err
    assert (out_dir / "rows.csv").exists()  # a failed check still reports its results
    code, _, _ = run_main(
        monkeypatch, capsys, "certify", workspace["onnx"], "--data", workspace["data"] / "digits.npz",
        "--eps", "0.05", "--fail-under", "0",
    )
    assert code == 0


# --------------------------------------------------------------------------- bad input → exit 2, one line


BAD_INPUTS = {
    "missing_model": lambda w: ["certify", w["root"] / "absent.onnx", "--data", w["data"] / "digits.npz"],
    "corrupt_onnx": lambda w: ["certify", w["corrupt"], "--data", w["data"] / "digits.npz"],
    "corrupt_onnx_bound": lambda w: ["bound", w["corrupt"], "--out", "{out}/bound.json"],
    "pickled_module_without_trust": lambda w: ["certify", w["pickle"], "--input-shape", "1,8,8", "--data", w["data"] / "digits.npz"],
    "unsupported_operator": lambda w: ["certify", w["gelu"], "--data", w["data"] / "digits.npz"],
    "unsupported_operator_bound": lambda w: ["bound", w["gelu"], "--out", "{out}/bound.json"],
    "nan_pixel": lambda w: ["certify", w["onnx"], "--data", w["data"] / "nan.npy"],
    "wrong_input_shape": lambda w: ["certify", w["onnx"], "--data", w["data"] / "wrong_shape.npy"],
    "label_out_of_range": lambda w: ["certify", w["onnx"], "--data", w["data"] / "x.npy", "--labels", w["data"] / "labels_out_of_range.npy"],
    "limit_zero": lambda w: ["certify", w["onnx"], "--data", w["data"] / "digits.npz", "--limit", "0"],
    "empty_npy": lambda w: ["certify", w["onnx"], "--data", w["data"] / "empty.npy"],
    "unreadable_data": lambda w: ["certify", w["onnx"], "--data", w["data"] / "garbage.npy"],
    "missing_data": lambda w: ["certify", w["onnx"], "--data", w["data"] / "absent.npy"],
    "stale_bound": lambda w: ["certify", w["onnx"], "--data", w["data"] / "digits.npz", "--bound", w["other_bound"]],
    "unknown_output_extension": lambda w: ["certify", w["onnx"], "--data", w["data"] / "digits.npz", "--out", "{out}/rows.txt"],
    "unknown_plot_extension": lambda w: ["certify", w["onnx"], "--data", w["data"] / "digits.npz", "--plot", "{out}/curve.txt"],
    "bad_eps": lambda w: ["certify", w["onnx"], "--data", w["data"] / "digits.npz", "--eps", "-1"],
    "bad_input_shape": lambda w: ["certify", w["torchscript"], "--input-shape", "one,8,8", "--data", w["data"] / "digits.npz"],
}
EXPECTED_WORDS = {
    "pickled_module_without_trust": "--trust-pickle",
    "unsupported_operator": "Erf",
    "nan_pixel": "NaN",
    "label_out_of_range": "label",
    "stale_bound": "another model",
    "unknown_output_extension": ".txt",
    "unknown_plot_extension": ".txt",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_no_output(monkeypatch, capsys, workspace, out_dir, case):
    args = [str(a).replace("{out}", str(out_dir)) for a in BAD_INPUTS[case](workspace)]
    if args[0] == "certify":
        args += ["--eps", "0.05"] if "--eps" not in args else []
        args += ["--summary", out_dir / "summary.json"]
        args += ["--plot", out_dir / "curve.png"] if "--plot" not in args else []
        args += ["--out", out_dir / "rows.csv"] if "--out" not in args else []
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    assert "Traceback" not in err + out
    assert EXPECTED_WORDS.get(case, "") in lines[0]
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["certify", "--no-such-option"],
    ["certify"],
    ["certify", "model.onnx", "--batch-size", "many"],
], ids=["unknown_option", "missing_model_argument", "non_integer_option"])
def test_usage_errors_exit_2_without_a_traceback(monkeypatch, capsys, args):
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2
    assert "Traceback" not in out + err and err.strip()


# --------------------------------------------------------------------------- interruption


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_interrupt_while_writing_leaves_no_output_file(monkeypatch, workspace, out_dir, suffix):
    real_replace = os.replace

    def interrupted(src, dst):  # the rows are complete in the temporary file; Ctrl-C arrives before the rename
        if str(dst).startswith(str(out_dir)):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(glorocert.files.os, "replace", interrupted)
    result = CliRunner().invoke(cli.app, [
        "certify", str(workspace["onnx"]), "--data", str(workspace["data"] / "digits.npz"), "--eps", "0.05",
        "--out", str(out_dir / f"rows{suffix}"), "--summary", str(out_dir / "summary.json"),
    ])
    assert result.exit_code == 130
    assert list(out_dir.iterdir()) == []


def test_interrupt_during_certification_leaves_no_output_file(monkeypatch, workspace, out_dir):
    calls = []
    real_call = OrtRunner.__call__

    def interrupted(self, x):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_call(self, x)

    monkeypatch.setattr(OrtRunner, "__call__", interrupted)
    result = CliRunner().invoke(cli.app, [
        "certify", str(workspace["onnx"]), "--data", str(workspace["data"] / "digits.npz"), "--eps", "0.05",
        "--batch-size", "8", "--out", str(out_dir / "rows.csv"), "--summary", str(out_dir / "summary.json"),
        "--plot", str(out_dir / "curve.png"),
    ])
    assert result.exit_code == 130
    assert len(calls) == 3  # one call for the equivalence check at load time, then the second batch was interrupted
    assert list(out_dir.iterdir()) == []


def test_interrupt_through_main_exits_130_and_leaves_no_output(monkeypatch, capsys, workspace, out_dir):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(glorocert.files, "write_json", interrupted)  # rows are written first, then the summary
    code, out, err = run_main(
        monkeypatch, capsys, "certify", workspace["onnx"], "--data", workspace["data"] / "digits.npz", "--eps", "0.05",
        "--summary", out_dir / "summary.json",
    )
    assert code == 130 and "Traceback" not in out + err
    assert "interrupted" in err
    assert list(out_dir.iterdir()) == []


def test_ctrl_c_on_a_running_certification_exits_130_and_leaves_no_output(workspace, out_dir, tmp_path):
    """A real SIGINT to a real process, while it streams a large memory-mapped .npy one sample at a time."""
    big = tmp_path / "big.npy"
    np.save(big, np.random.default_rng(0).random((100_000, *SHAPE), dtype=np.float32))
    rows = out_dir / "rows.csv"
    process = subprocess.Popen(
        [sys.executable, "-m", "glorocert.cli", "certify", str(workspace["onnx"]), "--data", str(big), "--scale", "none",
         "--eps", "0.05", "--batch-size", "1", "--out", str(rows), "--summary", str(out_dir / "summary.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:  # the data file is mapped once certification starts
            if str(big) in Path(f"/proc/{process.pid}/maps").read_text():
                break
            time.sleep(0.1)
        time.sleep(1.0)
        assert process.poll() is None, "the run finished before it could be interrupted: " + process.stderr.read()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert not rows.exists() and list(out_dir.iterdir()) == []
