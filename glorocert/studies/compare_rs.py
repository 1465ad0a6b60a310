"""GloRo vs randomized smoothing on identical samples, side by side.

GloRo's certificate is deterministic (given a sound bound); smoothing's holds
with probability ≥ 1 − α per sample, for the *smoothed* classifier g, not for
the base model. The table says which is which.

Smoothing is slow (n noisy forward passes per input), so its rows are
appended to ``smoothing-rows.jsonl`` as they finish; ``resume=True`` reads
that file and continues where an interrupted run stopped. Each sample's noise
comes from its own seeded generator, so resumed rows equal uninterrupted ones.
The file is only ever appended to: a resumed run cuts a torn last line (a
crash mid-write) and appends after the complete ones, so an interrupt at any
moment keeps every finished row. What the rows depend on (σ, n0, n, α, seed,
skip, both models' sha256, the samples, the normalisation, the rows' schema)
is recorded in ``smoothing-run.json`` when a run starts; ``resume=True``
refuses rows made with anything else.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from glorocert import distributed
from glorocert.api import ROWS_SCHEMA_VERSION, CertifyWork, Dataset, Model, ModelRecipe, certify, resolve_bound
from glorocert.certify import smoothing
from glorocert.errors import GlorocertError
from glorocert.files import jsonable, write_json
from glorocert.results import certified_accuracy_curve, plot_curves, write_rows

DEFAULT_GRID = tuple(np.round(np.arange(0.0, 2.01, 0.25), 2))
SMOOTHING_ROWS = "smoothing-rows.jsonl"  # appended as rows finish: the resume state
MANIFEST = "smoothing-run.json"  # what those rows depend on, written when a run starts: --resume refuses a mismatch
MANIFEST_FORMAT = 1
RESULT_FILES = ("gloro-rows.csv", "smoothing-rows.csv", "summary.json")  # published together at the end
RAY_SAMPLES_PER_CALL = 2  # --ray: samples per worker call (each costs n forward passes: small calls balance the load)
RAY_PART_SAMPLES = 32  # --ray: kept samples per part, the unit written and resumed


class EveryKth:
    """A view of a dataset keeping every ``skip``-th sample (Cohen evaluated every 20th test image)."""

    def __init__(self, dataset: Dataset, skip: int):
        if skip < 1:
            raise GlorocertError(f"--skip must be ≥ 1 (got {skip})")
        self.dataset, self.skip = dataset, skip
        for attr in ("shape", "num_classes", "has_labels", "normalization"):
            setattr(self, attr, getattr(dataset, attr))
        self.name = dataset.name + (f" (every {skip}th)" if skip > 1 else "")
        start = window_start(dataset)  # samples are kept by their index in the source, so windows can be merged
        self.num_samples = len(range(-(-start // skip) * skip, start + dataset.num_samples, skip))

    def batches(self, batch_size: int):
        for batch in self.dataset.batches(batch_size):
            keep = batch.index % self.skip == 0
            if keep.any():
                yield type(batch)(batch.index[keep], batch.x[keep], None if batch.y is None else batch.y[keep])


@dataclass
class Comparison:
    gloro_rows: dict
    smoothing_rows: dict
    table: list[dict]  # one row per method
    grid: tuple[float, ...]
    summary: dict


def window_start(dataset: Dataset) -> int:
    """The index (in its source) of the dataset's first sample."""
    return int(dataset._start)


def check_parameters(*, sigma: float, n0: int, n: int, alpha: float, skip: int, batch: int = 1000) -> None:
    """Refuse any parameter that cannot work, before anything is loaded (the CLI calls this first)."""
    if not (isinstance(sigma, numbers.Real) and math.isfinite(sigma) and sigma > 0):
        raise GlorocertError(f"--sigma must be a positive number (got {sigma})")
    if skip < 1:
        raise GlorocertError(f"--skip must be ≥ 1 (got {skip}): keep every k-th sample, k = 1 for all")
    if batch < 1:
        raise GlorocertError(f"--batch-size must be ≥ 1 (got {batch})")
    smoothing.check_parameters(n0, n, alpha)


def check_out(out_dir: Path | None, resume: bool) -> None:
    """Refuse, before anything is loaded, an --out this run cannot use: rows without --resume, or rows without a manifest."""
    if out_dir is None:
        if resume:
            raise GlorocertError("--resume needs --out DIR (where the interrupted run wrote its rows)")
        return
    out_dir = Path(out_dir)
    rows = out_dir / SMOOTHING_ROWS
    if out_dir.exists() and not out_dir.is_dir():
        raise GlorocertError(f"--out {out_dir} exists and is not a directory")
    if rows.exists() and not resume:
        raise GlorocertError(f"{rows} exists; pass --resume to continue that run, or choose another --out")
    if rows.exists() and not (out_dir / MANIFEST).exists():
        raise GlorocertError(
            f"{out_dir} holds {SMOOTHING_ROWS} but no {MANIFEST} (written by another tool or glorocert version), so its "
            f"rows cannot be checked against this run's settings; move {out_dir} away and run without --resume, or choose "
            "another --out")


