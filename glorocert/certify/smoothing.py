"""Randomized smoothing: Cohen et al. (2019) CERTIFY / PREDICT, and soft smoothing (MACER, App. A).

The smoothed classifier of a base classifier ``f`` is

    g(x) = argmax_c  P_η( f(x + η) = c ),      η ~ N(0, σ² I),

and Cohen et al.'s Theorem 1 says: if ``p_A ≤ P(f(x + η) = c_A)`` with ``p_A > 1/2``,
then ``g(x + δ) = c_A`` for every ``‖δ‖₂ < σ · Φ⁻¹(p_A)``. The probabilities are
unknown, so CERTIFY estimates them by Monte Carlo and replaces ``p_A`` by a
one-sided confidence lower bound; the certificate then holds *with probability
at least 1 − α over the noise drawn by the certifier*, not with certainty.

Soft smoothing (MACER, Definition 2 and Theorem 2) replaces the vote
``1{f(x + η) = c}`` by the softmax score ``z^c(x + η) = softmax(β · logits)_c``:

    g̃(x) = argmax_c  E_η[ z^c(x + η) ],

and the same radius ``σ · Φ⁻¹(z_A)`` holds for a lower bound ``z_A`` on the top
class's expected score (MACER eq. 20, using ``z_B ≤ 1 − z_A``). It certifies
``g̃``, a different classifier from ``g``; the two agree as β → ∞.

Conventions shared by every function here:

- Inputs live in [0, 1] pixel space and the noise is added there; any input
  normalisation is part of ``forward`` (its first layer).
- ``forward`` must be deterministic (``model.eval()``): the guarantee is about
  the function it computes, and resumed runs must reproduce earlier rows.
- Probabilities and radii are float64 and never rounded; writers that shorten
  a radius must round it *down*.
- Ties go against certification: a lower bound of exactly 1/2 abstains.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch

from glorocert.errors import GlorocertError

ABSTAIN = -1
"""Class returned when the smoothed classifier does not commit to a prediction."""

BOUNDS = ("clopper-pearson", "hoeffding", "bernstein")
"""Confidence bounds on p_A: Clopper–Pearson for hard votes, Hoeffding / empirical Bernstein for soft scores."""


# --------------------------------------------------------------------------- confidence bounds


def _stats():
    """scipy.stats, imported on first use: importing it costs every command that merely loads glorocert (and every
    spawned compare-local child) about 0.5 s and 60 MiB."""
    import scipy.stats

    return scipy.stats


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided Clopper–Pearson lower confidence bound on a binomial proportion.

    Guarantee: if ``successes ~ Binomial(trials, p)``, then with probability at
    least ``1 − alpha`` the returned value is ``≤ p``. It is the α-quantile of
    Beta(k, n − k + 1), i.e. the lower end of the two-sided ``1 − 2α`` interval
    ``proportion_confint(k, n, alpha=2α, method="beta")`` used by Cohen et al.;
    0 when ``k = 0`` and ``alpha ** (1 / n)`` when ``k = n``.
    """
    _check_alpha(alpha)
    if not (isinstance(trials, (int, np.integer)) and trials >= 1):
        raise GlorocertError(f"trials must be a positive integer, got {trials!r}")
    if not (0 <= successes <= trials):
        raise GlorocertError(f"successes must lie in [0, {trials}], got {successes!r}")
    if successes == 0:
        return 0.0
    return float(_stats().beta.ppf(alpha, successes, trials - successes + 1))


def hoeffding_lower(mean: float, n: int, alpha: float) -> float:
    """Hoeffding lower confidence bound on the mean of i.i.d. values in [0, 1] (MACER eq. 23).

    Guarantee: if ``mean`` is the average of ``n`` independent draws of a
    random variable with values in [0, 1] and expectation ``μ``, then with
    probability at least ``1 − alpha`` the returned value
    ``max(0, mean − sqrt(ln(1/α) / (2n)))`` is ``≤ μ``.
    """
    _check_alpha(alpha)
    _check_sample_size(n, minimum=1)
    return max(0.0, float(mean) - math.sqrt(math.log(1.0 / alpha) / (2.0 * n)))


