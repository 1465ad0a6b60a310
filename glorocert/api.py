"""The public Python API; the CLI, the studies and training are built on it.

    import glorocert
    model = glorocert.load("model.onnx")            # native runner + IR, checked equal
    bound = glorocert.compute_bound(model)          # frozen Bound (sound by default)
    res = glorocert.certify(model, "mnist-5k", eps=[0.3, 1.58], bound=bound)
    res.rows; res.summary; res.plot("curve.png")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from glorocert.certify import pipeline
from glorocert.certify.methods import LOCAL_METHODS, METHODS
from glorocert.certify.pipeline import ROWS_SCHEMA_VERSION, CertifyResult, versions
from glorocert.data import Dataset, from_arrays, open_dataset
from glorocert.lipschitz.boundfile import Bound, default_path
from glorocert.lipschitz.freeze import compute_bound, resolve_bound
from glorocert.loaders import Model, load, parse_shape
from glorocert.normalization import Normalization


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
    dataset = open_dataset(data) if isinstance(data, str) else data
    return pipeline.certify(model, dataset, eps, bound=bound, batch_size=batch_size, method=method,
                            fallback=fallback, progress=progress)


def certify_locally_at(model: Model, data: Dataset | str, eps: Sequence[float], method: str, *,
                       bound: Bound | str | Path | None = None, batch_size: int = 256) -> dict:
    """BCP or KW on every sample at each requested ε (one pass each, no radius search): samples, clean accuracy, VRA per ε."""
    dataset = open_dataset(data) if isinstance(data, str) else data
    bound, _ = resolve_bound(model, bound, dataset.normalization)
    return pipeline.certify_locally_at(model, dataset, eps, method, bound, batch_size)


__all__ = [
    "load", "compute_bound", "resolve_bound", "certify", "certify_locally_at", "CertifyResult", "Bound", "Model",
    "Dataset", "Normalization", "open_dataset", "from_arrays", "parse_shape", "default_path", "versions",
    "METHODS", "LOCAL_METHODS", "ROWS_SCHEMA_VERSION",
]
