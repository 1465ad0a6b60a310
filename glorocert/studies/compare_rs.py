"""GloRo vs randomized smoothing on identical samples, side by side.

GloRo's certificate is deterministic (given a sound bound); smoothing's holds
with probability ≥ 1 − α per sample, for the *smoothed* classifier g, not for
the base model. The table says which is which.

Smoothing is slow (n noisy forward passes per input), so its rows are
appended to ``smoothing-rows.jsonl`` as they finish; ``resume=True`` reads
that file and continues where an interrupted run stopped. Each sample's noise
comes from its own seeded generator, so resumed rows equal uninterrupted ones.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from glorocert.api import ROWS_SCHEMA_VERSION, Dataset, Model, certify
from glorocert.certify import smoothing
from glorocert.errors import GlorocertError
from glorocert.files import jsonable, write_json
from glorocert.results import certified_accuracy_curve, plot_curves, write_rows

DEFAULT_GRID = tuple(np.round(np.arange(0.0, 2.01, 0.25), 2))
SMOOTHING_ROWS = "smoothing-rows.jsonl"  # appended as rows finish: the resume state
RESULT_FILES = ("gloro-rows.csv", "smoothing-rows.csv", "summary.json")  # published together at the end


class EveryKth:
    """A view of a dataset keeping every ``skip``-th sample (Cohen evaluated every 20th test image)."""

    def __init__(self, dataset: Dataset, skip: int):
        if skip < 1:
            raise GlorocertError("--skip must be ≥ 1")
        self.dataset, self.skip = dataset, skip
        for attr in ("shape", "num_classes", "has_labels", "normalization"):
            setattr(self, attr, getattr(dataset, attr))
        self.name = dataset.name + (f" (every {skip}th)" if skip > 1 else "")
        self.num_samples = len(range(0, dataset.num_samples, skip))

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


def read_finished(path: Path) -> list[dict]:
    """Rows already appended; a torn last line (crash mid-write) is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
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
    if sigma <= 0:
        raise GlorocertError("--sigma must be positive")
    smoothing.check_parameters(n0, n, alpha)
    subset = EveryKth(dataset, skip)
    gloro = certify(gloro_model, subset, [0.0], batch_size=256, progress=(lambda k: progress("gloro", k)) if progress else None)
    smooth = smoothing.Smooth(_base_forward(base_model, dataset), base_model.num_classes, sigma, batch_size=batch,
                              device=base_model.runner.device)
    rows_path = Path(out_dir) / SMOOTHING_ROWS if out_dir else None
    started = time.perf_counter()
    rows = _smoothing_rows(smooth, subset, rows_path, resume, dict(n0=n0, n=n, alpha=alpha, seed=seed), progress)
    smoothing_seconds = time.perf_counter() - started
    g = gloro.rows
    table = [
        _method_row("GloRo", "deterministic" + (" (ESTIMATE bound)" if gloro.bound.mode == "estimate" else ""),
                    g["radius"], g["correct"], gloro.summary["seconds"], grid),
        _method_row(f"smoothing σ={sigma:g}", f"probabilistic, α={alpha:g} per sample", rows["radius"],
                    rows["correct"].astype(bool), float(rows["seconds"].sum()), grid),
    ]
    summary = {
        "dataset": subset.name, "num_samples": subset.num_samples, "sigma": sigma, "n0": n0, "n": n, "alpha": alpha,
        "seed": seed, "gloro_model": str(gloro_model.path), "base_model": str(base_model.path),
        "bound_mode": gloro.bound.mode, "methods": table, "wall_seconds_smoothing_this_run": smoothing_seconds,
        "speed_ratio_smoothing_over_gloro": (table[1]["seconds_per_sample"] or 0) / (table[0]["seconds_per_sample"] or 1),
        "rows_schema_version": ROWS_SCHEMA_VERSION,
    }
    if out_dir:
        _write_outputs(Path(out_dir), g, rows, summary)
    return Comparison(g, rows, table, tuple(grid), summary)


def _base_forward(base_model: Model, dataset: Dataset):
    """The base model's torch forward on [0, 1] pixels: smoothing adds noise there, so normalisation is its first layer."""
    forward, norm = base_model.runner.torch, dataset.normalization
    return forward if norm is None else (lambda x: forward(norm.apply(x)))


def _smoothing_rows(smooth, subset: EveryKth, rows_path: Path | None, resume: bool, parameters: dict, progress) -> dict:
    """CERTIFY on every sample not already in ``rows_path``; each row is appended (and fsynced) as it finishes."""
    finished = read_finished(rows_path) if (rows_path and resume) else []
    if rows_path and not resume and rows_path.exists():
        raise GlorocertError(f"{rows_path} exists; pass --resume to continue that run, or choose another --out")
    if rows_path:
        rows_path.parent.mkdir(parents=True, exist_ok=True)
        with open(rows_path, "w") as f:  # rewrite only complete lines, then append
            f.writelines(json.dumps(r) + "\n" for r in finished)
    sink = open(rows_path, "a") if rows_path else None

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