def run_manifest(gloro_model: Model, base_model: Model, dataset: Dataset, *, sigma: float, n0: int, n: int,
                 alpha: float, skip: int, seed: int) -> dict:
    """Everything the smoothing rows depend on, as JSON values (what :data:`MANIFEST` holds)."""
    norm = dataset.normalization
    return jsonable({
        "format": MANIFEST_FORMAT, "rows_schema_version": ROWS_SCHEMA_VERSION, "row_columns": smoothing.ROW_COLUMNS,
        "sigma": float(sigma), "n0": n0, "n": n, "alpha": float(alpha), "seed": seed, "skip": skip,
        "gloro_model_sha256": gloro_model.sha256, "base_model_sha256": base_model.sha256,
        "dataset": dataset.name, "start": window_start(dataset), "num_samples": dataset.num_samples,
        "normalization": None if norm is None else norm.to_json(),
    })


def start_run(out_dir: Path | None, resume: bool, manifest: dict) -> None:
    """Record ``manifest`` in ``out_dir`` (at once, atomically) when a run starts; with ``resume``, refuse rows made
    with other settings, naming each difference. Call it before the results are staged (cli: before publishing)."""
    check_out(out_dir, resume)
    if out_dir is None:
        return
    path = Path(out_dir) / MANIFEST
    old = _read_manifest(path) if path.exists() else None
    if old == manifest:
        return
    if resume and old is not None:
        changes = [f"{key} {_short(old.get(key))} → {_short(manifest.get(key))}"
                   for key in sorted(set(old) | set(manifest)) if old.get(key) != manifest.get(key)]
        raise GlorocertError(f"cannot resume {out_dir}: its rows were made with other settings ({'; '.join(changes)}); "
                             "rerun with the same settings, or without --resume into another --out")
    write_json(path, manifest)


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GlorocertError(f"{path} is unreadable ({e}); cannot check the rows beside it: choose another --out") from None


def _short(value) -> str:
    return f"{value[:12]}…" if isinstance(value, str) and len(value) == 64 else str(value)


def finished_rows(path: Path) -> list[dict]:
    """The rows an interrupted run appended. A torn last line (a crash mid-write) is cut off the file, which is
    otherwise left as it is (appended to afterwards, never rewritten); a damaged complete line is refused."""
    if not path.is_file():
        return []
    with open(path, "r+b") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
    rows = []
    for number, line in enumerate(data[:end].splitlines(), 1):
        try:
            row = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if not isinstance(row, dict) or not set(smoothing.ROW_COLUMNS) <= row.keys():
            raise GlorocertError(f"{path}: line {number} is not a smoothing row; cannot resume (choose another --out)")
        rows.append(row)
    return rows


def _method_row(name: str, guarantee: str, radius: np.ndarray, correct: np.ndarray, seconds: float, grid) -> dict:
    _, accuracy = certified_accuracy_curve(radius, correct, np.asarray(grid))
    n = len(radius)
    return {
        "method": name,
        "guarantee": guarantee,
        "certified_accuracy": {f"{r:g}": float(a) for r, a in zip(grid, accuracy)},
        "acr": float(np.where(correct, radius, 0.0).mean()) if n else 0.0,
        "samples_per_second": n / seconds if seconds > 0 else None,
        "seconds_per_sample": seconds / n if n else None,
    }


def compare_rs(
    gloro_model: Model,
    base_model: Model,
    dataset: Dataset,
    *,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch: int = 1000,
    skip: int = 1,
    seed: int = 0,
    out_dir: Path | None = None,
    resume: bool = False,
    grid=DEFAULT_GRID,
    progress: Callable[[str, int], None] | None = None,
) -> Comparison:
    """GloRo and Cohen et al.'s CERTIFY on the same samples (every ``skip``-th); see the module docstring for resume."""
    check_parameters(sigma=sigma, n0=n0, n=n, alpha=alpha, skip=skip, batch=batch)
    start_run(out_dir, resume, run_manifest(gloro_model, base_model, dataset, sigma=sigma, n0=n0, n=n, alpha=alpha,
                                            skip=skip, seed=seed))
    subset = EveryKth(dataset, skip)
    gloro = certify(gloro_model, subset, [0.0], batch_size=256, progress=(lambda k: progress("gloro", k)) if progress else None)
    smooth = smoothing.Smooth(_base_forward(base_model, dataset), base_model.num_classes, sigma, batch_size=batch,
                              device=base_model.runner.device)
    rows_path = Path(out_dir) / SMOOTHING_ROWS if out_dir else None
    started = time.perf_counter()
    rows = _smoothing_rows(smooth, subset, rows_path, resume, dict(n0=n0, n=n, alpha=alpha, seed=seed), progress)
    smoothing_seconds = time.perf_counter() - started
    result = comparison(gloro.rows, rows, gloro_model, base_model, subset.name, gloro.bound.mode,
                        gloro.summary["seconds"], dict(sigma=sigma, n0=n0, n=n, alpha=alpha, seed=seed), grid,
                        wall_seconds_smoothing_this_run=smoothing_seconds)
    if out_dir:
        _write_outputs(Path(out_dir), result.gloro_rows, rows, result.summary)
    return result


