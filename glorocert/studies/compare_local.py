"""gloro vs BCP vs KW vs the cascade on the same model and samples — the GloRo paper's Fig. 4b on your data.

Every method certifies the same samples (KW only the first ``kw_limit`` of
them: it is ~1000× slower than gloro) at every requested ε and reports clean
accuracy, VRA per ε, wall-clock seconds (after loading; including each
method's one-time set-up on the model, e.g. BCP's guaranteed operator norms
and KW's dense backward matrices), seconds per sample, the ratio to gloro's
seconds per sample, and peak resident memory.

Peak memory is per method because each method runs in a fresh process
(``multiprocessing`` *spawn*); the child loads the model and data itself and
sends back its result and its own peak RSS (:func:`peak_rss_bytes`). The memory
reported therefore includes the interpreter, torch and the loaded model
(``load_rss_bytes`` is the peak right after loading, the same for every
method; the difference is what certifying added).

How each method certifies, at every ε:

- ``gloro`` and ``cascade``: :func:`glorocert.api.certify` (the cascade's
  radii lie on the requested-ε grid; see its docstring);
- ``bcp`` and ``kw``: ``bcp.certify`` / ``kw.certify`` on every sample, one
  pass per ε, on the model's graph with any ``--mean/--std`` normalisation
  folded in as its first layer (:func:`glorocert.api.normalised_graph`), the
  prediction from the native runner; certified = correct and certified.
  BCP (here and in the cascade) reads its guaranteed operator norms from the
  frozen sound bound, as gloro does (:func:`glorocert.api.local_options`).

A method that cannot run on the model (a GlorocertError, e.g. KW on a MinMax
network) gives a row saying why instead of failing the comparison; so does a
child that runs out of memory or dies. A GlorocertError from ``gloro`` itself
means the input is bad (the other methods would fail the same way) and is
raised; any other failure of gloro is a row too (the CLI then exits 1).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from glorocert.errors import GlorocertError

METHODS = ("gloro", "bcp", "kw", "cascade")
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
    trust_pickle: bool = False
    device: str = "cpu"

    def load(self):
        from glorocert.loaders import load

        return load(self.model, input_shape=self.input_shape, trust_pickle=self.trust_pickle, device=self.device)

    def open(self, model):
        from glorocert.data import open_dataset

        return open_dataset(
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
    from glorocert.api import normalization_of, resolve_bound, versions
    from glorocert.results import eps_key

    methods = parse_methods(methods)
    eps = sorted({float(e) for e in eps})
    if not eps or any(not math.isfinite(e) or e < 0 for e in eps):
        raise GlorocertError(f"--eps {eps}: give one or more finite, non-negative radii")
    if len({eps_key(e) for e in eps}) != len(eps):
        raise GlorocertError(f"--eps {eps}: values are not distinct at 6 significant digits")
    if kw_limit is not None and kw_limit < 0:
        raise GlorocertError(f"--kw-limit {kw_limit}: use a positive number of samples (0: no limit)")
    if batch_size <= 0:
        raise GlorocertError("--batch-size must be positive")
    if fallback not in ("bcp", "kw"):
        raise GlorocertError(f"--fallback {fallback!r}: use bcp or kw")

    model = source.load()
    dataset = source.open(model)
    if tuple(dataset.shape) != tuple(model.input_shape):
        raise GlorocertError(f"{dataset.name}: samples have shape {tuple(dataset.shape)}, the model takes {tuple(model.input_shape)}")
    normalization = normalization_of(dataset.mean, dataset.std)
    bound, bound_source = resolve_bound(model, bound, normalization)
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

    gloro_row = next((r for r in rows if r["method"] == "gloro" and r["status"] == "ok"), None)
    base = gloro_row["seconds"] / gloro_row["samples"] if gloro_row else None
    for row in rows:
        if row["status"] != "ok":
            continue
        row["seconds_per_sample"] = row["seconds"] / row["samples"]
        row["time_ratio_vs_gloro"] = row["seconds_per_sample"] / base if base else None
    return {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "model": str(source.model),
        "dataset": dataset.name,
        "samples": total,
        "kw_limit": kw_limit or None,
        "kw_samples": kw_samples,
        "eps": eps,
        "fallback": fallback,
        "batch_size": batch_size,
        "normalization": normalization,
        "bound_file": bound_source,
        "bound_mode": bound.mode,
        "lipschitz": bound.lipschitz,
        "methods": rows,
        "notes": list(model.notes),
        "versions": versions(),
    }


def succeeded(report: dict) -> bool:
    """gloro ran (or, when it was not asked for, at least one method ran): the CLI's exit code 0."""
    ok = {r["method"] for r in report["methods"] if r["status"] == "ok"}
    asked = {r["method"] for r in report["methods"]}
    return "gloro" in ok if "gloro" in asked else bool(ok)


