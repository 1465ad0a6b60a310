"""gloro vs BCP vs KW vs the cascade on the same model and samples — the GloRo paper's Fig. 4b on your data.

Every method certifies the same samples (KW only the first ``kw_limit`` of
them: it is ~1000× slower than gloro) at every requested ε and reports clean
accuracy, VRA per ε, wall-clock seconds (after loading; including each
method's one-time set-up on the model, e.g. BCP's guaranteed operator norms
and KW's dense backward matrices), seconds per sample, the ratio to gloro's
seconds per sample, and peak resident memory.

Peak memory is per method because each method runs in a fresh process
(``multiprocessing`` *spawn*); the child loads the model and data itself and
sends back its result and its own peak RSS (:mod:`glorocert.studies.isolation`). The memory
reported therefore includes the interpreter, torch and the loaded model
(``load_rss_bytes`` is the peak right after loading, the same for every
method; the difference is what certifying added).

How each method certifies, at every ε:

- ``gloro`` and ``cascade``: :func:`glorocert.api.certify` (the cascade's
  radii lie on the requested-ε grid; see its docstring);
- ``bcp`` and ``kw``: ``bcp.certify`` / ``kw.certify`` on every sample, one
  pass per ε, on the model's graph with any ``--mean/--std`` normalisation
  folded in as its first layer (:meth:`glorocert.normalization.Normalization.fold_into`), the
  prediction from the native runner; certified = correct and certified.
  BCP (here and in the cascade) reads its guaranteed operator norms from the
  frozen sound bound, as gloro does (:func:`glorocert.certify.methods.local_options`).

A method that cannot run on the model (a GlorocertError, e.g. KW on a MinMax
network) gives a row saying why instead of failing the comparison; so does a
child that runs out of memory or dies. A GlorocertError from ``gloro`` itself
means the input is bad (the other methods would fail the same way) and is
raised; any other failure of gloro is a row too (the CLI then exits 1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from glorocert import api
from glorocert.errors import GlorocertError
from glorocert.results import eps_key
from glorocert.studies.isolation import peak_rss_bytes, run_here, run_isolated

METHODS = api.METHODS
REPORT_FORMAT = "glorocert-compare-local"
REPORT_VERSION = 1
DEFAULT_KW_LIMIT = 100


@dataclass(frozen=True)
class Source:
    """How to load the model and open the data: a picklable recipe, so every child process loads its own."""

    model: str
    data: str = "mnist-5k"
    split: str = "test"
    labels: str | None = None
    layout: str = "auto"
    scale: str = "auto"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    start: int = 0
    limit: int | None = None
    input_shape: tuple[int, ...] | None = None
    data_shape: tuple[int, ...] | None = None  # the data's per-sample shape, for a model file that does not record one
    output: str | None = None
    trust_pickle: bool = False
    device: str = "cpu"

    def load(self) -> api.Model:
        return api.load(self.model, input_shape=self.input_shape, data_shape=self.data_shape, output=self.output,
                        trust_pickle=self.trust_pickle, device=self.device)

    def open(self, model: api.Model) -> api.Dataset:
        return api.open_dataset(
            self.data, split=self.split, labels=self.labels, layout=self.layout, scale=self.scale,
            mean=None if self.mean is None else list(self.mean), std=None if self.std is None else list(self.std),
            start=self.start, limit=self.limit, input_shape=model.input_shape,
        )


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """``"gloro,bcp"`` or ``["gloro", "bcp"]`` → distinct known method names, in the order given."""
    names = [m.strip().lower() for m in (methods.split(",") if isinstance(methods, str) else methods)]
    names = [m for m in names if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise GlorocertError(f"--methods {','.join(names) or '(none)'}: use one or more of {','.join(METHODS)}")
    return list(dict.fromkeys(names))


def _check_options(eps: Sequence[float], kw_limit: int | None, batch_size: int, fallback: str) -> list[float]:
    eps = sorted({float(e) for e in eps})
    if not eps or any(not math.isfinite(e) or e < 0 for e in eps):
        raise GlorocertError(f"--eps {eps}: give one or more finite, non-negative radii")
    if len({eps_key(e) for e in eps}) != len(eps):
        raise GlorocertError(f"--eps {eps}: values are not distinct at 6 significant digits")
    if kw_limit is not None and kw_limit < 0:
        raise GlorocertError(f"--kw-limit {kw_limit}: use a positive number of samples (0: no limit)")
    if batch_size <= 0:
        raise GlorocertError("--batch-size must be positive")
    if fallback not in api.LOCAL_METHODS:
        raise GlorocertError(f"--fallback {fallback!r}: use bcp or kw")
    return eps


def compare_local(
    source: Source,
    eps: Sequence[float],
    *,
    methods: str | Sequence[str] = METHODS,
    kw_limit: int | None = DEFAULT_KW_LIMIT,
    batch_size: int = 256,
    fallback: str = "bcp",
    bound=None,
    progress: Callable[[str, int], None] | None = None,
    done: Callable[[dict], None] | None = None,
    isolate: bool = True,
) -> dict:
    """Certify the same samples with each method, each in a fresh process; the report as a JSON-able dict.

    ``kw_limit``: KW certifies only the first ``kw_limit`` samples (None or 0:
    all). ``bound``: as for :func:`glorocert.api.certify` (default: the file
    next to the model, computed and cached once here, before the children
    start). ``progress(method, samples)`` is called as each method starts,
    ``done(row)`` as it finishes. Bad input raises GlorocertError before any
    child starts. ``isolate=False`` runs every method in this process instead
    (quicker to start; peak memory is then not per method and reported as None).
    """
    methods = parse_methods(methods)
    eps = _check_options(eps, kw_limit, batch_size, fallback)
    model = source.load()
    dataset = source.open(model)
    if tuple(dataset.shape) != tuple(model.input_shape):
        raise GlorocertError(f"{dataset.name}: samples have shape {tuple(dataset.shape)}, the model takes {tuple(model.input_shape)}")
    bound, bound_source = api.resolve_bound(model, bound, dataset.normalization)
    total = dataset.num_samples
    kw_samples = min(total, kw_limit) if kw_limit else total
    rows: list[dict] = []
    for method in methods:
        n = kw_samples if method == "kw" else total
        if progress:
            progress(method, n)
        job = _Job(replace(source, limit=n), method, eps, batch_size, fallback, bound)
        row = {"method": method, **(run_isolated if isolate else run_here)(_run_method, job)}
        row.setdefault("samples", n)
        if method == "gloro" and row["status"] == "unsupported":
            raise GlorocertError(row["error"])  # a GlorocertError from gloro is bad input: the others would fail the same way
        rows.append(row)
        if done:
            done(row)
    _add_time_ratios(rows)
    return {
        "format": REPORT_FORMAT, "format_version": REPORT_VERSION, "model": str(source.model), "dataset": dataset.name,
        "samples": total, "kw_limit": kw_limit or None, "kw_samples": kw_samples, "eps": eps, "fallback": fallback,
        "batch_size": batch_size,
        "normalization": None if dataset.normalization is None else dataset.normalization.to_json(),
        "bound_file": bound_source, "bound_mode": bound.mode, "lipschitz": bound.lipschitz, "methods": rows,
        "notes": list(model.notes), "versions": api.versions(),
    }


def _add_time_ratios(rows: list[dict]) -> None:
    """Seconds per sample of every method that ran, and its ratio to gloro's."""
    gloro_row = next((r for r in rows if r["method"] == "gloro" and r["status"] == "ok"), None)
    base = gloro_row["seconds"] / gloro_row["samples"] if gloro_row else None
    for row in rows:
        if row["status"] == "ok":
            row["seconds_per_sample"] = row["seconds"] / row["samples"]
            row["time_ratio_vs_gloro"] = row["seconds_per_sample"] / base if base else None