def comparison(gloro_rows: dict, smoothing_rows: dict, gloro_model: Model, base_model: Model, dataset_name: str,
               bound_mode: str, gloro_seconds: float, parameters: dict, grid=DEFAULT_GRID, **timings) -> Comparison:
    """Both methods' rows side by side: the table (certified accuracy on ``grid``, ACR, speed) and the summary.
    ``parameters``: σ, n0, n, α, seed; ``timings``: more wall-clock figures for the summary."""
    sigma, alpha = parameters["sigma"], parameters["alpha"]
    table = [
        _method_row("GloRo", "deterministic" + (" (ESTIMATE bound)" if bound_mode == "estimate" else ""),
                    gloro_rows["radius"], gloro_rows["correct"], gloro_seconds, grid),
        _method_row(f"smoothing σ={sigma:g}", f"probabilistic, α={alpha:g} per sample", smoothing_rows["radius"],
                    smoothing_rows["correct"].astype(bool), float(smoothing_rows["seconds"].sum()), grid),
    ]
    summary = {
        "dataset": dataset_name, "num_samples": len(gloro_rows["index"]), **parameters,
        "gloro_model": str(gloro_model.path), "base_model": str(base_model.path),
        "bound_mode": bound_mode, "methods": table, **timings,
        "speed_ratio_smoothing_over_gloro": (table[1]["seconds_per_sample"] or 0) / (table[0]["seconds_per_sample"] or 1),
        "rows_schema_version": ROWS_SCHEMA_VERSION,
    }
    return Comparison(gloro_rows, smoothing_rows, table, tuple(grid), summary)


@dataclass(frozen=True)
class RsWork:
    """compare-rs's per-batch work on a Ray worker: the GloRo rows (at ε = 0, as in process) and Cohen's CERTIFY
    on every sample, its noise seeded by (seed, index) as in process; columns ``gloro.*`` and ``smoothing.*``."""

    gloro: CertifyWork
    base: ModelRecipe
    parameters: dict  # sigma, n0, n, alpha, seed
    batch: int = 1000

    def __call__(self, localize):
        certifier = self.gloro(localize)
        base = certifier.model if self.base == self.gloro.model else self.base.load(localize)
        smooth = smoothing.Smooth(_base_forward(base, self.gloro.dataset), base.num_classes, self.parameters["sigma"],
                                  batch_size=self.batch, device=base.runner.device)
        certify_options = {k: self.parameters[k] for k in ("n0", "n", "alpha", "seed")}

        def rows(batch) -> dict:
            started = time.perf_counter()
            gloro = certifier(batch)
            gloro["seconds"] = np.full(len(batch.index), (time.perf_counter() - started) / len(batch.index))
            smoothed = smoothing.certify_batches(smooth, [(batch.index, batch.x, batch.y)], **certify_options)
            return {"index": batch.index, **{f"gloro.{k}": v for k, v in gloro.items() if k != "index"},
                    **{f"smoothing.{k}": v for k, v in smoothed.items() if k != "index"}}

        return rows