# --------------------------------------------------------------------------- one method, in a fresh process


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
    from glorocert.api import certify
    from glorocert.results import eps_key

    model = job.source.load()
    dataset = job.source.open(model)
    load_rss = peak_rss_bytes()
    started = time.perf_counter()
    if job.method in ("gloro", "cascade"):
        result = certify(model, dataset, job.eps, bound=job.bound, batch_size=job.batch_size, method=job.method, fallback=job.fallback)
        s = result.summary
        row = {"samples": s["num_samples"], "clean_accuracy": s["clean_accuracy"], "vra": dict(s["vra"])}
        if job.method == "cascade":
            row["local"] = {k: s[k] for k in ("local_method", "local_samples", "local_passes", "local_seconds", "rescued")}
    else:
        row = _certify_locally(model, dataset, job)
    row["seconds"] = time.perf_counter() - started
    row["load_rss_bytes"] = load_rss
    row["vra"] = {eps_key(e): row["vra"][eps_key(e)] for e in job.eps}
    return row


def _certify_locally(model, dataset, job: _Job) -> dict:
    """``bcp.certify`` / ``kw.certify`` on every sample at every ε, on the normalised graph."""
    import torch

    from glorocert.api import (
        _forward,
        _normaliser,
        local_options,
        local_slack,
        normalised_graph,
        normalization_of,
    )
    from glorocert.certify import gloro
    from glorocert.certify import bcp, kw
    from glorocert.results import eps_key

    module = {"bcp": bcp, "kw": kw}[job.method]
    normalization = normalization_of(dataset.mean, dataset.std)
    graph = normalised_graph(model.graph, normalization)
    options = local_options(module, graph, job.bound, normalization)  # BCP reuses the frozen bound's norms, as the cascade does
    rtol = max(gloro.ROUNDING_RTOL, 4 * model.equivalence_gap)  # as api.certify
    shift, scale = _normaliser(normalization, len(model.input_shape))
    samples, correct_total, labelled = 0, 0, 0
    certified = {eps_key(e): 0 for e in job.eps}
    for batch in dataset.batches(job.batch_size):
        x = batch.x if scale is None else (batch.x - shift) / scale
        logits = _forward(model, x, job.batch_size)
        predicted = logits.argmax(axis=1)
        correct = (predicted == batch.y) if batch.y is not None else np.ones(len(predicted), bool)
        if batch.y is not None:
            correct_total += int(correct.sum())
            labelled += len(predicted)
        pixels, classes = torch.from_numpy(batch.x), torch.from_numpy(predicted)
        for e in job.eps:
            ok = module.certify(graph, pixels, classes, e, slack=local_slack(logits, rtol), **options).numpy()
            certified[eps_key(e)] += int((ok & correct).sum())
        samples += len(predicted)
    if not samples:
        raise GlorocertError(f"{dataset.name}: no samples to certify")
    return {
        "samples": samples,
        "clean_accuracy": correct_total / labelled if labelled else None,
        "vra": {k: v / samples for k, v in certified.items()},
    }


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes.

    Linux: ``VmHWM`` of /proc/self/status. Not ``ru_maxrss``, which survives fork and exec: a child
    spawned by a large parent would report the parent's peak as its own.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def _call(target, argument) -> dict:
    """``{"status": "ok", **target(argument)}``, or the status and message of the exception it raised."""
    try:
        return {"status": "ok", **target(argument)}
    except GlorocertError as e:
        return {"status": "out of memory" if "out of memory" in str(e) else "unsupported", "error": str(e)}
    except MemoryError as e:
        return {"status": "out of memory", "error": str(e) or "MemoryError"}
    except Exception as e:  # noqa: BLE001 — reported in the method's row, never a traceback in the report
        text = str(e).lower()
        return {"status": "out of memory" if "alloc" in text and "memory" in text else "failed", "error": f"{type(e).__name__}: {e}"}


