"""Real signals to real processes: what compare-rs and train keep for --resume survives kill -9 and Ctrl-C, and
the interrupt message says how to resume. (tests/test_signals.py runs every command under every signal.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from glorocert.studies.compare_rs import MANIFEST, SMOOTHING_ROWS
from glorocert.train.state import RESULT_FILES, STATE_JSON
from helpers import run_main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _started(args, until, timeout=240):
    """A glorocert process, once ``until()`` holds (polled); fails the test if the process ends first."""
    process = subprocess.Popen([sys.executable, "-m", "glorocert.cli", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + timeout
    while not until():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run ended (or hung) before the moment to signal it: {process.communicate()[1][-2000:]}")
        time.sleep(0.02)
    return process


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_compare_rs_killed_while_smoothing_resumes_to_the_rows_of_an_uninterrupted_run(monkeypatch, capsys, workspace,
                                                                                       tmp_path):
    args = ["compare-rs", workspace["onnx"], "--data", workspace["data"] / "digits.npz", "--limit", "12", "--sigma", "0.25",
            "--n0", "20", "--n", "20000", "--alpha", "0.01"]
    rows = tmp_path / "cut" / SMOOTHING_ROWS
    process = _started([*args, "--out", tmp_path / "cut"], until=lambda: len(_lines(rows)) >= 2)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=120)
    finished = _lines(rows)
    assert 2 <= len(finished) < 12 and (tmp_path / "cut" / MANIFEST).is_file()
    code, _, err = run_main(monkeypatch, capsys, *args, "--out", tmp_path / "cut", "--resume")
    assert code == 0, err
    code, _, err = run_main(monkeypatch, capsys, *args, "--out", tmp_path / "whole")
    assert code == 0, err
    resumed = [json.loads(line) for line in _lines(rows)]
    whole = [json.loads(line) for line in _lines(tmp_path / "whole" / SMOOTHING_ROWS)]
    assert _lines(rows)[: len(finished)] == finished  # appended after the rows that were there, never rewritten
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert sorted(map(json.dumps, map(strip, resumed))) == sorted(map(json.dumps, map(strip, whole)))


def test_train_interrupted_says_how_to_resume_and_resumes_to_every_result(monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--eps", "0.3", "--arch", "2c2f", "--epochs", "40", "--batch-size", "64",
            "--limit", "256", "--out", out]
    process = _started(args, until=lambda: (out / STATE_JSON).exists())
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert f"kept the resume state in {out} (train_state.*, log.csv) after epoch" in err and "rerun with --resume" in err
    assert not any((out / name).exists() for name in RESULT_FILES)
    state = json.loads((out / STATE_JSON).read_text())
    assert 1 <= state["epochs_done"] < 40
    code, _, err = run_main(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    assert all((out / name).is_file() for name in RESULT_FILES)
