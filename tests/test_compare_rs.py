"""compare-rs: GloRo and smoothing rows on identical samples; an interrupted run resumes to the same rows."""

from __future__ import annotations

import json

import numpy as np

from glorocert.studies.compare_rs import SMOOTHING_ROWS, compare_rs
from glorocert.data import open_dataset
from glorocert.loaders import load


def _run(model, out_dir, resume=False):
    data = open_dataset("digits", limit=24)
    return compare_rs(model, model, data, sigma=0.25, n0=20, n=200, alpha=0.01, batch=200, skip=2, seed=3,
                      out_dir=out_dir, resume=resume)


def test_both_methods_certify_the_same_samples(trained_digits_model, tmp_path):
    _, onnx_path, _ = trained_digits_model
    result = _run(load(onnx_path), tmp_path / "a")
    assert list(result.gloro_rows["index"]) == list(result.smoothing_rows["index"]) == list(range(0, 24, 2))
    assert [row["method"].split()[0] for row in result.table] == ["GloRo", "smoothing"]
    assert "probabilistic" in result.table[1]["guarantee"] and result.table[0]["guarantee"].startswith("deterministic")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["num_samples"] == 12


def test_resume_after_an_interruption_gives_the_rows_of_an_uninterrupted_run(trained_digits_model, tmp_path):
    _, onnx_path, _ = trained_digits_model
    model = load(onnx_path)
    full = _run(model, tmp_path / "full").smoothing_rows
    # simulate a crash: keep the first 5 finished rows and a torn sixth line
    log = tmp_path / "part" / SMOOTHING_ROWS
    _run(model, tmp_path / "part")
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])
    resumed = _run(model, tmp_path / "part", resume=True).smoothing_rows
    for column in ("index", "predicted", "radius", "abstain"):
        assert np.array_equal(resumed[column], full[column]), column
    assert len(log.read_text().splitlines()) == 12
