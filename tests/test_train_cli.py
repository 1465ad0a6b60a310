"""`glorocert train` end to end on the built-in 8×8 digits (one epoch, a few seconds)."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from glorocert.cli import app
from glorocert.errors import GlorocertError
from glorocert.zoo import load_checkpoint, read_checkpoint_metadata


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