def bernstein_lower(mean: float, var: float, n: int, alpha: float) -> float:
    """Empirical Bernstein lower confidence bound (Maurer & Pontil 2009, Thm 4; MACER eq. 26).

    Guarantee: if ``mean`` and ``var`` are the sample mean and the *unbiased*
    sample variance (denominator ``n − 1``) of ``n ≥ 2`` independent draws of a
    random variable with values in [0, 1] and expectation ``μ``, then with
    probability at least ``1 − alpha`` the returned value

        max(0, mean − sqrt(2 var ln(2/α) / n) − 7 ln(2/α) / (3 (n − 1)))

    is ``≤ μ``. Tighter than Hoeffding when the variance is small.
    """
    _check_alpha(alpha)
    _check_sample_size(n, minimum=2)
    if not var >= 0.0:
        raise GlorocertError(f"sample variance must be non-negative, got {var!r}")
    log_term = math.log(2.0 / alpha)
    width = math.sqrt(2.0 * var * log_term / n) + 7.0 * log_term / (3.0 * (n - 1))
    return max(0.0, float(mean) - width)


def _best_case_lower(n: int, alpha: float, bound: str) -> float:
    """The largest lower bound on p_A that ``n`` samples can ever give (all votes / scores equal to 1)."""
    if bound == "clopper-pearson":
        return clopper_pearson_lower(n, n, alpha)
    if bound == "hoeffding":
        return hoeffding_lower(1.0, n, alpha)
    if bound == "bernstein":
        return bernstein_lower(1.0, 0.0, n, alpha) if n >= 2 else 0.0
    raise GlorocertError(f"unknown bound {bound!r}; choose one of {', '.join(BOUNDS)}")


def _smallest_certifying_n(alpha: float, bound: str) -> int:
    """Smallest n whose best-case lower bound exceeds 1/2 (closed form, then checked on the real function)."""
    if bound == "clopper-pearson":  # alpha ** (1/n) > 1/2  <=>  n > log2(1/alpha)
        n = math.floor(math.log2(1.0 / alpha)) + 1
    elif bound == "hoeffding":  # sqrt(ln(1/alpha) / 2n) < 1/2  <=>  n > 2 ln(1/alpha)
        n = math.floor(2.0 * math.log(1.0 / alpha)) + 1
    else:  # 7 ln(2/alpha) / 3(n-1) < 1/2  <=>  n > 1 + 14 ln(2/alpha) / 3
        n = math.floor(1.0 + 14.0 * math.log(2.0 / alpha) / 3.0) + 1
    n = max(n - 2, 1)
    while _best_case_lower(n, alpha, bound) <= 0.5:  # guards the closed form against float edges
        n += 1
    return n


def check_parameters(n0: int, n: int, alpha: float, *, bound: str = "clopper-pearson") -> None:
    """Refuse sample sizes and confidence levels that can never certify anything.

    Even when all ``n`` estimation samples vote for (or score 1 on) the top
    class, the lower bound on p_A is at most ``alpha ** (1/n)`` (Clopper–Pearson;
    Hoeffding and empirical Bernstein are looser). If that is ≤ 1/2, CERTIFY
    abstains on every input, so this raises :class:`GlorocertError` naming the
    smallest ``n`` that could certify at this ``alpha``. ``bound`` is the
    confidence bound the run will use (see :data:`BOUNDS`).
    """
    _check_sample_size(n0, minimum=1, name="n0")
    _check_sample_size(n, minimum=1)
    _check_alpha(alpha)
    best = _best_case_lower(n, alpha, bound)
    if best <= 0.5:
        n_min = _smallest_certifying_n(alpha, bound)
        raise GlorocertError(
            f"n={n} noise samples at alpha={alpha} can never certify: even if all {n} samples favour the "
            f"top class, the {bound} lower bound on p_A is {best:.4f} <= 1/2; use n >= {n_min} "
            f"(or a larger alpha)"
        )


def max_certifiable_radius(n: int, alpha: float, sigma: float, *, bound: str = "clopper-pearson") -> float:
    """The largest radius CERTIFY can return with ``n`` samples: ``σ · Φ⁻¹(best-case lower bound)``, 0 if ≤ 1/2.

    With Clopper–Pearson the best case is all ``n`` votes for the top class,
    giving ``σ · Φ⁻¹(alpha ** (1/n))``; no input, however robust, gets more.
    """
    _check_sigma(sigma)
    _check_sample_size(n, minimum=1)
    best = _best_case_lower(n, alpha, bound)
    return sigma * float(_stats().norm.ppf(best)) if best > 0.5 else 0.0


# --------------------------------------------------------------------------- the smoothed classifier


