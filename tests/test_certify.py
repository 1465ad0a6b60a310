"""GloRo certification: radii against an obviously-correct loop, and no certificate broken by an attack."""

from __future__ import annotations

import copy
import math
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from glorocert.api import Normalization, certify, compute_bound, default_path, load, open_dataset
from glorocert.certify import gloro
from glorocert.errors import GlorocertError
from glorocert.loaders import ROUNDING_RTOL
from helpers import SHAPE, Normalize, make_model, save_as

# --------------------------------------------------------------------------- the reference computation


def reference_certificate(logits_row, margin_matrix, rounding_rtol):
    """One sample, written out: predicted class, certified radius (0 when the top logit is tied)."""
    y = [float(v) for v in logits_row]
    j = max(range(len(y)), key=lambda c: (y[c], -c))  # first maximum, as argmax
    others = [i for i in range(len(y)) if i != j]
    if any(y[i] == y[j] for i in others):
        return j, 0.0
    slack = rounding_rtol * (1.0 + max(abs(v) for v in y))
    radius = math.inf
    for i in others:
        safe_gap = y[j] - y[i] - slack
        k = float(margin_matrix[j][i])
        if k == 0.0:
            candidate = math.inf if safe_gap > 0 else 0.0
        else:
            candidate = safe_gap / k
        radius = min(radius, candidate)
    return j, max(radius, 0.0)


def random_logits_and_margins(seed, n=400, classes=10, zero_fraction=0.1):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, (n, classes))
    ties = rng.random(n) < 0.1  # copy the top logit onto another class
    for row in np.flatnonzero(ties):
        top = logits[row].argmax()
        other = (top + 1 + rng.integers(classes - 1)) % classes
        logits[row, other] = logits[row, top]
    k = rng.uniform(0.5, 5.0, (classes, classes))
    k[rng.random((classes, classes)) < zero_fraction] = 0.0  # K_ij = 0: the pair can never swap
    np.fill_diagonal(k, 0.0)
    return logits, k


def assert_radii_match_reference(logits, k, rtol):
    predicted, runner_up, margin, radius = gloro.radii(logits, k, rtol)
    for row in range(len(logits)):
        j, expected = reference_certificate(logits[row], k, rtol)
        assert predicted[row] == j
        if expected == 0.0 or math.isinf(expected):
            assert radius[row] == expected or (math.isinf(expected) and radius[row] > 1e300)
        else:  # rounded down, never up
            assert expected * (1 - 1e-12) <= radius[row] <= expected
        others = np.delete(logits[row], j)
        assert margin[row] == pytest.approx(logits[row, j] - others.max(), abs=1e-12)
        assert runner_up[row] != j


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rtol", [0.0, ROUNDING_RTOL, 1e-2])
def test_radii_agree_with_a_per_sample_loop_including_ties_and_zero_margins(seed, rtol):
    logits, k = random_logits_and_margins(seed)
    assert_radii_match_reference(logits, k, rtol)


def test_tied_top_logit_is_never_certified():
    logits = np.array([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [2.0, 2.0, -1.0, -1.0]])
    k = np.ones((4, 4)) - np.eye(4)
    _, _, margin, radius = gloro.radii(logits, k)
    assert (margin == 0).all() and (radius == 0).all()
    assert gloro.bottom_flags(radius, 0.0).all()  # ⊥ even at ε = 0: a tie is decided against certification


