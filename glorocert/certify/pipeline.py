"""The per-batch certification pipeline: data → native forward → radii → rows and summary.

One loop serves every method (certify/methods.py): the native model runs once
per batch, the GloRo radii come from the frozen margin matrix, and a local
method, when asked for, refines them on the same batch (certify/local_stage.py,
imported only then: the gloro path needs neither torch nor the IR). Input normalisation
is the dataset's (applied to the pixels, folded into the bound), and every
certificate keeps the model's rounding budget (``model.rounding_rtol``).

Every batch certified is also evidence against the bound (:class:`SlopeCheck`):
a margin constant below a difference quotient observed on the batch is
provably wrong, and the run stops before anything is written.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from glorocert._version import __version__
from glorocert.certify import gloro
from glorocert.certify.methods import check_method
from glorocert.data import Batch, Dataset, open_dataset
from glorocert.errors import GlorocertError
from glorocert.lipschitz.boundfile import Bound
from glorocert.lipschitz.freeze import recompute_hint, resolve_bound
from glorocert.loaders import Model

if TYPE_CHECKING:
    from glorocert.certify.local_stage import LocalStage
from glorocert.results import certified_accuracy_curve, eps_key, plot_curves, summarize

ROWS_SCHEMA_VERSION = "1"
SLOPE_SAMPLES = 16  # per checked batch, random samples whose 240 ordered pairs' slopes are checked against the bound
SLOPE_FIRST_BATCHES, SLOPE_THEN_EVERY = 8, 4  # the batches checked: the first 8, then every 4th
READ_BYTES = 8 << 20  # gloro reads about this much float32 data at once, whole forward batches (see read_size)


@dataclass
class CertifyResult:
    rows: dict[str, np.ndarray]
    summary: dict
    eps: list[float]
    bound: Bound
    extra: dict = field(default_factory=dict)

    def plot(self, path: str | Path, title: str | None = None) -> None:
        correct = self.rows["correct"] if "label" in self.rows else np.ones(len(self.rows["radius"]), bool)
        radius = np.where(correct, self.rows["radius"], 0.0)
        finite = radius[np.isfinite(radius)]
        grid = np.linspace(0.0, max(float(finite.max()) if finite.size else 1.0, max(self.eps)) * 1.05, 200)
        label = "GloRo (global bound)" + (" — ESTIMATE" if self.bound.mode == "estimate" else "")
        plot_curves(path, {label: certified_accuracy_curve(self.rows["radius"], correct, grid)},
                    title or f"{self.bound.model_name} on {self.summary.get('dataset', '')}")


def check_eps(eps: Sequence[float]) -> list[float]:
    """Distinct, sorted, finite, non-negative radii."""
    eps = sorted({float(e) for e in eps})
    if not eps or any(not np.isfinite(e) or e < 0 for e in eps):
        raise GlorocertError(f"--eps {eps}: give one or more finite, non-negative radii")
    return eps


def check_request(model: Model, dataset: Dataset, batch_size: int) -> None:
    if batch_size <= 0:
        raise GlorocertError("--batch-size must be positive")
    if tuple(dataset.shape) != tuple(model.input_shape):
        raise GlorocertError(f"{dataset.name}: samples have shape {tuple(dataset.shape)}, the model takes {tuple(model.input_shape)}")


def certify(
    model: Model,
    data: Dataset | str,
    eps: Sequence[float],
    *,
    bound: Bound | str | Path | None = None,
    batch_size: int = 256,
    method: str = "gloro",
    fallback: str = "bcp",
    progress: Callable[[int], None] | None = None,
) -> CertifyResult:
    """Certify every sample of ``data`` at each ε (see certify/gloro.py for the guarantee).

    ``method``: ``gloro`` — the frozen global bound, one forward pass per batch;
    ``bcp`` / ``kw`` — local bounds (certify/bcp.py, certify/kw.py) on every
    sample, full radius by bisection on ε (≈ 12 local passes per sample);
    ``cascade`` — gloro on everything, then the ``fallback`` local method, one
    pass per *requested* ε, only where gloro abstains.

    The cascade goes through the requested ε in descending order; at each ε
    the local method runs only on the samples that gloro leaves ⊥ there and
    that it has not already certified at a larger ε (a certificate for the
    closed ball of radius ε' covers every ε ≤ ε'). A sample's radius is
    max(gloro radius, largest requested ε the local method certified) — a
    sound lower bound on the requested-ε grid. Rows of a cascade also carry
    ``gloro_radius`` and ``local_eps`` (NaN where the local method did not
    certify); ``bottom@ε`` is False where ``local_eps ≥ ε``. The summary adds
    ``local_samples``, ``local_passes`` (sample·ε evaluations),
    ``local_seconds`` and ``rescued`` (per ε: correct samples certified by
    the cascade but ⊥ under gloro). BCP takes its guaranteed operator norms
    from a sound frozen bound instead of recomputing them.

    ``bound``: a Bound, a bound file, or None for the file next to the model
    (computed and cached there when absent).
    """
    check_method(method, fallback)
    dataset = open_dataset(data) if isinstance(data, str) else data
    eps = check_eps(eps)
    check_request(model, dataset, batch_size)
    bound, source = resolve_bound(model, bound, dataset.normalization)
    started = time.perf_counter()
    certifier = BatchCertifier(model, dataset, bound, source, eps, method=method, fallback=fallback, batch_size=batch_size)
    parts = []
    for batch in dataset.batches(read_size(dataset, batch_size) if method == "gloro" else batch_size):
        parts.append(certifier(batch))
        if progress:
            progress(len(batch.index))
    if not parts:
        raise GlorocertError(f"{dataset.name}: no samples to certify")
    rows = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    seconds = time.perf_counter() - started
    summary = certify_summary(rows, eps, method, fallback, model, dataset, bound, source)
    summary.update(seconds=seconds, forward_seconds=certifier.forward_seconds,
                   samples_per_second=len(rows["index"]) / seconds if seconds > 0 else None)
    return CertifyResult(rows, summary, eps, bound)


def read_size(dataset: Dataset, batch_size: int) -> int:
    """The samples gloro reads and certifies at once: a whole number of forward batches (the model still runs on
    ``batch_size`` samples at a time), about READ_BYTES of pixels. Each read, each numpy call on a batch's rows
    costs the same on 256 samples as on 2560, and per batch of 256 those costs added 5 % to certify's 60k."""
    per_batch = batch_size * int(np.prod(dataset.shape)) * 4
    return batch_size * max(1, READ_BYTES // max(per_batch, 1))


def certify_summary(rows: dict, eps: list[float], method: str, fallback: str, model: Model, dataset: Dataset,
                    bound: Bound, source: str) -> dict:
    """The summary of certify's rows (:func:`glorocert.results.summarize`, the local stage's report, where the
    model, bound and data came from) — all of it but the timings, which the caller adds."""
    summary = summarize(rows, eps)
    if method != "gloro":
        summary.update(_local_report(fallback if method == "cascade" else method, rows, eps))
    summary.update(
        method=method, dataset=dataset.name, model=str(model.path), model_format=model.format,
        certified_output=model.output or None,
        runner=model.runner.description, device=model.runner.device, bound_file=source, bound_mode=bound.mode,
        bound_model_sha256=bound.model_sha256, lipschitz=bound.lipschitz, margin_method=bound.margin_method,
        rows_schema_version=ROWS_SCHEMA_VERSION, versions=versions(),
    )
    return summary


def _local_stage(*args) -> LocalStage:
    from glorocert.certify.local_stage import LocalStage

    return LocalStage(*args)


class BatchCertifier:
    """What certify does to one batch, set up once per process (the local stage's norms included): the native
    forward pass, the slope check, the GloRo radii, then the local method if any; the batch's rows, every column.

    :func:`certify` runs one over the dataset; a distributed run (glorocert/distributed.py) one per worker. Rows
    depend only on their own sample, so any cut of the dataset into batches gives the same rows (``seconds``,
    a local method's time per sample, aside); the slope check looks at other sample pairs, as it is seeded per
    process.
    """

    def __init__(self, model: Model, dataset: Dataset, bound: Bound, source: str, eps: Sequence[float], *,
                 method: str = "gloro", fallback: str = "bcp", batch_size: int = 256):
        check_method(method, fallback)
        self.model, self.dataset, self.method, self.batch_size = model, dataset, method, batch_size
        self.eps = check_eps(eps)
        self.local = None if method == "gloro" else _local_stage(fallback if method == "cascade" else method, model,
                                                                 bound, dataset.normalization, self.eps)
        self.slopes = SlopeCheck(model, dataset, bound.margin_matrix, source, sound=bound.mode == "sound")
        self.forward_seconds = 0.0

    def __call__(self, batch) -> dict[str, np.ndarray]:
        """The rows of ``batch``: any number of samples, run through the model ``batch_size`` at a time."""
        t0 = time.perf_counter()
        logits = native_logits(self.model, self.dataset, batch, self.batch_size)
        self.forward_seconds += time.perf_counter() - t0
        for start in range(0, len(batch.index), self.batch_size):  # per forward batch, as if read one by one
            stop = start + self.batch_size
            self.slopes(Batch(batch.index[start:stop], batch.x[start:stop], None), logits[start:stop])
        predicted, runner_up, margin, radius = gloro.radii(logits, self.slopes.margin_matrix, self.model.rounding_rtol)
        label = batch.y if batch.y is not None else np.full(len(batch.index), -1)
        rows = {"index": batch.index, "label": label.astype(np.int64), "predicted": predicted, "runner_up": runner_up,
                "margin": margin, "radius": radius, "seconds": np.zeros(len(radius))}
        if self.method == "cascade":
            rows["gloro_radius"] = radius
            rows["radius"], rows["seconds"], rows["local_eps"] = self.local.cascade(batch.x, predicted, logits, radius)
        elif self.local is not None:
            rows["radius"], rows["seconds"], rows["local_eps"] = self.local.radius(batch.x, predicted, logits)
        _add_eps_columns(rows, self.eps, self.dataset.has_labels)
        return rows


@dataclass
class SlopeCheck:
    """Refuses a sound margin matrix that a batch being certified proves too low.

    For any valid K and any samples x, x' (in [0,1] pixel space, normalisation folded into K):
    |(y_j − y_i)(x) − (y_j − y_i)(x')| ≤ K[j][i]·‖x − x'‖₂. On the first 8 batches and every 4th after, it looks
    at every pair of SLOPE_SAMPLES random samples (seeded: runs repeat), both ways round, for j the prediction at
    the first (the row K[j][·] it is certified with) and every i. The change keeps both samples' rounding budget
    ``rounding_rtol·(1 + max|y|)`` and the distance the rounding of its computation, so float noise never trips
    it; a violation proves the bound wrong (or forged) and raises before anything is written.

    On the shipped models the steepest slope found in every batch of 256 reaches 30–76 % of K, so a K lowered
    3.3× or more is caught on the first batch; a K too low by a few percent only where the data come that close
    to it, which nothing guarantees. Sound bounds only: an estimate-mode K comes from power iteration, which
    approaches the norms from below and may honestly lie below an observed slope (unconverged); its radii are
    labelled ESTIMATE, and `glorocert audit` measures how far they over-claim. Cost: well under 1 % of certify.
    """

    model: Model
    dataset: Dataset
    margin_matrix: np.ndarray
    source: str
    sound: bool = True
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    batches: int = 0

    def __call__(self, batch, logits: np.ndarray) -> None:
        self.batches += 1
        if not self.sound or (self.batches > SLOPE_FIRST_BATCHES and self.batches % SLOPE_THEN_EVERY):
            return
        found = steepest_violation(batch.x, logits, self.margin_matrix, self.model.rounding_rtol, self.rng)
        if found is None:
            return
        a, b, j, i, change, distance = found
        raise GlorocertError(
            f"{self.dataset.name}: rows {int(batch.index[a])} and {int(batch.index[b])}: y_{j} − y_{i} changes by "
            f"{change:.6g} over an l2 distance of {distance:.6g} (slope {change / distance:.6g}), more than the bound's "
            f"K[{j}][{i}] = {self.margin_matrix[j, i]:.6g} allows: the bound ({self.source}) is provably too low, wrong "
            f"or forged; {recompute_hint(self.model, self.source, self.dataset.normalization)}"
        )


def steepest_violation(x: np.ndarray, logits: np.ndarray, k: np.ndarray, rounding_rtol: float, rng: np.random.Generator):
    """The (a, b, j, i, change, distance) whose observed change of y_j − y_i most exceeds K[j][i]·‖x_a − x_b‖, or None.

    See :class:`SlopeCheck`: every ordered pair (a, b) among SLOPE_SAMPLES random samples of the batch, j the
    prediction at a, every class i, at once (a Gram matrix gives the distances).
    """
    n = len(x)
    if n < 2:
        return None
    s = rng.integers(0, n, SLOPE_SAMPLES)  # a repeated sample only adds pairs with no slope
    flat = x.reshape(n, -1)[s].astype(np.float64)
    gram = flat @ flat.T
    norms = np.diag(gram)
    sq = norms[:, None] + norms
    # a float64 dot product of d terms errs by at most d·2⁻⁵³·|x||x'|: the squared distance is widened by more
    distance = np.sqrt(np.maximum(sq - 2.0 * gram, 0.0) + 4.0 * (flat.shape[1] + 3) * 2.0**-53 * sq)
    y = logits[s].astype(np.float64)
    dy = y[:, None, :] - y  # y(x_a) − y(x_b)
    j = y.argmax(axis=1)  # the row K[j][·] that sample a is certified with
    change = np.abs(dy[np.arange(len(s)), :, j][:, :, None] - dy)  # |Δ(y_j − y_i)| for every b and class i
    slack = rounding_rtol * (1.0 + np.abs(y).max(axis=1))  # each sample's rounding budget
    excess = change - (slack[:, None] + slack)[:, :, None] - k[j][:, None, :] * distance[:, :, None]
    a, b, i = np.unravel_index(np.argmax(excess), excess.shape)
    if not excess[a, b, i] > 0:  # a == b, or identical samples: no change, never a violation
        return None
    return int(s[a]), int(s[b]), int(j[a]), int(i), float(change[a, b, i]), float(distance[a, b])


def native_logits(model: Model, dataset: Dataset, batch, batch_size: int) -> np.ndarray:
    """The native model's logits on a batch (labels checked against the classes, normalisation applied, outputs finite)."""
    if batch.y is not None and (batch.y >= model.num_classes).any():
        bad = int(np.argmax(batch.y >= model.num_classes))
        raise GlorocertError(
            f"{dataset.name}: row {int(batch.index[bad])} has label {int(batch.y[bad])}, but the model has {model.num_classes} classes"
        )
    x = batch.x if dataset.normalization is None else dataset.normalization.apply(batch.x)
    logits = _forward(model, x, batch_size)
    if not np.isfinite(logits).all():
        row = int(batch.index[np.argmax(~np.isfinite(logits).all(axis=1))])
        raise GlorocertError(f"{dataset.name}: the model outputs NaN/inf on row {row}")
    return logits


def _forward(model: Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The native forward pass, ``batch_size`` samples at a time; running out of memory becomes advice instead of
    a traceback."""
    try:
        if len(x) <= batch_size:
            return model.runner(x)
        return np.concatenate([model.runner(x[start : start + batch_size]) for start in range(0, len(x), batch_size)])
    except MemoryError:
        pass
    except Exception as e:  # torch.OutOfMemoryError, onnxruntime's allocation failures
        if "memory" not in str(e).lower() and "alloc" not in str(e).lower():
            raise
    raise GlorocertError(f"out of memory at --batch-size {batch_size}; try --batch-size {max(1, batch_size // 4)}")


def _add_eps_columns(rows: dict, eps: list[float], has_labels: bool) -> None:
    """``correct``, then ``bottom@ε`` and ``certified@ε`` per requested ε."""
    rows["correct"] = (rows["predicted"] == rows["label"]) if has_labels else np.ones(len(rows["index"]), bool)
    for e in eps:
        bottom = gloro.bottom_flags(rows["radius"], e)
        if "local_eps" in rows:  # a local certificate at ε covers the closed ball: radius == ε certifies ε
            bottom &= ~(rows["local_eps"] >= e)  # NaN (no local certificate) compares False
        rows[f"bottom@{eps_key(e)}"] = bottom
        rows[f"certified@{eps_key(e)}"] = rows["correct"] & ~bottom


def _local_report(name: str, rows: dict, eps: list[float]) -> dict:
    """What the local stage did, read from the rows (so that rows computed anywhere give the same report).

    bcp/kw by bisection run on every sample; the cascade on the samples whose ``seconds`` are positive (it timed
    them), one pass at ε for each sample ⊥ under gloro at ε and not certified by the local method at a larger ε
    (the passes :meth:`LocalStage.at_eps` makes, largest ε first). ``local_seconds``: the rows' seconds, summed.
    """
    cascade = "gloro_radius" in rows
    report = {"local_method": name, "local_samples": int((rows["seconds"] > 0).sum()) if cascade else len(rows["index"]),
              "local_seconds": float(rows["seconds"].sum())}
    if cascade:
        rescued = {eps_key(e): int((rows[f"certified@{eps_key(e)}"] & gloro.bottom_flags(rows["gloro_radius"], e)).sum())
                   for e in eps}
        passes = sum(int((gloro.bottom_flags(rows["gloro_radius"], e) & ~(rows["local_eps"] > e)).sum()) for e in eps)
        report.update(local_passes=passes, rescued=rescued)
    else:
        report.update(local_passes=None)  # bisection: a variable number of passes per sample
    return report


def certify_locally_at(model: Model, data: Dataset | str, eps: Sequence[float], method: str, *,
                       bound: Bound | str | Path | None = None, batch_size: int = 256) -> dict:
    """BCP or KW on every sample at every requested ε, one pass each (no radius search): samples, clean accuracy
    and VRA per ε. The prediction comes from the native model; a sample counts at ε when it is correct and
    certified there, with the same rounding budget and bound file as :func:`certify`."""
    dataset = open_dataset(data) if isinstance(data, str) else data
    eps = check_eps(eps)
    check_request(model, dataset, batch_size)
    bound, source = resolve_bound(model, bound, dataset.normalization)
    certifier = BatchLocalAtEps(model, dataset, bound, source, eps, method, batch_size)
    parts = [certifier(batch) for batch in dataset.batches(batch_size)]
    return local_at_eps_summary({name: np.concatenate([part[name] for part in parts]) for name in parts[0]}, eps)


class BatchLocalAtEps:
    """:func:`certify_locally_at`'s per-batch work: BCP or KW at every requested ε, one pass each, on the native
    prediction; per sample ``index``, ``label``, ``predicted``, ``correct`` and ``certified@ε`` (correct and
    certified at ε)."""

    def __init__(self, model: Model, dataset: Dataset, bound: Bound, source: str, eps: Sequence[float], method: str,
                 batch_size: int = 256):
        self.model, self.dataset, self.eps, self.batch_size = model, dataset, check_eps(eps), batch_size
        self.stage = _local_stage(method, model, bound, dataset.normalization, self.eps)
        self.slopes = SlopeCheck(model, dataset, bound.margin_matrix, source, sound=bound.mode == "sound")

    def __call__(self, batch) -> dict[str, np.ndarray]:
        from glorocert.certify.local_stage import local_slack

        logits = native_logits(self.model, self.dataset, batch, self.batch_size)
        self.slopes(batch, logits)
        predicted = logits.argmax(axis=1)
        labelled = batch.y is not None
        correct = (predicted == batch.y) if labelled else np.ones(len(predicted), bool)
        rows = {"index": batch.index, "label": batch.y if labelled else np.full(len(predicted), -1, np.int64),
                "predicted": predicted, "correct": correct}
        slack = local_slack(logits, self.stage.rtol)
        for e in self.eps:
            rows[f"certified@{eps_key(e)}"] = self.stage.certified_at(batch.x, predicted, slack, e) & correct
        return rows


def local_at_eps_summary(rows: dict, eps: Sequence[float]) -> dict:
    """Samples, clean accuracy (over labelled samples) and VRA per ε of :class:`BatchLocalAtEps`'s rows."""
    labelled = rows["label"] >= 0
    samples = len(rows["index"])
    return {"samples": samples, "clean_accuracy": float(rows["correct"][labelled].mean()) if labelled.any() else None,
            "vra": {eps_key(e): float(rows[f"certified@{eps_key(e)}"].mean()) for e in check_eps(eps)}}


def versions() -> dict:
    """The versions of what a result may depend on; read from the installed metadata, so nothing is imported."""
    return {"glorocert": __version__, "python": platform.python_version(),
            **{name: _installed(name) for name in ("torch", "onnx", "onnxruntime")}, "numpy": np.__version__}


def _installed(name: str) -> str | None:
    for distribution in (name, f"{name}-gpu"):  # onnxruntime-gpu installs the onnxruntime module
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None