class Smooth:
    """The Gaussian-smoothed version g of a base classifier f (Cohen et al., 2019).

    ``forward`` maps a float32 batch ``(N, *shape)`` of inputs in [0, 1] pixel
    space to logits ``(N, num_classes)``; the base classifier is
    ``f(x) = argmax forward(x)`` (first index on ties). Noise ``N(0, σ² I)`` is
    added in the same [0, 1] space, on ``device``, in batches of at most
    ``batch_size`` noisy copies drawn into one reused buffer.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        num_classes: int,
        sigma: float,
        batch_size: int = 1000,
        device: str = "cpu",
    ):
        if not (isinstance(num_classes, (int, np.integer)) and num_classes >= 2):
            raise GlorocertError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        _check_sigma(sigma)
        _check_sample_size(batch_size, minimum=1, name="batch_size")
        self.forward = forward
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self._noise_buffer = torch.empty(0)

    # ---------------------------------------------------------------- CERTIFY / PREDICT

    def certify(
        self, x: torch.Tensor, n0: int, n: int, alpha: float, generator: torch.Generator
    ) -> tuple[int, float]:
        """Cohen et al.'s CERTIFY: a class and an l2 radius for g at ``x`` (``x`` has no batch dimension).

        Guarantee: with probability at least ``1 − alpha`` over the noise drawn
        here, if the result is ``(c, R)`` with ``c ≠ ABSTAIN`` then
        ``g(x + δ) = c`` for every ``‖δ‖₂ < R``. Assumes ``forward`` is
        deterministic and ``generator`` is not shared with anything that could
        make the noise depend on the input. Returns ``(ABSTAIN, 0.0)`` when the
        lower bound on p_A is not above 1/2.
        """
        _check_sample_size(n0, minimum=1, name="n0")
        _check_sample_size(n, minimum=1)
        _check_alpha(alpha)
        x = self._prepare(x, generator)
        c_hat = int(self._count_votes(x, n0, generator).argmax())  # selection: n0 samples
        n_a = int(self._count_votes(x, n, generator)[c_hat])  # estimation: n fresh samples
        p_a_lower = clopper_pearson_lower(n_a, n, alpha)
        if p_a_lower <= 0.5:
            return ABSTAIN, 0.0
        return c_hat, self.sigma * float(_stats().norm.ppf(p_a_lower))

    def predict(self, x: torch.Tensor, n: int, alpha: float, generator: torch.Generator) -> int:
        """Cohen et al.'s PREDICT: g(x) or ABSTAIN, from ``n`` noisy samples.

        Guarantee: with probability at least ``1 − alpha`` over the noise, the
        result is either ABSTAIN or g(x). It abstains unless a two-sided
        binomial test rejects "the top two classes are equally likely" at
        level ``alpha`` (so a point on a decision boundary abstains with
        probability at least ``1 − alpha``).
        """
        _check_sample_size(n, minimum=1)
        _check_alpha(alpha)
        x = self._prepare(x, generator)
        counts = self._count_votes(x, n, generator)
        top2 = np.argsort(counts, kind="stable")[::-1][:2]
        count1, count2 = int(counts[top2[0]]), int(counts[top2[1]])
        if _stats().binomtest(count1, count1 + count2, p=0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2[0])

    # ---------------------------------------------------------------- soft smoothing (MACER Algorithm 2)

    def certify_soft(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        beta: float,
        bound: str = "hoeffding",
        *,
        generator: torch.Generator,
    ) -> tuple[int, float]:
        """MACER's soft-RS certification (Algorithm 2): a class and an l2 radius for g̃ at ``x``.

        g̃(x) = argmax_c E_η[softmax(β · forward(x + η))_c]. The top class ĉ is
        chosen from the mean scores of ``n0`` samples; the mean (and, for
        ``bound="bernstein"``, the unbiased variance) of ĉ's score over ``n``
        fresh samples gives a lower bound z_A on E[z^ĉ] by Hoeffding or the
        empirical Bernstein inequality.

        Guarantee: with probability at least ``1 − alpha`` over the noise, if
        the result is ``(c, R)`` with ``c ≠ ABSTAIN`` then ``g̃(x + δ) = c`` for
        every ``‖δ‖₂ < R = σ · Φ⁻¹(z_A)`` (MACER eq. 20: the top-2 radius
        ``σ/2 · [Φ⁻¹(z_A) − Φ⁻¹(z_B)]`` with ``z_B ≤ 1 − z_A``). This certifies
        the *soft* smoothed classifier, not Cohen's g. Abstains when z_A ≤ 1/2.
        """
        _check_sample_size(n0, minimum=1, name="n0")
        _check_sample_size(n, minimum=2 if bound == "bernstein" else 1)
        _check_alpha(alpha)
        if bound not in ("hoeffding", "bernstein"):
            raise GlorocertError(f"soft smoothing bound must be 'hoeffding' or 'bernstein', got {bound!r}")
        if not (math.isfinite(beta) and beta > 0):
            raise GlorocertError(f"beta (softmax inverse temperature) must be positive, got {beta!r}")
        x = self._prepare(x, generator)
        first_moment, _ = self._soft_moments(x, n0, beta, generator)
        c_hat = int(first_moment.argmax())
        first_moment, second_moment = self._soft_moments(x, n, beta, generator)
        z_a_mean = float(first_moment[c_hat]) / n
        if bound == "hoeffding":
            z_a_lower = hoeffding_lower(z_a_mean, n, alpha)
        else:  # MACER eq. 25, clamped at 0 against cancellation
            z_a_var = max(0.0, (float(second_moment[c_hat]) - float(first_moment[c_hat]) ** 2 / n) / (n - 1))
            z_a_lower = bernstein_lower(z_a_mean, z_a_var, n, alpha)
        if z_a_lower <= 0.5:
            return ABSTAIN, 0.0
        return c_hat, self.sigma * float(_stats().norm.ppf(z_a_lower))

    # ---------------------------------------------------------------- sampling under noise

    def _prepare(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Move one input to the device as float32, refusing NaN/inf and a generator on another device."""
        if not isinstance(generator, torch.Generator):
            raise GlorocertError("a torch.Generator is required: the noise must be seeded to be reproducible")
        if generator.device.type != self.device.type:
            raise GlorocertError(f"generator is on {generator.device}, but the noise is drawn on {self.device}")
        x = torch.as_tensor(x).to(device=self.device, dtype=torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise GlorocertError("input contains NaN or inf values")
        return x

    def _noisy_batches(self, x: torch.Tensor, num: int, generator: torch.Generator):
        """Yield ``num`` noisy copies ``x + η`` in batches of at most ``batch_size``, in one reused buffer.

        Each yielded batch is overwritten by the next one: use it before asking for more.
        """
        shape = (self.batch_size, *x.shape)
        if self._noise_buffer.shape != shape or self._noise_buffer.device != x.device:
            self._noise_buffer = torch.empty(shape, dtype=torch.float32, device=x.device)
        remaining = num
        while remaining > 0:
            batch = self._noise_buffer[: min(self.batch_size, remaining)]
            batch.normal_(0.0, self.sigma, generator=generator).add_(x)
            remaining -= batch.shape[0]
            yield batch

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self.forward(batch)
        if logits.ndim != 2 or logits.shape != (batch.shape[0], self.num_classes):
            raise GlorocertError(
                f"forward returned shape {tuple(logits.shape)}, expected ({batch.shape[0]}, {self.num_classes})"
            )
        if not bool(torch.isfinite(logits).all()):
            raise GlorocertError("forward returned NaN or inf logits on a noisy input")
        return logits

    def _count_votes(self, x: torch.Tensor, num: int, generator: torch.Generator) -> np.ndarray:
        """How often f(x + η) = c for each class c, over ``num`` noise draws (Cohen's ``_sample_noise``)."""
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=self.device)
        with torch.no_grad():
            for batch in self._noisy_batches(x, num, generator):
                counts += torch.bincount(self._logits(batch).argmax(dim=1), minlength=self.num_classes)
        return counts.cpu().numpy()

    def _soft_moments(
        self, x: torch.Tensor, num: int, beta: float, generator: torch.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sums of z(x + η) and z(x + η)² per class over ``num`` draws, z = softmax(β · logits), in float64.

        MACER's SAMPLEUNDERNOISE: the first and second sample moments (unnormalised).
        """
        first = torch.zeros(self.num_classes, dtype=torch.float64, device=self.device)
        second = torch.zeros_like(first)
        with torch.no_grad():
            for batch in self._noisy_batches(x, num, generator):
                scores = torch.softmax(beta * self._logits(batch).double(), dim=1)
                first += scores.sum(dim=0)
                second += scores.square().sum(dim=0)
        return first.cpu().numpy(), second.cpu().numpy()


# --------------------------------------------------------------------------- a whole dataset

ROW_COLUMNS = ("index", "label", "predicted", "radius", "correct", "abstain", "seconds")
_ROW_DTYPES = (np.int64, np.int64, np.int64, np.float64, np.bool_, np.bool_, np.float64)


def sample_generator(seed: int, index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The noise generator of dataset sample ``index``: depends only on (seed, index), so runs can resume."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + int(index)) % 2**63)


def certify_batches(
    smooth: Smooth,
    batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    *,
    n0: int,
    n: int,
    alpha: float,
    seed: int,
    on_row: Callable[[dict], None] | None = None,
    skip_indices: set[int] = frozenset(),
) -> dict[str, np.ndarray]:
    """Run CERTIFY on every sample of a dataset; one row per sample not in ``skip_indices``.

    ``batches`` yields ``(index, x, y)``: global sample indices ``(N,)``, inputs
    ``(N, *shape)`` float32 in [0, 1], labels ``(N,)`` or None (unknown, −1).
    Each sample draws its noise from :func:`sample_generator` ``(seed, index)``,
    so a run resumed with the finished indices in ``skip_indices`` produces the
    same rows as an uninterrupted one. ``on_row`` receives each row (a dict
    over :data:`ROW_COLUMNS`) as soon as it is finished.

    Guarantee per row: with probability at least ``1 − alpha`` (separately for
    each sample, not jointly over the dataset) a non-abstaining row's radius is
    certified for Cohen's smoothed classifier. Returns the rows as columns.
    """
    check_parameters(n0, n, alpha)
    rows: dict[str, list] = {column: [] for column in ROW_COLUMNS}
    for indices, inputs, labels in batches:
        indices, inputs, labels = _checked_batch(smooth, indices, inputs, labels)
        for position, index in enumerate(indices.tolist()):
            if index in skip_indices:
                continue
            row = _certify_one(smooth, inputs[position], int(index), -1 if labels is None else int(labels[position]),
                               n0, n, alpha, seed)
            for column in ROW_COLUMNS:
                rows[column].append(row[column])
            if on_row is not None:
                on_row(row)
    return {column: np.asarray(rows[column], dtype=dtype) for column, dtype in zip(ROW_COLUMNS, _ROW_DTYPES)}


def _checked_batch(smooth: Smooth, indices, inputs, labels):
    """(indices, inputs, labels) as arrays of matching lengths, labels in [-1, C)."""
    indices = np.asarray(indices).reshape(-1)
    inputs = np.asarray(inputs)
    if inputs.shape[0] != indices.shape[0] or (labels is not None and len(labels) != len(indices)):
        raise GlorocertError(
            f"batch has {len(indices)} indices, {inputs.shape[0]} inputs and "
            f"{'no' if labels is None else len(labels)} labels; they must match"
        )
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        bad = (labels < -1) | (labels >= smooth.num_classes)
        if bad.any():
            raise GlorocertError(
                f"label {labels[bad][0].item()} at index {indices[bad][0].item()} is outside [0, {smooth.num_classes})"
            )
    return indices, inputs, labels


def _certify_one(smooth: Smooth, x: np.ndarray, index: int, label: int, n0: int, n: int, alpha: float, seed: int) -> dict:
    """CERTIFY on one sample with its own seeded noise; the row."""
    start = time.perf_counter()
    try:
        predicted, radius = smooth.certify(
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), n0, n, alpha, sample_generator(seed, index, smooth.device),
        )
    except GlorocertError as error:
        raise GlorocertError(f"sample {index}: {error}") from error
    return {
        "index": index, "label": label, "predicted": predicted, "radius": radius,
        "correct": predicted != ABSTAIN and predicted == label, "abstain": predicted == ABSTAIN,
        "seconds": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------- argument checks


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, numbers.Real) and 0.0 < alpha < 1.0):
        raise GlorocertError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")


def _check_sigma(sigma: float) -> None:
    if not (isinstance(sigma, numbers.Real) and math.isfinite(sigma) and sigma > 0):
        raise GlorocertError(f"sigma must be a positive number, got {sigma!r}")


def _check_sample_size(value: int, *, minimum: int, name: str = "n") -> None:
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum):
        raise GlorocertError(f"{name} must be an integer >= {minimum}, got {value!r}")
