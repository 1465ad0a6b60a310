"""`glorocert train` end to end on the built-in 8×8 digits (one epoch, a few seconds)."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

import glorocert.files
from glorocert.cli import app
from glorocert.errors import GlorocertError
from glorocert.zoo import load_checkpoint, read_checkpoint_metadata
from helpers import run_main


def test_train_command_writes_model_card_and_log(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--eps", "0.3", "--arch", "2c2f", "--activation", "minmax",
            "--loss", "trades", "--lam", "1", "--epochs", "2", "--batch-size", "64", "--limit", "256",
            "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    for name in ("model.safetensors", "model.onnx", "model.ts.pt", "card.md", "log.csv"):
        assert (out / name).exists(), name
    card = (out / "card.md").read_text()
    assert "glorocert train --arch 2c2f --activation minmax" in card
    assert "`digits` — the built-in train split (1438)" in card
    assert "training limited to the first 256 samples" in card
    with open(out / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    _, spec = load_checkpoint(out / "model.safetensors")
    assert spec["input_shape"] == [1, 8, 8]
    # the final figures (card, checkpoint record) are the last epoch's: same weights, same held-out split
    meta = read_checkpoint_metadata(out / "model.safetensors")
    assert json.loads(meta["clean_acc"]) == pytest.approx(float(rows[-1]["clean_acc"]), abs=1e-6)
    assert f"| Clean accuracy | {100 * float(rows[-1]['clean_acc']):.2f}% |" in card
    assert "**VRA at ε = 0.3 (sound frozen bound)**" in card and (out / "model.onnx.bound.json").exists()

    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0
    assert isinstance(again.exception, GlorocertError), repr(again.exception)
    assert "already holds a training run; pass --resume" in str(again.exception)


def test_unknown_schedule_is_a_user_error(tmp_path):
    result = CliRunner().invoke(app, ["train", "--data", "digits", "--eps", "0.3", "--out", str(tmp_path / "x"),
                                         "--eps-schedule", "linear_from_0.1"])
    assert result.exit_code != 0
    message = str(result.exception) + result.output
    assert "valid: fixed, linear, linear_half" in message


QUICK = ["train", "--data", "digits", "--eps", "0.3", "--arch", "2c2f", "--epochs", "2", "--batch-size", "64", "--limit", "128"]
RESULTS = ("model.safetensors", "model.onnx", "model.ts.pt", "model.onnx.bound.json", "card.md")


@pytest.mark.parametrize("name", ["model.onnx", "model.onnx.bound.json", "card.md", "log.csv", "model.ts.pt"])
def test_train_refuses_an_out_dir_holding_a_file_it_would_write(monkeypatch, capsys, tmp_path, name):
    """train --out DIR used to overwrite a user's model.onnx, its bound, card.md and log.csv (issue 15)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text("the user's own file")
    (out / "notes.txt").write_text("unrelated")
    code, _, err = run_main(monkeypatch, capsys, *QUICK, "--out", out)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and name in lines[0], err
    assert sorted(p.name for p in out.iterdir()) == sorted([name, "notes.txt"])
    assert (out / name).read_text() == "the user's own file"


def test_train_resume_into_a_missing_directory_creates_nothing(monkeypatch, capsys, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, *QUICK, "--resume", "--out", tmp_path / "nodir")
    assert code == 2 and "nothing to resume" in err
    assert not (tmp_path / "nodir").exists()
    (tmp_path / "a-file").write_text("x")
    code, _, err = run_main(monkeypatch, capsys, *QUICK, "--out", tmp_path / "a-file")
    assert code == 2 and "not a directory" in err


def test_train_results_appear_together_and_an_interrupt_says_how_to_resume(monkeypatch, capsys, tmp_path):
    from glorocert.train import loop, outputs

    out = tmp_path / "run"
    real_optimise = loop._optimise

    def interrupted_in_epoch_2(loss, optimizer, epoch, step, progress):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_optimise(loss, optimizer, epoch, step, progress)

    monkeypatch.setattr(loop, "_optimise", interrupted_in_epoch_2)
    code, _, err = run_main(monkeypatch, capsys, *QUICK, "--out", out)
    assert code == 130
    assert f"kept the resume state in {out} (train_state.*, log.csv) after epoch 1: rerun with --resume" in err, err
    assert not any((out / name).exists() for name in RESULTS)
    monkeypatch.setattr(loop, "_optimise", real_optimise)

    def interrupted_writing_the_card(*args, **kwargs):  # the card is the last result: the others are complete by then
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "model_card", interrupted_writing_the_card)
    code, _, err = run_main(monkeypatch, capsys, *QUICK, "--resume", "--out", out)
    assert code == 130
    assert "after epoch 2: rerun with --resume" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["log.csv", "train_state.json", "train_state.safetensors"]
    monkeypatch.undo()

    stale = out / outputs.STAGING  # what kill -9 in the final stage leaves
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half a model")
    code, _, err = run_main(monkeypatch, capsys, *QUICK, "--resume", "--out", out)
    assert code == 0, err
    assert not stale.exists()
    assert all((out / name).is_file() for name in RESULTS)
    bound = json.loads((out / "model.onnx.bound.json").read_text())
    assert bound["model_name"] == "model.onnx" and bound["model_sha256"] == glorocert.files.sha256_of(out / "model.onnx")


def test_an_interrupt_while_the_results_are_put_in_place_is_told_they_are_complete(monkeypatch, capsys, tmp_path):
    """Ctrl-C during the renames waits until all five are in place (signals held), then interrupts: the message
    must say they are complete, and name the epoch the resume state holds."""
    out, real_replace, sent = tmp_path / "run", os.replace, []

    def replace(src, dst):
        if Path(dst).parent == out and Path(dst).name in RESULTS and not sent:
            sent.append(dst)
            # to the main thread, which holds it: delivered once every result is in place
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        return real_replace(src, dst)

    monkeypatch.setattr(glorocert.files.os, "replace", replace)
    code, _, err = run_main(monkeypatch, capsys, *QUICK, "--out", out)
    assert sent and code == 130, err
    assert all((out / name).is_file() for name in RESULTS), (sorted(p.name for p in out.iterdir()), err)
    line = [line for line in err.splitlines() if line.startswith("interrupted")][0]
    assert "already complete: " in line and all(name in line for name in RESULTS), line
    assert "after epoch 2: rerun with --resume" in line, line
