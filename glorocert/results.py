"""Per-sample rows, summaries, tables and plots — written so a crash never leaves half a file.

Every writer goes through :func:`glorocert.files.atomic_write`, so after an
exception, a crash or Ctrl-C a target either holds the previous complete
file or does not exist.

Radii are written at full float64 precision (shortest round-trip ``repr``
in CSV/JSONL, float64 in Parquet): a radius must never be rounded up on its
way to disk, or a reloaded certificate would claim more than was proven.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from glorocert.errors import GlorocertError
from glorocert.files import atomic_write, write_json  # noqa: F401 - write_json: results are written through here too

__all__ = [
    "ROW_FORMATS",
    "atomic_write",
    "certified_accuracy_curve",
    "eps_key",
    "plot_curves",
    "check_output_path",
    "read_rows",
    "summarize",
    "write_json",
    "write_rows",
]

ROW_FORMATS = (".csv", ".jsonl", ".parquet")
PLOT_FORMATS = (".png", ".svg", ".pdf")
SCHEMA_METADATA_KEY = b"glorocert.schema_version"


def check_output_path(path: str | os.PathLike | None, formats: Sequence[str]) -> None:
    """Refuse an unknown format or an unwritable location before any work is done (nothing is written on a usage error)."""
    if path is None:
        return
    path = Path(path)
    if path.suffix.lower() not in formats:
        raise GlorocertError(f"{path}: unknown format {path.suffix or '(no extension)'}; use one of {', '.join(formats)}")
    parent = next(p for p in path.absolute().parents if p.exists())  # missing directories are created later
    try:  # a real probe: permission bits say little to root or on special file systems
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise GlorocertError(f"{path}: cannot write to {parent} ({e.strerror}); choose a writable location") from None


def eps_key(eps: float) -> str:
    """Stable text for an eps/radius value (``0.3`` → ``"0.3"``, also from float32), used in column and summary keys."""
    return format(float(eps), "g")


# --------------------------------------------------------------------------- rows


def write_rows(path: str | os.PathLike, columns: Mapping[str, np.ndarray], schema_version: str,
               metadata: Mapping[str, str] | None = None) -> None:
    """Write one row per sample as CSV, JSONL or Parquet (by extension), atomically, in column order.

    Parquet stores ``schema_version`` in the file metadata
    (``glorocert.schema_version``), and ``metadata`` beside it (``glorocert.KEY``); CSV and JSONL stay plain
    tables that any tool reads (NaN/inf appear as Python writes them: ``nan``/``inf`` in CSV,
    ``NaN``/``Infinity`` in JSONL).
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in ROW_FORMATS:
        raise GlorocertError(f"{target}: unknown results format {suffix or '(no extension)'}; use one of {', '.join(ROW_FORMATS)}")
    arrays = {name: np.asarray(values) for name, values in columns.items()}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) > 1:
        raise ValueError(f"columns have different lengths: { {n: len(a) for n, a in arrays.items()} }")
    with atomic_write(target) as tmp:
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({name: pa.array(a) for name, a in arrays.items()})
            extra = {f"glorocert.{key}".encode(): str(value).encode() for key, value in (metadata or {}).items()}
            table = table.replace_schema_metadata({SCHEMA_METADATA_KEY: str(schema_version).encode(), **extra})
            pq.write_table(table, tmp)
            return
        names, rows = list(arrays), next(iter(lengths), 0)
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            if suffix != ".csv":
                def write(lists):
                    f.writelines(json.dumps(dict(zip(names, row))) + "\n" for row in zip(*lists))
            elif all(a.dtype.kind in "biuf" for a in arrays.values()):  # numbers need no quoting: one format per row
                writer.writerow(names)
                line = ",".join(["%s"] * len(names)) + "\n"

                def write(lists):
                    f.writelines(map(line.__mod__, zip(*lists)))  # str(float) is the shortest exact repr; % beats format
            else:
                writer.writerow(names)

                def write(lists):
                    writer.writerows(zip(*lists))
            for start in range(0, rows, _TEXT_CHUNK):  # as Python values one chunk at a time: 10⁸ rows never become 10⁹ objects
                write([_python_values(a[start : start + _TEXT_CHUNK]) for a in arrays.values()])


_TEXT_CHUNK = 1 << 16


def _python_values(a: np.ndarray) -> list:
    """Python scalars; float32 is widened to float64 first (exact) so its repr is the stored value."""
    return (a.astype(np.float64) if a.dtype.kind == "f" else a).tolist()


