"""The `glorocert` command: outputs, exit codes, one-line errors, and no output left by a failed run.

Most runs go through ``glorocert.cli.main`` in-process (the console script's own entry point,
with its exit-code handling); one subprocess checks the installed script itself.
"""

from __future__ import annotations

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
from glorocert.api import Normalization
from glorocert.errors import GlorocertError
from glorocert.loaders.runners import OrtRunner
from glorocert.studies import compare_rs
from helpers import SHAPE, run_main


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


# --------------------------------------------------------------------------- bad input → exit 2, one line


BAD_INPUTS = {
    "missing_model": lambda w: ["certify", w["root"] / "absent.onnx", "--data", w["data"] / "digits.npz"],
    "corrupt_onnx": lambda w: ["certify", w["corrupt"], "--data", w["data"] / "digits.npz"],
    "corrupt_onnx_bound": lambda w: ["bound", w["corrupt"], "--out", "{out}/bound.json"],
    "pickled_module_without_trust": lambda w: ["certify", w["pickle"], "--input-shape", "1,8,8", "--data", w["data"] / "digits.npz"],
    "unsupported_operator": lambda w: ["certify", w["square"], "--data", w["data"] / "digits.npz"],
    "unsupported_operator_bound": lambda w: ["bound", w["square"], "--out", "{out}/bound.json"],
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
    "unsupported_operator": "Mul",
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
