"""The cascade (gloro, then BCP/KW once per requested ε on gloro's ⊥ samples): never weaker than
gloro, never runs the local method beyond gloro's ⊥ set, reports what it rescued, and every
certificate survives a PGD attack inside its radius.

A small ReLU conv net trained with plain cross-entropy on sklearn's 8×8 digits: its global bound
is loose, so both local methods rescue many samples and the checks below are not vacuous.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import glorocert.loaders.model
from glorocert.api import Normalization, certify, compute_bound, load, open_dataset
from glorocert.certify import bcp, gloro, local
from glorocert.lipschitz.compose import compose
from glorocert.lipschitz.freeze import composition_from_bound
from glorocert.results import eps_key
from helpers import pgd_margin, run_main

EPS = [0.05, 0.1, 0.2]


@pytest.fixture(scope="module")
def runs(trained_digits_model):
    _, onnx_path, _ = trained_digits_model
    model = load(onnx_path)
    base = certify(model, "digits", EPS, method="gloro")
    cascades = {fallback: certify(model, "digits", EPS, method="cascade", fallback=fallback) for fallback in ("bcp", "kw")}
    return model, base, cascades


@pytest.mark.parametrize("fallback", ["bcp", "kw"])
def test_cascade_certifies_everything_gloro_does_and_reports_exactly_what_it_rescued(runs, fallback):
    _, base, cascades = runs
    res = cascades[fallback]
    g, c = base.rows, res.rows
    assert np.array_equal(g["index"], c["index"]) and np.array_equal(g["predicted"], c["predicted"])
    assert np.array_equal(c["gloro_radius"], g["radius"])
    assert (c["radius"] >= g["radius"]).all()
    rescued_any = 0
    for e in EPS:
        key = eps_key(e)
        assert (c[f"certified@{key}"] | ~g[f"certified@{key}"]).all()  # cascade ⊇ gloro
        extra = int(c[f"certified@{key}"].sum() - g[f"certified@{key}"].sum())
        assert res.summary["rescued"][key] == extra
        assert res.summary["vra"][key] - base.summary["vra"][key] == pytest.approx(extra / len(g["index"]))
        rescued_any += extra
    assert rescued_any > 0  # the test means something
    s = res.summary
    assert s["local_method"] == fallback
    # the local method ran on gloro's ⊥ set at the largest ε — every such sample, and no other
    bottom_at_max = gloro.bottom_flags(g["radius"], max(EPS))
    assert s["local_samples"] == int(bottom_at_max.sum())
    assert ((c["seconds"] > 0) == bottom_at_max).all()
    assert s["local_passes"] <= sum(int(gloro.bottom_flags(g["radius"], e).sum()) for e in EPS)
    assert s["local_passes"] >= s["local_samples"]
    # a rescued radius is the largest requested ε the local method certified
    by_local = ~np.isnan(c["local_eps"])
    assert np.isin(c["local_eps"][by_local], EPS).all()
    assert np.array_equal(c["radius"], np.fmax(g["radius"], c["local_eps"]))
    assert (c["local_eps"][by_local] >= g["radius"][by_local]).all()
    assert not by_local[~bottom_at_max].any()


@pytest.mark.parametrize("fallback", ["bcp", "kw"])
def test_no_cascade_certificate_is_broken_by_pgd_inside_its_radius(runs, fallback):
    model, _, cascades = runs
    rows = cascades[fallback].rows
    certified = rows[f"certified@{eps_key(min(EPS))}"] & (rows["radius"] > 0)
    rescued = certified & ~np.isnan(rows["local_eps"])
    assert rescued.sum() >= 5
    # up to 40 rescued samples (the ones with the largest radii first) and 20 certified by gloro alone
    by_radius = np.flatnonzero(rescued)[np.argsort(-rows["radius"][rescued], kind="stable")]
    chosen = by_radius[:40].tolist() + np.flatnonzero(certified & ~rescued)[:20].tolist()
    x = torch.from_numpy(np.stack([_digit(i) for i in rows["index"][chosen]])).double()
    predicted = torch.from_numpy(rows["predicted"][chosen])
    radius = torch.from_numpy(rows["radius"][chosen])
    margin = pgd_margin(model.graph, x, predicted, radius, steps=40, restarts=2)
    assert (margin > 0).all(), rows["index"][chosen][(margin <= 0).numpy()]


def _digit(index: int) -> np.ndarray:
    cache = _digit.__dict__.setdefault("cache", {})
    if not cache:
        for batch in open_dataset("digits").batches(4096):
            cache.update(zip(batch.index.tolist(), batch.x))
    return cache[int(index)]


def test_cascade_cli_prints_what_it_rescued(trained_digits_model, monkeypatch, capsys):
    _, onnx_path, _ = trained_digits_model
    code, out, err = run_main(monkeypatch, capsys, "certify", onnx_path, "--data", "digits", "--limit", "60",
                              "--eps", "0.1,0.2", "--method", "cascade", "--fallback", "bcp")
    assert code == 0, err
    printed = " ".join(out.split())
    assert "cascade: bcp ran on" in printed and "sample·ε passes" in printed and "rescued" in printed and "at ε=0.2" in printed


def test_bcp_reuses_the_frozen_sound_bound_only_when_it_is_the_same_guaranteed_composition(trained_digits_model):
    _, onnx_path, _ = trained_digits_model
    model = load(onnx_path)
    sound = compute_bound(model)
    reused = composition_from_bound(sound, model.graph, None)
    fresh = compose(model.graph)
    assert reused is not None
    assert {b.name: b.upper for b in reused.blocks} == pytest.approx({b.name: b.upper for b in fresh.blocks}, rel=1e-9)
    assert np.allclose(reused.margin_upper, fresh.margin_upper, rtol=1e-9)
    assert composition_from_bound(compute_bound(model, mode="estimate"), model.graph, None) is None
    assert composition_from_bound(sound, model.graph, Normalization.of(0.1, 0.3)) is None  # another normalisation
    other = load(onnx_path)  # a graph whose blocks the bound does not name is never given BCP
    sound.blocks = [b for b in sound.blocks if b["name"] != sound.blocks[0]["name"]]
    assert composition_from_bound(sound, other.graph, None) is None


def test_certify_method_bcp_agrees_with_bcp_at_each_requested_eps(runs):
    """Bisection stops within its tolerance below a radius; a sample that BCP certifies exactly at a
    requested ε must still count as certified there (BCP's bound is monotone in ε, so the two agree)."""
    model, base, _ = runs
    res = certify(model, "digits", EPS, method="bcp", batch_size=512)
    x = np.concatenate([b.x for b in open_dataset("digits").batches(512)])
    predicted = torch.from_numpy(res.rows["predicted"])
    logits = model.runner(x)
    slack = torch.from_numpy(model.rounding_rtol * (1 + np.abs(logits).max(1)))
    for e in EPS:
        exact = bcp.certify(model.graph, torch.from_numpy(x), predicted, e, slack=slack).numpy() & res.rows["correct"]
        assert np.array_equal(res.rows[f"certified@{eps_key(e)}"], exact), e


def test_local_methods_keep_the_same_rounding_budget_as_gloro(trained_digits_model, monkeypatch):
    """A margin within rtol·(1 + max|y|) of zero is not certified by any method (here rtol is made huge)."""
    _, onnx_path, _ = trained_digits_model
    model = load(onnx_path)
    monkeypatch.setattr(glorocert.loaders.model, "ROUNDING_RTOL", 10.0)  # Model.rounding_rtol reads it at call time
    assert model.rounding_rtol == 10.0
    for method in ("gloro", "bcp", "cascade"):
        res = certify(model, "digits", [0.0, 0.05], method=method, batch_size=512)
        assert not res.rows["certified@0"].any() and not res.rows["certified@0.05"].any(), method


def test_above_compares_every_bound_with_its_own_slack():
    lower = torch.tensor([[0.5, torch.inf], [torch.inf, 0.01]], dtype=torch.float64)
    assert local.above(lower, 0.0).tolist() == [True, True]
    assert local.above(lower, torch.tensor([0.1, 0.1], dtype=torch.float64)).tolist() == [True, False]
    assert local.above(lower, torch.tensor([9.0, 0.1, 0.0]), index=torch.tensor([2, 0])).tolist() == [True, False]