def read_rows(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a file written by :func:`write_rows` back into columns (bool, int64, float64 or str)."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in ROW_FORMATS:
        raise GlorocertError(f"{target}: unknown results format {suffix or '(no extension)'}; use one of {', '.join(ROW_FORMATS)}")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(target)
            return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        if suffix == ".csv":
            with open(target, newline="", encoding="utf-8") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header is None:
                    raise GlorocertError(f"{target} is empty; expected a header row")
                cells = list(zip(*reader)) or [()] * len(header)
            return {name: _parse_column(values) for name, values in zip(header, cells)}
        with open(target, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        names = list(records[0]) if records else []
        return {name: _typed([r.get(name) for r in records]) for name in names}
    except (OSError, ValueError) as e:
        raise GlorocertError(f"cannot read results {target}: {e}") from e


def _parse_column(texts: Sequence[str]) -> np.ndarray:
    """Type a CSV column: bool if all true/false, else int64, else float64, else str."""
    if texts and all(t.lower() in ("true", "false") for t in texts):
        return np.array([t.lower() == "true" for t in texts], dtype=bool)
    for kind in (int, float):
        try:
            return np.array([kind(t) for t in texts], dtype=np.int64 if kind is int else np.float64)
        except (ValueError, OverflowError):
            pass
    return np.array(texts, dtype=str)


def _typed(values: list) -> np.ndarray:
    if values and all(isinstance(v, bool) for v in values):
        return np.array(values, dtype=bool)
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.int64)
    if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
        return np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    return np.array(values, dtype=object)


# --------------------------------------------------------------------------- summaries


def certified_accuracy_curve(radius: np.ndarray, correct: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of samples that are correct with certified radius *strictly* above each grid radius.

    Strict, because a tie between a radius and eps is decided against
    certification (a point exactly on the ball's boundary is not proven).
    """
    grid = np.asarray(grid, dtype=np.float64)
    radius, correct = np.asarray(radius, dtype=np.float64), np.asarray(correct, dtype=bool)
    if len(radius) == 0:
        return grid, np.zeros_like(grid)
    good = np.sort(radius[correct])
    above = len(good) - np.searchsorted(good, grid, side="right")
    return grid, above / len(radius)


def summarize(columns: Mapping[str, np.ndarray], eps: Sequence[float], radius_grid: Sequence[float] | None = None) -> dict:
    """Clean accuracy, VRA and ⊥ rate per eps, average certified radius and the certified-accuracy curve.

    Labelled data (some ``label >= 0``): samples with an unknown label
    (``label == -1``; :func:`glorocert.data.open_dataset` never mixes them
    with known ones) count as "correct" for VRA, the average radius and the
    curve; ``clean_accuracy`` is over labelled samples only.

    Unlabelled data (no label known): nothing can be called accuracy, so
    ``clean_accuracy``, ``vra``, ``average_certified_radius`` and
    ``certified_accuracy`` are None, and the same figures over every
    prediction, right or wrong, come under names that say so:
    ``certified_rate`` (per eps, the fraction of samples not ⊥),
    ``average_radius`` (the mean certified radius of the predictions) and
    ``certified_rate_curve`` (``{"radius", "rate"}`` points: the fraction of
    samples certified strictly beyond each radius).
    """
    predicted = np.asarray(columns["predicted"])
    n = len(predicted)
    label = np.asarray(columns["label"]) if "label" in columns else np.full(n, -1, dtype=np.int64)
    radius = np.asarray(columns["radius"], dtype=np.float64)
    known = label >= 0
    correct = known & (predicted == label)
    counts = correct | ~known
    keys = [eps_key(e) for e in eps]
    if len(set(keys)) != len(keys):
        raise GlorocertError(f"eps values {list(eps)} are not distinct at 6 significant digits; drop the near-duplicates")
    bottoms = {key: np.asarray(columns[f"bottom@{key}"], dtype=bool) for key in keys}
    if radius_grid is None:
        finite = radius[np.isfinite(radius)]
        top = float(finite.max()) if len(finite) else 0.0
        radius_grid = np.linspace(0.0, top, 21) if top > 0 else np.zeros(1)
    grid, accuracy = certified_accuracy_curve(radius, counts, np.asarray(radius_grid, dtype=np.float64))
    bottom_rate = {key: _mean(bottom) for key, bottom in bottoms.items()}
    if not known.any():
        return _unlabelled_summary(n, radius, bottoms, bottom_rate, grid, accuracy)
    vra = {}
    for key, bottom in bottoms.items():
        certified = np.asarray(columns[f"certified@{key}"], dtype=bool) if f"certified@{key}" in columns else counts & ~bottom
        vra[key] = _mean(certified)
    return {
        "num_samples": n,
        "clean_accuracy": float(correct.sum() / known.sum()),
        "vra": vra,
        "bottom_rate": bottom_rate,
        "average_certified_radius": float(np.where(counts, radius, 0.0).mean()),
        "certified_accuracy": [{"radius": float(r), "accuracy": float(a)} for r, a in zip(grid, accuracy)],
    }


def _unlabelled_summary(n: int, radius: np.ndarray, bottoms: dict, bottom_rate: dict, grid, rate) -> dict:
    """The summary of data without labels: rates over every prediction, and None wherever accuracy would stand."""
    return {
        "num_samples": n,
        "clean_accuracy": None,
        "vra": None,
        "certified_rate": {key: _mean(~bottom) for key, bottom in bottoms.items()},
        "bottom_rate": bottom_rate,
        "average_certified_radius": None,
        "average_radius": float(radius.mean()) if n else None,
        "certified_accuracy": None,
        "certified_rate_curve": [{"radius": float(r), "rate": float(a)} for r, a in zip(grid, rate)],
    }


def _mean(flags: np.ndarray) -> float | None:
    return float(flags.mean()) if len(flags) else None


def plot_curves(
    path: str | os.PathLike,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    title: str,
    xlabel: str = "l2 radius (input in [0,1])",
) -> None:
    """Certified accuracy against radius, one line per method, written atomically as PNG/SVG/PDF."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in PLOT_FORMATS:
        raise GlorocertError(f"{target}: unknown plot format {suffix or '(no extension)'}; use one of {', '.join(PLOT_FORMATS)}")
    figure = Figure(figsize=(6, 4), layout="constrained")  # no pyplot: no global state, no GUI backend
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, (grid, accuracy) in curves.items():
        axes.plot(grid, accuracy, label=name)
    axes.set(title=title, xlabel=xlabel, ylabel="certified accuracy", ylim=(0, 1))
    axes.grid(alpha=0.3)
    if curves:
        axes.legend()
    with atomic_write(target) as tmp:
        figure.savefig(tmp, format=suffix[1:])