def succeeded(report: dict) -> bool:
    """gloro ran (or, when it was not asked for, at least one method ran): the CLI's exit code 0."""
    ok = {r["method"] for r in report["methods"] if r["status"] == "ok"}
    asked = {r["method"] for r in report["methods"]}
    return "gloro" in ok if "gloro" in asked else bool(ok)


@dataclass(frozen=True)
class _Job:
    source: Source
    method: str
    eps: list[float]
    batch_size: int
    fallback: str
    bound: object


def _run_method(job: _Job) -> dict:
    """Load, then certify with ``job.method`` at every ε; runs in the child process."""
    model = job.source.load()
    dataset = job.source.open(model)
    load_rss = peak_rss_bytes()
    started = time.perf_counter()
    if job.method in ("gloro", "cascade"):
        result = api.certify(model, dataset, job.eps, bound=job.bound, batch_size=job.batch_size, method=job.method,
                             fallback=job.fallback)
        s = result.summary
        row = {"samples": s["num_samples"], "clean_accuracy": s["clean_accuracy"], "vra": dict(s["vra"])}
        if job.method == "cascade":
            row["local"] = {k: s[k] for k in ("local_method", "local_samples", "local_passes", "local_seconds", "rescued")}
    else:  # BCP reuses the frozen bound's norms, as the cascade does
        row = api.certify_locally_at(model, dataset, job.eps, job.method, bound=job.bound, batch_size=job.batch_size)
    row["seconds"] = time.perf_counter() - started
    row["load_rss_bytes"] = load_rss
    row["vra"] = {eps_key(e): row["vra"][eps_key(e)] for e in job.eps}
    return row


__all__ = ["METHODS", "Source", "compare_local", "parse_methods", "succeeded"]