def test_zero_margin_column_certifies_that_pair_at_any_radius_but_not_the_others():
    logits = np.array([[4.0, 1.0, 0.0]])
    k = np.array([[0.0, 0.0, 2.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])  # class 1 can never overtake class 0
    _, runner_up, _, radius = gloro.radii(logits, k, 0.0)
    assert runner_up[0] == 2 and radius[0] == pytest.approx(2.0) and radius[0] <= 2.0
    _, _, _, unbounded = gloro.radii(logits, np.zeros((3, 3)), 0.0)
    assert math.isinf(unbounded[0]) or unbounded[0] > 1e300


def test_bottom_flag_at_eps_is_radius_not_above_eps():
    radius = np.array([0.0, 0.1, 0.3, np.nextafter(0.3, 1.0), 2.0, np.inf])
    assert gloro.bottom_flags(radius, 0.3).tolist() == [True, True, True, False, False, False]


def test_radius_is_computed_against_the_gloro_bottom_logit():
    """r > ε exactly when every ⊥ logit max_{i≠j} y_i + ε·K[j][i] stays below y_j (rtol 0)."""
    logits, k = random_logits_and_margins(5, zero_fraction=0.0)
    predicted, _, _, radius = gloro.radii(logits, k, 0.0)
    for eps in (0.05, 0.3, 1.0):
        bottom_logit = np.array([
            max(logits[r, i] + eps * k[predicted[r], i] for i in range(k.shape[0]) if i != predicted[r])
            for r in range(len(logits))
        ])
        wins = bottom_logit < logits[np.arange(len(logits)), predicted]
        assert ((radius > eps) <= wins).all()  # never certified where the ⊥ logit reaches y_j
        assert ((radius > eps) == wins).mean() > 0.99  # and the same decision away from exact ties


@pytest.mark.parametrize("kind", ["ends_with_relu", "ends_with_tanh"])
def test_sqrt2_fallback_when_the_graph_does_not_end_in_a_linear_layer(tmp_path, kind):
    model = load(save_as(make_model(kind), "onnx", tmp_path, kind))
    bound = compute_bound(model)
    assert bound.margin_method == "sqrt2-global"
    k = bound.margin_matrix
    off = ~np.eye(10, dtype=bool)
    assert (np.diag(k) == 0).all()
    assert (k[off] >= math.sqrt(2) * bound.global_upper).all()
    assert k[off] == pytest.approx(math.sqrt(2) * bound.global_upper, rel=1e-5)
    result = certify(model, "digits", [0.01], bound=bound)
    logits = model.runner(next(open_dataset("digits").batches(10_000)).x)
    assert model.rounding_rtol == max(ROUNDING_RTOL, 4 * model.equivalence_gap)  # the one rounding budget
    assert_radii_match_reference(logits, k, model.rounding_rtol)
    _, _, _, expected = gloro.radii(logits, k, model.rounding_rtol)
    np.testing.assert_array_equal(result.rows["radius"], expected)


def test_margin_matrix_with_final_linear_layer_is_used_by_certify(tmp_path):
    module = make_model("mlp")
    model = load(save_as(module, "onnx", tmp_path))
    bound = compute_bound(model)
    assert bound.margin_method == "last-linear"
    w1, w2 = module[1].weight.double(), module[3].weight.double()
    penultimate = torch.linalg.matrix_norm(w1, ord=2).item()
    for j in range(10):
        for i in range(10):
            assert bound.margin_upper[j][i] == pytest.approx((w2[j] - w2[i]).norm().item() * penultimate, rel=1e-5)
    result = certify(model, "digits", [0.05], bound=bound)
    x = next(open_dataset("digits").batches(10_000)).x
    with torch.no_grad():
        logits = module(torch.from_numpy(x)).double().numpy()
    for row in range(0, len(x), 7):
        j, expected = reference_certificate(logits[row], bound.margin_upper, 0.0)
        assert result.rows["predicted"][row] == j
        assert result.rows["radius"][row] <= expected * (1 + 1e-4) + 1e-9


class EditedRunner:
    """A model's runner whose outputs pass through ``edit(x, logits)`` (its other attributes are the runner's)."""

    def __init__(self, runner, edit):
        self.runner, self.edit = runner, edit

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def __call__(self, x):
        return self.edit(x, self.runner(x))


def test_reading_many_forward_batches_at_once_changes_no_row_and_no_forward_batch(tmp_path, monkeypatch):
    """gloro reads about READ_BYTES at once (certify/pipeline.py read_size) but runs the model and the slope
    check on ``batch_size`` samples at a time: the rows, the forward batches and the checked batches are those
    of a read per forward batch."""
    from glorocert.certify import pipeline

    model = load(save_as(make_model("chain"), "onnx", tmp_path))
    bound = compute_bound(model)
    sizes, checked = [], []
    model.runner = EditedRunner(model.runner, lambda x, logits: sizes.append(len(x)) or logits)
    check = pipeline.SlopeCheck.__call__
    monkeypatch.setattr(pipeline.SlopeCheck, "__call__", lambda self, batch, logits: checked.append(batch.index.copy())
                        or check(self, batch, logits))
    runs = []
    for read_bytes in (1, pipeline.READ_BYTES):  # 1 byte: one forward batch per read, as before reads grew
        monkeypatch.setattr(pipeline, "READ_BYTES", read_bytes)
        sizes.clear(), checked.clear()
        result = certify(model, "digits", [0.02, 0.05], bound=bound, batch_size=100)
        runs.append((result.rows, list(sizes), [c.tolist() for c in checked]))
    (one, one_sizes, one_checked), (many, many_sizes, many_checked) = runs
    assert pipeline.read_size(open_dataset("digits"), 100) > 100  # the second run did read several batches at once
    assert set(one) == set(many)
    for column in one:
        np.testing.assert_array_equal(one[column], many[column], err_msg=column)
    assert one_sizes == many_sizes and max(many_sizes) == 100 and sum(many_sizes) == len(one["index"])
    assert one_checked == many_checked


def test_an_error_in_a_later_forward_batch_of_a_read_names_its_own_row(tmp_path):
    """A read of several forward batches still reports the row at fault: a label out of range and a NaN logit in
    the third forward batch of one read, each found and named before any row is computed."""
    from glorocert.certify import pipeline

    model = load(save_as(make_model("chain"), "onnx", tmp_path))
    x = np.random.default_rng(0).random((300, *SHAPE), dtype=np.float32)
    y = np.zeros(300, np.int64)
    y[250] = 10
    np.savez(tmp_path / "labels.npz", x=x, y=y)
    data = open_dataset(tmp_path / "labels.npz")
    assert pipeline.read_size(data, 100) >= 300  # one read: the faults lie in its third forward batch
    with pytest.raises(GlorocertError, match=r"row 250 has label 10\b"):
        certify(model, data, [0.1], batch_size=100)
    y[250] = 0
    np.savez(tmp_path / "labels.npz", x=x, y=y)
    is_260 = lambda chunk: (chunk == x[260]).reshape(len(chunk), -1).all(axis=1)  # noqa: E731
    model.runner = EditedRunner(model.runner, lambda chunk, logits: np.where(is_260(chunk)[:, None], np.nan, logits))
    with pytest.raises(GlorocertError, match=r"NaN/inf on row 260\b"):
        certify(model, open_dataset(tmp_path / "labels.npz"), [0.1], batch_size=100)


# --------------------------------------------------------------------------- no certificate is broken


def pgd_l2(model: nn.Module, x: torch.Tensor, target: torch.Tensor, radius: torch.Tensor, *, steps=80, restarts=4, seed=0):
    """Untargeted l2 PGD on the margin y_target − max_{i≠target} y_i, inside balls of per-sample ``radius``.

    Returns the most damaging point found per sample (lowest margin over all steps and restarts).
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (-1,) + (1,) * (x.dim() - 1)
    r = radius.view(shape)
    best_margin = torch.full((len(x),), torch.inf, dtype=x.dtype)
    best_point = x.clone()

    def project(delta):
        norms = delta.flatten(1).norm(dim=1).view(shape).clamp_min(1e-30)
        return delta * torch.clamp(r / norms, max=1.0)

    def margins(points):
        logits = model(points)
        own = logits.gather(1, target[:, None]).squeeze(1)
        others = logits.masked_fill(nn.functional.one_hot(target, logits.shape[1]).bool(), -torch.inf).amax(dim=1)
        return own - others

    for _ in range(restarts):
        delta = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        delta = project(delta * r / delta.flatten(1).norm(dim=1).view(shape) * torch.rand(len(x), generator=gen, dtype=x.dtype).view(shape))
        step = 2.5 * r / steps
        for _ in range(steps):
            delta.requires_grad_(True)
            m = margins(x + delta)
            better = m.detach() < best_margin
            best_margin = torch.where(better, m.detach(), best_margin)
            best_point[better] = (x + delta).detach()[better]
            (grad,) = torch.autograd.grad(m.sum(), delta)
            direction = grad / grad.flatten(1).norm(dim=1).view(shape).clamp_min(1e-30)
            delta = project(delta.detach() - step * direction)
        with torch.no_grad():
            m = margins(x + delta)
            better = m < best_margin
            best_margin = torch.where(better, m, best_margin)
            best_point[better] = (x + delta)[better]
    return best_point, best_margin


def train_linear_classifier(epochs: int = 30) -> nn.Module:
    """Logistic regression on the 8×8 digits: its certificates are exact distances to the decision boundary."""
    torch.manual_seed(0)
    batch = next(open_dataset("digits", split="train").batches(10_000))
    x, y = torch.from_numpy(batch.x), torch.from_numpy(batch.y)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@pytest.fixture(scope="module", params=["convnet", "linear"])
def certified_digits(request, trained_digits_model, tmp_path_factory):
    """(torch module, loaded ONNX model, certify result on the digits test split, inputs) for two models:
    a small trained conv net, and a linear classifier whose certified radii are tight (so that an
    over-claim of even 1 % would be found by the attack)."""
    if request.param == "convnet":
        module, onnx_path, _ = trained_digits_model
    else:
        module = train_linear_classifier()
        onnx_path = save_as(module, "onnx", tmp_path_factory.mktemp("linear"), "linear")
    model = load(onnx_path)
    result = certify(model, "digits", [0.02, 0.05], bound=compute_bound(model))
    x = next(open_dataset("digits").batches(10_000)).x
    return request.param, module, model, result, x


def test_no_certified_sample_is_broken_by_pgd_inside_its_radius(certified_digits):
    _, module, model, result, x = certified_digits
    rows = result.rows
    attacked = rows["radius"] > 1e-4  # every sample with a non-trivial certificate, certified ones included
    assert rows["certified@0.02"].sum() >= 100 and attacked.sum() >= 150
    float64 = copy.deepcopy(module).double().eval()
    xs = torch.from_numpy(x[attacked]).double()
    target = torch.from_numpy(rows["predicted"][attacked]).long()
    radius = torch.from_numpy(rows["radius"][attacked]) * 0.999
    points, margin = pgd_l2(float64, xs, target, radius)
    distance = (points - xs).flatten(1).norm(dim=1)
    assert (distance <= radius * (1 + 1e-9)).all()
    assert (margin > 0).all(), f"{int((margin <= 0).sum())} certified samples broken inside their radius"
    native = model.runner(points.float().numpy()).argmax(axis=1)  # the runtime that certified them agrees
    assert (native == target.numpy()).all()


def test_the_attack_is_strong_enough_to_break_samples_beyond_their_radius(certified_digits):
    """Sanity check of the test above: the same PGD flips predictions once the ball is somewhat larger —
    just beyond the radius for the linear classifier (its certificates are tight), within 10× for the conv net."""
    kind, module, _, result, x = certified_digits
    rows = result.rows
    chosen = np.flatnonzero(rows["radius"] > 1e-4)[:60]
    factor = 1.02 if kind == "linear" else 10.0
    float64 = copy.deepcopy(module).double().eval()
    xs = torch.from_numpy(x[chosen]).double()
    target = torch.from_numpy(rows["predicted"][chosen]).long()
    _, margin = pgd_l2(float64, xs, target, factor * torch.from_numpy(rows["radius"][chosen]), steps=60, restarts=1)
    assert (margin <= 0).double().mean().item() >= 0.8


# --------------------------------------------------------------------------- formats, bounds, normalisation


def test_onnx_and_torchscript_versions_give_identical_rows(trained_digits_model):
    _, onnx_path, torchscript_path = trained_digits_model
    models, results = [], []
    for path in (onnx_path, torchscript_path):
        model = load(path, input_shape=SHAPE)
        bound = compute_bound(model)
        models.append((model, bound))
        results.append(certify(model, "digits", [0.02, 0.05], bound=bound))
    a, b = (r.rows for r in results)
    for column in ("index", "label", "predicted", "correct", "bottom@0.02", "bottom@0.05", "certified@0.02", "certified@0.05"):
        np.testing.assert_array_equal(a[column], b[column], err_msg=column)
    # The radii differ only by what each runtime's rounding allows: float32 logits differing in the last bits, and
    # each model's rounding budget (raised to 4× the IR/native gap it measured on this machine: onnxruntime's and
    # TorchScript's gaps differ), both divided by K.
    (onnx_model, onnx_bound), (ts_model, ts_bound) = models
    np.testing.assert_array_equal(onnx_bound.margin_matrix, ts_bound.margin_matrix)
    k = np.asarray(onnx_bound.margin_matrix)
    x = np.concatenate([batch.x for batch in open_dataset("digits").batches(512)])
    largest = np.abs(np.asarray(onnx_model.runner(x), np.float64)).max(axis=1)
    explained = (abs(onnx_model.rounding_rtol - ts_model.rounding_rtol) * (1 + largest) + np.abs(a["margin"] - b["margin"])
                 + 1e-6 * np.abs(a["margin"])) / k[k > 0].min()
    assert (np.abs(a["radius"] - b["radius"]) <= explained + 1e-12).all()
    assert results[0].summary["vra"] == results[1].summary["vra"]


def test_stale_bound_from_another_model_is_refused(tmp_path):
    first = load(save_as(make_model("chain", seed=0), "onnx", tmp_path, "first"))
    second = load(save_as(make_model("chain", seed=1), "onnx", tmp_path, "second"))
    stale = compute_bound(first).save(tmp_path / "first.bound.json")
    with pytest.raises(GlorocertError, match="another model"):
        certify(second, "digits", [0.1], bound=stale)
    shutil.copy(stale, default_path(second.path))  # a stale file next to the model is refused as well
    with pytest.raises(GlorocertError, match="another model"):
        certify(second, "digits", [0.1])


def test_bound_computed_without_normalisation_is_refused_for_normalised_data(tmp_path):
    model = load(save_as(make_model("chain"), "onnx", tmp_path))
    plain = compute_bound(model)
    normalised = compute_bound(model, normalization=Normalization.of(0.5, 0.25))
    data = open_dataset("digits", mean=0.5, std=0.25, limit=20)
    with pytest.raises(GlorocertError, match="normalisation"):
        certify(model, data, [0.1], bound=plain)
    with pytest.raises(GlorocertError, match="normalisation"):
        certify(model, open_dataset("digits", limit=20), [0.1], bound=normalised)
    certify(model, data, [0.1], bound=normalised)  # the matching pair is accepted


def test_normalisation_outside_the_model_certifies_the_same_radii_as_inside(tmp_path):
    """ε is in [0,1] pixel space either way: the folded 1/std factor must not be forgotten."""
    torch.manual_seed(0)
    outside = make_model("chain", seed=4)
    inside = nn.Sequential(Normalize(0.4, 0.2), copy.deepcopy(outside)).eval()
    model_in = load(save_as(inside, "onnx", tmp_path, "inside"))
    model_out = load(save_as(outside, "onnx", tmp_path, "outside"))
    r_in = certify(model_in, open_dataset("digits", limit=80), [0.01], bound=compute_bound(model_in)).rows
    data = open_dataset("digits", limit=80, mean=0.4, std=0.2)
    assert data.normalization == Normalization.of(0.4, 0.2)
    r_out = certify(model_out, data, [0.01], bound=compute_bound(model_out, normalization=data.normalization)).rows
    np.testing.assert_array_equal(r_in["predicted"], r_out["predicted"])
    np.testing.assert_allclose(r_in["radius"], r_out["radius"], rtol=1e-4)


def test_estimate_mode_is_labelled_in_the_summary(tmp_path):
    model = load(save_as(make_model("chain"), "onnx", tmp_path))
    estimate = compute_bound(model, mode="estimate")
    result = certify(model, "digits", [0.05], bound=estimate)
    assert result.summary["bound_mode"] == "estimate" and result.bound.mode == "estimate"
    assert estimate.lipschitz == estimate.global_estimate <= estimate.global_upper
