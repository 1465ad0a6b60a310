"""`glorocert audit`: attacks find nothing inside sound radii, and do find a planted over-claim."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from glorocert.api import compute_bound
from glorocert.errors import GlorocertError
from glorocert.studies import audit as audit_module
from glorocert.studies.audit import audit
from glorocert.studies.lower_bound import lipschitz_lower_bounds
from glorocert.data import open_dataset
from glorocert.loaders import load


def _digits(limit=60):
    return open_dataset("digits", split="test", limit=limit)


def test_audit_finds_no_violation_inside_sound_radii(trained_digits_model, tmp_path):
    _, onnx_path, _ = trained_digits_model
    model = load(onnx_path)
    result = audit(model, _digits(), bound=compute_bound(model), steps=40, restarts=1, out_dir=tmp_path)
    assert result.audited > 10
    assert result.violations == []
    assert result.summary["adversarial_found"] > 0  # the attacks are strong enough to find something outside
    found = np.isfinite(result.gaps)
    assert (result.gaps[found] >= 1.0).all()  # every adversarial example lies beyond its certified radius
    assert (tmp_path / "audit.json").is_file()


def _overclaiming_bound(model, factor=0.05):
    """A bound whose margin matrix is 20× too small: certified radii 20× too large."""
    bound = compute_bound(model, mode="estimate")
    bound = dataclasses.replace(bound, margin_estimate=(np.asarray(bound.margin_estimate) * factor).tolist())
    return bound


def test_audit_catches_a_planted_overclaim(trained_digits_model, tmp_path):
    _, onnx_path, _ = trained_digits_model
    model = load(onnx_path)
    result = audit(model, _digits(), bound=_overclaiming_bound(model), steps=40, restarts=1, out_dir=tmp_path)
    assert len(result.violations) > 0
    v = result.violations[0]
    assert v["distance"] < v["radius"]
    saved = np.load(tmp_path / f"violation-{v['index']}.npz")
    # the saved adversarial example reproduces: the native model changes its prediction
    logits = model.runner(saved["adversarial_x"][None].astype(np.float32))
    assert logits.argmax() != int(saved["predicted"])
    assert np.linalg.norm(saved["adversarial_x"] - saved["x"]) < float(saved["radius"])


def test_audit_cli_exits_1_on_a_violation_and_0_otherwise(trained_digits_model, tmp_path):
    _, onnx_path, _ = trained_digits_model
    model = load(onnx_path)
    bad = tmp_path / "bad.bound.json"
    _overclaiming_bound(model).save(bad)
    base = [sys.executable, "-m", "glorocert.cli", "audit", str(onnx_path), "--data", "digits", "--limit", "40", "--steps", "30", "--restarts", "1"]
    done = subprocess.run(base + ["--bound", str(bad)], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert "VIOLATION" in done.stderr
    good = tmp_path / "good.bound.json"
    compute_bound(model).save(good)
    done = subprocess.run(base + ["--bound", str(good)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_empirical_lower_bounds_never_exceed_the_sound_upper_bounds(trained_digits_model):
    _, onnx_path, _ = trained_digits_model
    model = load(onnx_path)
    bound = compute_bound(model)
    start = torch.from_numpy(next(_digits(32).batches(32)).x)
    found = lipschitz_lower_bounds(model.graph, start, steps=30)
    assert 0 < found["global_lower"] <= bound.global_upper
    lower = np.asarray(found["margin_lower"])
    assert (lower <= bound.margin_matrix + 1e-9).all()
    # and the search is not trivially weak: within 10× of the upper bound on this small net
    assert bound.global_upper / found["global_lower"] < 10


@pytest.mark.parametrize("steps, restarts", [(0, 2), (-1, 2), (10, -1)])
def test_audit_refuses_no_steps_or_negative_restarts_before_any_work(monkeypatch, steps, restarts):
    """steps=0 or restarts=-1 used to run no attack at all and report "violations 0" (issue 15)."""
    monkeypatch.setattr(audit_module, "resolve_bound", lambda *a, **k: pytest.fail("worked before checking the parameters"))
    with pytest.raises(GlorocertError, match="--steps must be ≥ 1" if steps < 1 else "--restarts must be ≥ 0"):
        audit(None, None, steps=steps, restarts=restarts)