def _child(conn, target, argument) -> None:
    """Child process: run ``target(argument)``; send back {status, …, peak_rss_bytes}."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops this process
    result = _call(target, argument)
    result["peak_rss_bytes"] = peak_rss_bytes()
    conn.send(result)
    conn.close()


def run_here(target: Callable, argument) -> dict:
    """:func:`run_isolated` without the process: same result, but no per-method memory (``None``)."""
    return {**_call(target, argument), "peak_rss_bytes": None, "load_rss_bytes": None}


def run_isolated(target: Callable, argument, *, poll_seconds: float = 0.2) -> dict:
    """``target(argument)`` in a fresh *spawned* process; its result dict with ``status`` and ``peak_rss_bytes``.

    ``target`` must be importable (a module-level function). A child that dies
    without answering (killed, segfault) gives ``status="crashed"`` and a
    message; Ctrl-C in the parent stops the child and propagates.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, target, argument), daemon=True)
    process.start()
    send.close()  # the child holds the only writer: its death closes the pipe
    try:
        result = None
        while process.is_alive() or receive.poll(0):
            if receive.poll(poll_seconds):
                try:
                    result = receive.recv()
                except EOFError:
                    pass
                break
        process.join()
    except BaseException:
        process.terminate()
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
        raise
    finally:
        receive.close()
    if result is None:
        why = _exit_reason(process.exitcode)
        result = {"status": "crashed", "error": f"the child process died without a result ({why})", "peak_rss_bytes": None}
    return result


def _exit_reason(code: int | None) -> str:
    import signal

    if code is None or code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "an unknown signal"
    return f"killed by {name}, signal {-code}" + ("; out of memory?" if -code == signal.SIGKILL else "")


# --------------------------------------------------------------------------- rendering


def report_table(report: dict, title: str | None = None):
    """The comparison as a rich table: one row per method, one VRA column per ε, why a method did not run."""
    from rich.table import Table

    def mib(value):
        return "—" if value is None else f"{value / 2**20:.0f} MiB"

    eps_keys = [format(float(e), "g") for e in report["eps"]]
    table = Table(title=title or f"certifiers on {Path(report['model']).name}, {report['dataset']} (each method in a fresh process)",
                  title_justify="left", caption_justify="left")
    for col in ("method", "samples", "clean", *(f"VRA ε={k}" for k in eps_keys), "seconds", "s/sample", "× gloro /sample", "peak RSS"):
        table.add_column(col, justify="left" if col == "method" else "right")
    notes = []  # below the table, so that narrow terminals keep the numbers readable
    for row in report["methods"]:
        method = row["method"] + (f" ({report['fallback']})" if row["method"] == "cascade" else "")
        if row["status"] != "ok":
            table.add_row(method, str(row.get("samples", "")), *["—"] * (len(eps_keys) + 4), mib(row.get("peak_rss_bytes")))
            notes.append(f"{method}: [red]{row['status']}:[/] {row.get('error', '')}")
            continue
        ratio = row.get("time_ratio_vs_gloro")
        if row["method"] == "kw" and report.get("kw_limit") and row["samples"] < report["samples"]:
            notes.append(f"kw: first {row['samples']} samples only (--kw-limit {report['kw_limit']})")
        if "local" in row:
            lo = row["local"]
            rescued = ", ".join(f"{v} at ε={k}" for k, v in lo["rescued"].items())
            notes.append(f"{method}: {lo['local_method']} ran on {lo['local_samples']} ⊥ samples ({lo['local_passes']} "
                         f"sample·ε passes, {lo['local_seconds']:.2f} s) and rescued {rescued}")
        clean = row.get("clean_accuracy")
        peak = mib(row["peak_rss_bytes"])
        if row.get("load_rss_bytes") and row["peak_rss_bytes"]:
            peak += f" (+{(row['peak_rss_bytes'] - row['load_rss_bytes']) / 2**20:.0f})"
        table.add_row(
            method, str(row["samples"]), "n/a" if clean is None else f"{100 * clean:.1f}%",
            *(f"{100 * row['vra'][k]:.1f}%" for k in eps_keys),
            f"{row['seconds']:.2f}", f"{row['seconds_per_sample']:.2e}",
            "—" if ratio is None else f"{ratio:,.0f}×" if ratio >= 10 else f"{ratio:.2f}×",
            peak,
        )
    table.caption = "\n".join(notes) or None
    return table


__all__ = ["METHODS", "Source", "compare_local", "parse_methods", "peak_rss_bytes", "report_table", "run_here", "run_isolated", "succeeded"]
