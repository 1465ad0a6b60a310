"""Randomized smoothing: CERTIFY / PREDICT / soft-RS against closed forms on linear classifiers.

For a linear base classifier whose logits depend on x only through u = w·x + b,
u(x + η) ~ N(u(x), (σ‖w‖)²), so every P(f(x + η) = c) is a Gaussian CDF and the
certifier's output can be compared with the exact smoothed quantities.
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.stats import beta as beta_distribution
from scipy.stats import binom, norm
from statsmodels.stats.proportion import proportion_confint

from glorocert.certify.smoothing import (
    ABSTAIN,
    ROW_COLUMNS,
    Smooth,
    bernstein_lower,
    certify_batches,
    check_parameters,
    clopper_pearson_lower,
    hoeffding_lower,
    max_certifiable_radius,
)
from glorocert.errors import GlorocertError

SIGMA = 0.5
W = torch.tensor([0.6, -0.8, 0.0, 0.0])  # ‖w‖ = 1: u(x) is the signed distance to the boundary u = 0
B = -0.1


def projection(x: torch.Tensor) -> torch.Tensor:
    return x @ W + B


def binary_forward(x: torch.Tensor) -> torch.Tensor:
    """f(x) = 1 if w·x + b > 0 else 0."""
    u = projection(x)
    return torch.stack([-u / 2, u / 2], dim=1)


def three_class_forward(x: torch.Tensor) -> torch.Tensor:
    """Logits (−u − 1, 0, u − 1): class 0 for u < −1, class 1 for |u| < 1, class 2 for u > 1."""
    u = projection(x)
    return torch.stack([-u - 1, torch.zeros_like(u), u - 1], dim=1)


def point_at(u: float) -> torch.Tensor:
    """An input in [0, 1]^4 with w·x + b = u."""
    base = torch.tensor([0.5, 0.5, 0.3, 0.7])
    return base + (u - float(projection(base[None])[0])) * W / W.dot(W)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def p_binary_top(u: float) -> float:
    return norm.cdf(abs(u) / SIGMA)


def p_three_class_middle(u: float) -> float:
    return norm.cdf((1 - u) / SIGMA) - norm.cdf((-1 - u) / SIGMA)


# --------------------------------------------------------------------------- CERTIFY against the closed form


def test_certify_radius_approaches_the_analytic_radius_of_a_linear_classifier():
    u = 0.45
    analytic = abs(u)  # σ Φ⁻¹(Φ(|u| / σ‖w‖)) = |w·x + b| / ‖w‖
    smooth = Smooth(binary_forward, num_classes=2, sigma=SIGMA, batch_size=10_000)
    predicted, radius = smooth.certify(point_at(u), n0=100, n=100_000, alpha=0.001, generator=generator(0))
    assert predicted == 1
    assert analytic - 0.02 < radius <= analytic


def test_certify_radius_approaches_sigma_phi_inverse_p_a_for_three_classes():
    u = 0.2
    analytic = SIGMA * norm.ppf(p_three_class_middle(u))
    smooth = Smooth(three_class_forward, num_classes=3, sigma=SIGMA, batch_size=10_000)
    predicted, radius = smooth.certify(point_at(u), n0=100, n=100_000, alpha=0.001, generator=generator(1))
    assert predicted == 1
    assert analytic - 0.02 < radius <= analytic


@pytest.mark.parametrize(
    ("forward", "num_classes", "u", "p_top"),
    [
        (binary_forward, 2, 0.4, p_binary_top(0.4)),
        (three_class_forward, 3, -0.3, p_three_class_middle(-0.3)),
    ],
    ids=["binary", "three-class"],
)
def test_certify_overclaims_the_analytic_radius_in_at_most_alpha_of_runs(forward, num_classes, u, p_top):
    alpha, runs = 0.1, 200
    analytic = SIGMA * norm.ppf(p_top)
    smooth = Smooth(forward, num_classes=num_classes, sigma=SIGMA)
    x = point_at(u)
    radii = np.array([smooth.certify(x, n0=20, n=300, alpha=alpha, generator=generator(seed))[1] for seed in range(runs)])
    overclaims = int((radii > analytic).sum())
    assert overclaims <= binom.ppf(1 - 1e-4, runs, alpha)  # a sound certifier fails this with prob < 1e-4
    assert radii.mean() > 0.7 * analytic  # and the test is not passed by abstaining


def test_certify_abstains_when_no_class_has_probability_above_one_half():
    smooth = Smooth(binary_forward, num_classes=2, sigma=SIGMA)
    assert smooth.certify(point_at(0.0), n0=100, n=2000, alpha=0.001, generator=generator(2)) == (ABSTAIN, 0.0)


def test_noise_is_drawn_in_batches_not_per_sample():
    calls = []

    def counting_forward(x):
        calls.append(x.shape[0])
        return binary_forward(x)

    smooth = Smooth(counting_forward, num_classes=2, sigma=SIGMA, batch_size=400)
    smooth.certify(point_at(0.3), n0=100, n=1000, alpha=0.001, generator=generator(3))
    assert calls == [100, 400, 400, 200]


def test_certify_is_reproducible_from_the_generator_seed():
    smooth = Smooth(three_class_forward, num_classes=3, sigma=SIGMA, batch_size=128)
    first = smooth.certify(point_at(0.1), n0=50, n=500, alpha=0.01, generator=generator(7))
    second = smooth.certify(point_at(0.1), n0=50, n=500, alpha=0.01, generator=generator(7))
    assert first == second


def test_bad_inputs_and_logit_shapes_raise_user_errors():
    smooth = Smooth(binary_forward, num_classes=3, sigma=SIGMA)
    with pytest.raises(GlorocertError, match="forward returned shape"):
        smooth.certify(point_at(0.3), n0=10, n=100, alpha=0.01, generator=generator(0))
    smooth = Smooth(binary_forward, num_classes=2, sigma=SIGMA)
    with pytest.raises(GlorocertError, match="NaN"):
        smooth.certify(torch.full((4,), float("nan")), n0=10, n=100, alpha=0.01, generator=generator(0))
    with pytest.raises(GlorocertError, match="sigma"):
        Smooth(binary_forward, num_classes=2, sigma=0.0)


# --------------------------------------------------------------------------- PREDICT


def test_predict_abstains_on_the_decision_boundary_in_at_least_one_minus_alpha_of_runs():
    alpha, runs = 0.05, 40
    smooth = Smooth(binary_forward, num_classes=2, sigma=SIGMA)
    answers = [smooth.predict(point_at(0.0), n=1000, alpha=alpha, generator=generator(seed)) for seed in range(runs)]
    assert answers.count(ABSTAIN) >= runs - binom.ppf(1 - 1e-4, runs, alpha)


def test_predict_returns_the_smoothed_class_away_from_the_boundary():
    smooth = Smooth(three_class_forward, num_classes=3, sigma=SIGMA)
    assert smooth.predict(point_at(0.0), n=1000, alpha=0.001, generator=generator(0)) == 1
    assert smooth.predict(point_at(2.0), n=1000, alpha=0.001, generator=generator(0)) == 2


# --------------------------------------------------------------------------- confidence bounds


@pytest.mark.parametrize(("successes", "trials"), [(1, 10), (5, 10), (37, 50), (990, 1000), (99_000, 100_000)])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_clopper_pearson_lower_matches_the_beta_quantile_and_statsmodels(successes, trials, alpha):
    reference = beta_distribution.ppf(alpha, successes, trials - successes + 1)
    assert clopper_pearson_lower(successes, trials, alpha) == pytest.approx(reference, rel=1e-12)
    cohen = proportion_confint(successes, trials, alpha=2 * alpha, method="beta")[0]
    assert clopper_pearson_lower(successes, trials, alpha) == pytest.approx(cohen, rel=1e-10)


def test_clopper_pearson_lower_known_values():
    assert clopper_pearson_lower(0, 100, 0.001) == 0.0
    for trials in (1, 10, 1000):
        assert clopper_pearson_lower(trials, trials, 0.001) == pytest.approx(0.001 ** (1 / trials), rel=1e-12)
    assert clopper_pearson_lower(1, 1, 0.05) == pytest.approx(0.05)
    assert clopper_pearson_lower(5, 10, 0.025) == pytest.approx(0.187086, abs=1e-6)  # exact 95% CI of 5/10


def test_hoeffding_and_bernstein_lower_follow_the_macer_formulas():
    mean, var, n, alpha = 0.83, 0.02, 5000, 0.001
    assert hoeffding_lower(mean, n, alpha) == pytest.approx(mean - math.sqrt(-math.log(alpha) / (2 * n)), rel=1e-14)
    expected = mean - math.sqrt(2 * var * math.log(2 / alpha) / n) - 7 * math.log(2 / alpha) / (3 * (n - 1))
    assert bernstein_lower(mean, var, n, alpha) == pytest.approx(expected, rel=1e-14)
    assert hoeffding_lower(0.01, 10, alpha) == 0.0  # clipped: the mean of [0, 1] values is never negative
    assert bernstein_lower(mean, 0.001, n, alpha) > hoeffding_lower(mean, n, alpha)  # tighter at small variance


@pytest.mark.parametrize("bound", ["hoeffding", "bernstein"])
def test_hoeffding_and_bernstein_lower_bounds_cover_the_true_mean(bound):
    alpha, runs, n = 0.1, 2000, 100
    a, b = 8.0, 2.0  # Beta(8, 2) on [0, 1], mean 0.8
    true_mean = a / (a + b)
    samples = np.random.default_rng(0).beta(a, b, size=(runs, n))
    means, variances = samples.mean(axis=1), samples.var(axis=1, ddof=1)
    if bound == "hoeffding":
        lowers = np.array([hoeffding_lower(m, n, alpha) for m in means])
    else:
        lowers = np.array([bernstein_lower(m, v, n, alpha) for m, v in zip(means, variances)])
    failures = int((lowers > true_mean).sum())
    assert failures <= binom.ppf(1 - 1e-4, runs, alpha)
    assert lowers.mean() > 0.5  # not vacuous


# --------------------------------------------------------------------------- parameter checks


def test_check_parameters_rejects_sample_sizes_that_can_never_certify():
    # alpha ** (1/n) > 1/2 needs n > log2(1/alpha) ≈ 9.97 at alpha = 0.001: n = 9 can never certify.
    with pytest.raises(GlorocertError, match=r"n=9 .*never certify.*n >= 10"):
        check_parameters(100, 9, 0.001)
    check_parameters(100, 10, 0.001)  # 0.001 ** 0.1 = 0.5012 > 1/2: a (tiny) radius is possible
    check_parameters(100, 100_000, 0.001)
    with pytest.raises(GlorocertError, match="hoeffding"):
        check_parameters(100, 13, 0.001, bound="hoeffding")
    with pytest.raises(GlorocertError, match="alpha"):
        check_parameters(100, 1000, 0.0)


def test_max_certifiable_radius_is_the_all_votes_radius():
    assert max_certifiable_radius(100_000, 0.001, 0.25) == pytest.approx(0.25 * norm.ppf(0.001 ** 1e-5))
    assert max_certifiable_radius(9, 0.001, 0.25) == 0.0
    smooth = Smooth(binary_forward, num_classes=2, sigma=0.25)
    _, radius = smooth.certify(point_at(3.0), n0=10, n=1000, alpha=0.001, generator=generator(0))
    assert radius == max_certifiable_radius(1000, 0.001, 0.25)


# --------------------------------------------------------------------------- soft smoothing


def expected_soft_score(u: float, beta: float) -> float:
    """E[sigmoid(β (u + σ Z))] = E[softmax(β · binary logits)_1] by quadrature."""
    value, _ = integrate.quad(lambda z: norm.pdf(z) / (1 + math.exp(-beta * (u + SIGMA * z))), -12, 12, limit=200)
    return value


@pytest.mark.parametrize("bound", ["hoeffding", "bernstein"])
def test_certify_soft_radius_approaches_sigma_phi_inverse_of_the_expected_soft_score(bound):
    u, beta = 0.45, 4.0
    analytic = SIGMA * norm.ppf(expected_soft_score(u, beta))
    smooth = Smooth(binary_forward, num_classes=2, sigma=SIGMA, batch_size=10_000)
    predicted, radius = smooth.certify_soft(
        point_at(u), n0=100, n=100_000, alpha=0.001, beta=beta, bound=bound, generator=generator(0)
    )
    assert predicted == 1
    assert analytic - 0.03 < radius <= analytic


@pytest.mark.parametrize("bound", ["hoeffding", "bernstein"])
def test_certify_soft_overclaims_in_at_most_alpha_of_runs(bound):
    u, beta, alpha, runs = 0.5, 16.0, 0.1, 100
    analytic = SIGMA * norm.ppf(expected_soft_score(u, beta))
    smooth = Smooth(binary_forward, num_classes=2, sigma=SIGMA)
    radii = np.array([
        smooth.certify_soft(point_at(u), n0=20, n=500, alpha=alpha, beta=beta, bound=bound, generator=generator(s))[1]
        for s in range(runs)
    ])
    assert int((radii > analytic).sum()) <= binom.ppf(1 - 1e-4, runs, alpha)
    assert radii.mean() > 0.5 * analytic


# --------------------------------------------------------------------------- a whole dataset


def dataset_batches(points: np.ndarray, labels: np.ndarray | None, batch_size: int = 3):
    for start in range(0, len(points), batch_size):
        stop = start + batch_size
        yield np.arange(start, min(stop, len(points))), points[start:stop], None if labels is None else labels[start:stop]


def test_certify_batches_resumed_run_gives_the_same_rows_as_one_full_run():
    us = [-0.6, -0.2, 0.0, 0.1, 0.35, 0.8, -1.0, 0.5]
    points = torch.stack([point_at(u) for u in us]).numpy()
    labels = np.array([0, 0, 1, 1, 1, 0, 0, 1])
    smooth = Smooth(binary_forward, num_classes=2, sigma=SIGMA, batch_size=64)
    settings = dict(n0=20, n=200, alpha=0.01, seed=5)

    streamed = []
    full = certify_batches(smooth, dataset_batches(points, labels), on_row=streamed.append, **settings)
    first_half = set(range(4))
    part_one = certify_batches(smooth, dataset_batches(points, labels), skip_indices=set(range(4, 8)), **settings)
    part_two = certify_batches(smooth, dataset_batches(points, labels), skip_indices=first_half, **settings)

    assert set(full) == set(ROW_COLUMNS)
    assert [row["index"] for row in streamed] == list(range(8))
    for column in ROW_COLUMNS:
        if column != "seconds":
            np.testing.assert_array_equal(np.concatenate([part_one[column], part_two[column]]), full[column])
    assert np.all(full["radius"][full["abstain"]] == 0.0)
    assert np.all(full["predicted"][full["abstain"]] == ABSTAIN)
    assert np.array_equal(full["correct"], (full["predicted"] == labels) & ~full["abstain"])
    assert np.all(full["seconds"] > 0)


def test_certify_batches_without_labels_and_with_bad_labels():
    points = torch.stack([point_at(0.5), point_at(-0.5)]).numpy()
    smooth = Smooth(binary_forward, num_classes=2, sigma=SIGMA)
    rows = certify_batches(smooth, dataset_batches(points, None), n0=10, n=100, alpha=0.01, seed=0)
    assert rows["label"].tolist() == [-1, -1] and not rows["correct"].any()
    with pytest.raises(GlorocertError, match="label 7"):
        certify_batches(smooth, dataset_batches(points, np.array([0, 7])), n0=10, n=100, alpha=0.01, seed=0)
    with pytest.raises(GlorocertError, match="never certify"):
        certify_batches(smooth, dataset_batches(points, None), n0=10, n=9, alpha=0.001, seed=0)
