"""compare-rs: GloRo and smoothing rows on identical samples; an interrupted run resumes to the same rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from glorocert.certify import smoothing
from glorocert.data import open_dataset
from glorocert.errors import GlorocertError
from glorocert.loaders import load
from glorocert.studies import compare_rs as compare_rs_module
from glorocert.studies.compare_rs import SMOOTHING_ROWS, EveryKth, compare_rs
from helpers import run_main

MANIFEST = "smoothing-run.json"


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


def _cut(log, keep=5):
    """Simulate a crash: the first ``keep`` finished rows and a torn next line. Returns the kept lines."""
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:keep]) + "\n" + lines[keep][: len(lines[keep]) // 2])
    return lines[:keep]


class _InterruptOnWrite:
    """A file handle on which writing raises KeyboardInterrupt (Ctrl-C arriving as the file is written)."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def write(self, *args):
        raise KeyboardInterrupt

    def writelines(self, *args):
        raise KeyboardInterrupt


def test_an_interrupt_while_resuming_keeps_every_finished_row(trained_digits_model, tmp_path, monkeypatch):
    """--resume used to truncate the rows file and rewrite it: Ctrl-C in that window lost every finished row."""
    _, onnx_path, _ = trained_digits_model
    model = load(onnx_path)
    log = tmp_path / "part" / SMOOTHING_ROWS
    _run(model, tmp_path / "part")
    finished = _cut(log)
    real_open = open

    def interrupting_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        writes = any(c in mode for c in "wa+")
        return _InterruptOnWrite(handle) if writes and Path(file).name == SMOOTHING_ROWS else handle

    monkeypatch.setattr(compare_rs_module, "open", interrupting_open, raising=False)
    with pytest.raises(KeyboardInterrupt):
        _run(model, tmp_path / "part", resume=True)
    assert log.read_text().splitlines() == finished  # the torn line is cut, every complete one kept
    monkeypatch.undo()
    resumed = _run(model, tmp_path / "part", resume=True).smoothing_rows
    full = _run(model, tmp_path / "full").smoothing_rows
    assert np.array_equal(resumed["radius"], full["radius"])
    assert log.read_text().splitlines()[:5] == finished and len(log.read_text().splitlines()) == 12


@pytest.mark.parametrize("change, expected", [
    (dict(sigma=0.5), "sigma 0.25 → 0.5"),
    (dict(n=300), "n 200 → 300"),
    (dict(n0=30), "n0 20 → 30"),
    (dict(alpha=0.02), "alpha 0.01 → 0.02"),
    (dict(seed=4), "seed 3 → 4"),
    (dict(skip=3), "skip 2 → 3"),
    (dict(limit=20), "num_samples 24 → 20"),
    (dict(start=1), "start 0 → 1"),
    (dict(split="train"), "dataset digits[test] → digits[train]"),
    (dict(mean=0.5, std=0.5), "normalization"),
    (dict(base="torchscript"), "base_model_sha256"),
])
def test_resume_refuses_rows_made_with_other_settings_naming_each_difference(trained_digits_model, tmp_path, change, expected):
    """--resume used to reuse rows made with another σ, n, α, seed, model or dataset without checking (issue 15)."""
    _, onnx_path, ts_path = trained_digits_model
    model = load(onnx_path)
    _run(model, tmp_path / "part")
    _cut(tmp_path / "part" / SMOOTHING_ROWS)
    before = (tmp_path / "part" / SMOOTHING_ROWS).read_bytes()
    options = dict(sigma=0.25, n0=20, n=200, alpha=0.01, skip=2, seed=3)
    data_options = dict(limit=24)
    base = model
    for key, value in change.items():
        if key == "base":
            base = load(ts_path, input_shape=(1, 8, 8))
        elif key in options:
            options[key] = value
        else:
            data_options[key] = value
    data = open_dataset("digits", **data_options)
    with pytest.raises(GlorocertError, match="cannot resume") as refused:
        compare_rs(model, base, data, batch=200, out_dir=tmp_path / "part", resume=True, **options)
    assert expected in str(refused.value)
    assert (tmp_path / "part" / SMOOTHING_ROWS).read_bytes() == before


def test_resume_refuses_rows_without_a_manifest(trained_digits_model, tmp_path):
    _, onnx_path, _ = trained_digits_model
    model = load(onnx_path)
    _run(model, tmp_path / "part")
    (tmp_path / "part" / MANIFEST).unlink()
    with pytest.raises(GlorocertError, match=f"no {MANIFEST}.*another tool or glorocert version.*without --resume"):
        _run(model, tmp_path / "part", resume=True)


def test_every_kth_counts_the_samples_it_keeps_in_a_window_that_starts_later():
    subset = EveryKth(open_dataset("digits", start=5, limit=9), 2)
    kept = np.concatenate([b.index for b in subset.batches(4)])
    assert list(kept) == [6, 8, 10, 12] and subset.num_samples == len(kept)


def test_cli_interrupted_in_smoothing_keeps_rows_and_manifest_and_resumes(monkeypatch, capsys, workspace, out_dir):
    real = smoothing.certify_batches

    def interrupted_after_3_rows(*args, on_row, **kwargs):
        done = []

        def row(r):
            if len(done) == 3:
                raise KeyboardInterrupt
            done.append(r)
            on_row(r)

        return real(*args, on_row=row, **kwargs)

    args = ["compare-rs", workspace["onnx"], "--data", workspace["data"] / "digits.npz", "--sigma", "0.25", "--n0", "20",
            "--n", "200", "--alpha", "0.01", "--skip", "4", "--out", out_dir / "rs"]
    monkeypatch.setattr(smoothing, "certify_batches", interrupted_after_3_rows)
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 130
    assert "kept the finished smoothing rows" in err and "--resume" in err
    assert {p.name for p in (out_dir / "rs").iterdir()} == {MANIFEST, SMOOTHING_ROWS}
    assert len((out_dir / "rs" / SMOOTHING_ROWS).read_text().splitlines()) == 3
    monkeypatch.setattr(smoothing, "certify_batches", real)
    code, _, err = run_main(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    assert len((out_dir / "rs" / SMOOTHING_ROWS).read_text().splitlines()) == 10
    assert {"gloro-rows.csv", "smoothing-rows.csv", "summary.json"} <= {p.name for p in (out_dir / "rs").iterdir()}