def compare_rs_on_ray(gloro_model: Model, base_model: Model, recipes: tuple[ModelRecipe, ModelRecipe], dataset: Dataset,
                      out_dir: Path, *, sigma: float, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                      batch: int = 1000, skip: int = 1, seed: int = 0, address: str | None = None,
                      workers: int | None = None, resume: bool = False, grid=DEFAULT_GRID,
                      progress: Callable[[str, int], None] | None = None) -> Comparison:
    """:func:`compare_rs` on a Ray cluster (glorocert/distributed.py): both methods' rows as Parquet parts under
    ``out_dir`` (columns ``gloro.*``, ``smoothing.*``), resumable, equal to the in-process rows (``seconds``
    aside: GloRo's hold each sample's share of its batch's time); ``summary.json`` beside them. ``recipes``: how
    each worker loads the GloRo and the base model (the same recipe twice when they are one model)."""
    check_parameters(sigma=sigma, n0=n0, n=n, alpha=alpha, skip=skip, batch=batch)
    bound, source = resolve_bound(gloro_model, None, dataset.normalization)
    parameters = dict(sigma=float(sigma), n0=n0, n=n, alpha=float(alpha), seed=seed)
    work = RsWork(CertifyWork(recipes[0], bound, source, dataset.detached(), [0.0]), recipes[1], parameters, batch)
    identity = {**parameters, "gloro_model_sha256": gloro_model.sha256, "base_model_sha256": base_model.sha256,
                "bound_sha256": bound.to_json()["content_sha256"], "row_columns": smoothing.ROW_COLUMNS}
    job = distributed.Job("compare-rs", work, identity, RAY_SAMPLES_PER_CALL, RAY_PART_SAMPLES * skip, skip,
                          tuple(dict.fromkeys(recipes[0].files + recipes[1].files)), ROWS_SCHEMA_VERSION)
    both = (lambda k: (progress("gloro", k), progress("smoothing", k))) if progress else None
    started = time.perf_counter()
    run = distributed.run(job, dataset, out_dir, address=address, workers=workers, resume=resume, progress=both)
    tables: dict[str, dict] = {"gloro": {"index": run.rows["index"]}, "smoothing": {"index": run.rows["index"]}}
    for name, values in run.rows.items():
        table, _, column = name.partition(".")
        if column:
            tables[table][column] = values
    result = comparison(tables["gloro"], tables["smoothing"], gloro_model, base_model, EveryKth(dataset, skip).name,
                        bound.mode, float(tables["gloro"]["seconds"].sum()), parameters, grid,
                        wall_seconds_this_run=time.perf_counter() - started, distributed=run.report())
    write_json(Path(out_dir) / RESULT_FILES[-1], result.summary)
    return result


def _base_forward(base_model: Model, dataset: Dataset):
    """The base model's torch forward on [0, 1] pixels: smoothing adds noise there, so normalisation is its first layer."""
    forward, norm = base_model.runner.torch, dataset.normalization
    return forward if norm is None else (lambda x: forward(norm.apply(x)))


def _smoothing_rows(smooth, subset: EveryKth, rows_path: Path | None, resume: bool, parameters: dict, progress) -> dict:
    """CERTIFY on every sample not already in ``rows_path``; each row is appended (and fsynced) as it finishes."""
    finished = finished_rows(rows_path) if (rows_path and resume) else []
    if rows_path:
        rows_path.parent.mkdir(parents=True, exist_ok=True)
    sink = open(rows_path, "a") if rows_path else None  # appended to, never rewritten

    def on_row(row: dict) -> None:
        if sink:
            sink.write(json.dumps(jsonable(row)) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
        if progress:
            progress("smoothing", 1)

    if progress and finished:
        progress("smoothing", len(finished))
    try:
        new = smoothing.certify_batches(smooth, ((b.index, b.x, b.y) for b in subset.batches(256)), on_row=on_row,
                                        skip_indices={int(r["index"]) for r in finished}, **parameters)
    finally:
        if sink:
            sink.close()
    rows = {k: np.concatenate([np.asarray([r[k] for r in finished]), np.asarray(new[k])]) if finished else np.asarray(new[k])
            for k in smoothing.ROW_COLUMNS}
    order = np.argsort(rows["index"], kind="stable")
    return {k: v[order] for k, v in rows.items()}


def _write_outputs(out_dir: Path, gloro_rows: dict, smoothing_rows: dict, summary: dict) -> None:
    gloro_out = {k: v for k, v in gloro_rows.items() if "@" not in k}
    gloro_out["bottom"] = gloro_rows["radius"] <= 0
    gloro_path, smoothing_path, summary_path = (out_dir / name for name in RESULT_FILES)
    write_rows(gloro_path, gloro_out, ROWS_SCHEMA_VERSION)
    write_rows(smoothing_path, smoothing_rows, ROWS_SCHEMA_VERSION)
    write_json(summary_path, summary)


def plot_comparison(result: Comparison, path: Path) -> None:
    g, s = result.gloro_rows, result.smoothing_rows
    top = max(float(np.nanmax(np.where(np.isfinite(g["radius"]), g["radius"], 0), initial=0)),
              float(s["radius"].max(initial=0)), max(result.grid))
    grid = np.linspace(0, top * 1.05, 200)
    plot_curves(path, {
        result.table[0]["method"]: certified_accuracy_curve(g["radius"], g["correct"], grid),
        result.table[1]["method"]: certified_accuracy_curve(s["radius"], s["correct"].astype(bool), grid),
    }, f"GloRo vs randomized smoothing on {result.summary['dataset']}")
