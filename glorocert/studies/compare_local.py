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
from pathlib import Path

import numpy as np

from glorocert import api, distributed
from glorocert.errors import GlorocertError
from glorocert.results import eps_key
from glorocert.studies.isolation import peak_rss_bytes, run_here, run_isolated

METHODS = api.METHODS
REPORT_FORMAT = "glorocert-compare-local"
REPORT_VERSION = 1
DEFAULT_KW_LIMIT = 100
RAY_PART_ROWS = 1024  # --ray: samples per part (the unit written and resumed), per method


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

    def recipe(self) -> api.ModelRecipe:
        """How a Ray worker loads the model (the full path: the local methods need the IR)."""
        return api.ModelRecipe(str(self.model), self.input_shape, self.data_shape, self.output, self.trust_pickle,
                               self.device)

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
    return _report(source, dataset, model, bound, bound_source, eps, kw_limit, kw_samples, fallback, batch_size, rows)


def _report(source: Source, dataset, model, bound, bound_source: str, eps, kw_limit, kw_samples: int, fallback: str,
            batch_size: int, rows: list[dict]) -> dict:
    return {
        "format": REPORT_FORMAT, "format_version": REPORT_VERSION, "model": str(source.model), "dataset": dataset.name,
        "samples": dataset.num_samples, "kw_limit": kw_limit or None, "kw_samples": kw_samples, "eps": eps,
        "fallback": fallback, "batch_size": batch_size,
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


def _batch_work(method: str, model: api.Model, dataset: api.Dataset, bound: api.Bound, source: str, eps: list[float],
                fallback: str, batch_size: int):
    """The per-batch work of ``method``: gloro and the cascade certify (a radius per sample), bcp and kw certify
    at each ε; either way the rows hold ``certified@ε`` per sample."""
    if method in ("gloro", "cascade"):
        return api.BatchCertifier(model, dataset, bound, source, eps, method=method, fallback=fallback,
                                  batch_size=batch_size)
    return api.BatchLocalAtEps(model, dataset, bound, source, eps, method, batch_size)


def _method_report(method: str, rows: dict, eps: list[float], fallback: str, model: api.Model, dataset: api.Dataset,
                   bound: api.Bound, source: str) -> dict:
    """A method's row of the report, from its per-sample rows: samples, clean accuracy, VRA per ε (and what the
    cascade's local stage did)."""
    if method not in ("gloro", "cascade"):
        row = api.local_at_eps_summary(rows, eps)
    else:
        s = api.certify_summary(rows, eps, method, fallback, model, dataset, bound, source)
        row = {"samples": s["num_samples"], "clean_accuracy": s["clean_accuracy"], "vra": dict(s["vra"])}
        if method == "cascade":
            row["local"] = {k: s[k] for k in ("local_method", "local_samples", "local_passes", "local_seconds", "rescued")}
    row["vra"] = {eps_key(e): row["vra"][eps_key(e)] for e in eps}
    return row


def _run_method(job: _Job) -> dict:
    """Load, then certify with ``job.method`` at every ε; runs in the child process."""
    model = job.source.load()
    dataset = job.source.open(model)
    load_rss = peak_rss_bytes()
    started = time.perf_counter()
    bound, source = api.resolve_bound(model, job.bound, dataset.normalization)
    work = _batch_work(job.method, model, dataset, bound, source, job.eps, job.fallback, job.batch_size)
    parts = [work(batch) for batch in dataset.batches(job.batch_size)]
    rows = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    row = _method_report(job.method, rows, job.eps, job.fallback, model, dataset, bound, source)
    row["seconds"] = time.perf_counter() - started
    row["load_rss_bytes"] = load_rss
    return row


@dataclass(frozen=True)
class MethodWork:
    """One method's per-batch work on a Ray worker: its rows, and per row the share of its batch's seconds and the
    worker's peak memory (after loading, and so far)."""

    recipe: api.ModelRecipe
    bound: api.Bound
    source: str
    dataset: api.Dataset  # detached
    method: str
    eps: list[float]
    fallback: str
    batch_size: int

    def __call__(self, localize):
        model = self.recipe.load(localize)
        bound, _ = api.resolve_bound(model, self.bound, self.dataset.normalization)
        work = _batch_work(self.method, model, self.dataset, bound, self.source, self.eps, self.fallback, self.batch_size)
        load_rss = peak_rss_bytes()

        def rows(batch) -> dict:
            started = time.perf_counter()
            out = dict(work(batch))
            n = len(batch.index)
            out.update(batch_seconds=np.full(n, (time.perf_counter() - started) / n), load_rss_bytes=np.full(n, load_rss),
                       peak_rss_bytes=np.full(n, peak_rss_bytes()))
            return out

        return rows


def compare_local_on_ray(source: Source, eps: Sequence[float], out_dir, *, methods: str | Sequence[str] = METHODS,
                         kw_limit: int | None = DEFAULT_KW_LIMIT, batch_size: int = 256, fallback: str = "bcp",
                         bound=None, address: str | None = None, workers: int | None = None, resume: bool = False,
                         progress: Callable[[str, int], None] | None = None, done: Callable[[dict], None] | None = None,
                         advance: Callable[[int], None] | None = None) -> dict:
    """:func:`compare_local` on a Ray cluster: each method in turn on an actor pool (glorocert/distributed.py), its
    rows as Parquet parts under ``out_dir/METHOD/``, resumable. The report equals the in-process one but for the
    timings and memory: ``seconds`` is the workers' time certifying (summed over workers), ``peak_rss_bytes`` and
    ``load_rss_bytes`` the largest of any worker; each row adds ``distributed``. ``advance(n)``: n more samples."""
    methods = parse_methods(methods)
    eps = _check_options(eps, kw_limit, batch_size, fallback)
    model = source.load()
    dataset = source.open(model)
    if tuple(dataset.shape) != tuple(model.input_shape):
        raise GlorocertError(f"{dataset.name}: samples have shape {tuple(dataset.shape)}, the model takes {tuple(model.input_shape)}")
    bound, bound_source = api.resolve_bound(model, bound, dataset.normalization)
    kw_samples = min(dataset.num_samples, kw_limit) if kw_limit else dataset.num_samples
    rows: list[dict] = []
    for method in methods:
        window = replace(source, limit=kw_samples) if method == "kw" else source
        data = window.open(model)
        if progress:
            progress(method, data.num_samples)
        work = MethodWork(source.recipe(), bound, bound_source, data.detached(), method, eps, fallback, batch_size)
        identity = {"model_sha256": model.sha256, "bound_sha256": bound.to_json()["content_sha256"], "method": method,
                    "eps": eps, "fallback": fallback if method == "cascade" else None}
        job = distributed.Job(f"compare-local {method}", work, identity, batch_size, RAY_PART_ROWS,
                              files=work.recipe.files, schema_version=api.ROWS_SCHEMA_VERSION)
        run = (job, data, Path(out_dir) / method, dict(address=address, workers=workers, resume=resume, progress=advance))
        row = {"method": method, **run_here(_run_on_ray, (run, model, bound, bound_source, fallback))}
        row.setdefault("samples", data.num_samples)
        if method == "gloro" and row["status"] == "unsupported":
            raise GlorocertError(row["error"])
        rows.append(row)
        if done:
            done(row)
    _add_time_ratios(rows)
    return _report(source, dataset, model, bound, bound_source, eps, kw_limit, kw_samples, fallback, batch_size, rows)


def _run_on_ray(arguments) -> dict:
    (job, data, out_dir, options), model, bound, bound_source, fallback = arguments
    run = distributed.run(job, data, out_dir, **options)
    row = _method_report(job.work.method, run.rows, job.work.eps, fallback, model, data, bound, bound_source)
    row.update(seconds=float(run.rows["batch_seconds"].sum()), load_rss_bytes=int(run.rows["load_rss_bytes"].max()),
               peak_rss_bytes=int(run.rows["peak_rss_bytes"].max()), distributed=run.report())
    return row


__all__ = ["METHODS", "MethodWork", "Source", "compare_local", "compare_local_on_ray", "parse_methods", "succeeded"]
