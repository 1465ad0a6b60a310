"""`glorocert certify`: rows, summary and plot in every format, labels files, --fail-under."""

from __future__ import annotations

import json

import pytest

from glorocert.results import read_rows
from helpers import run_main


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
        "--eps", "0.05", "--fail-under", "1", "--out", out_dir / "rows.csv",
    )
    assert code == 1
    assert "below --fail-under" in err
    assert (out_dir / "rows.csv").exists()  # a failed check still reports its results
    code, _, _ = run_main(
        monkeypatch, capsys, "certify", workspace["onnx"], "--data", workspace["data"] / "digits.npz",
        "--eps", "0.05", "--fail-under", "0",
    )
    assert code == 0
