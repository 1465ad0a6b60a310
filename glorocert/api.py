"""The public Python API; the CLI is a thin rendering of it.

    import glorocert
    model = glorocert.load("model.onnx")            # native runner + IR, checked equal
    bound = glorocert.compute_bound(model)          # frozen Bound (sound by default)
    res = glorocert.certify(model, "mnist-5k", eps=[0.3, 1.58], bound=bound)
    res.rows; res.summary; res.plot("curve.png")
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from glorocert import __version__
from glorocert.certify import gloro
from glorocert.data import Dataset, open_dataset
from glorocert.errors import GlorocertError
from glorocert.lipschitz.boundfile import Bound, default_path
from glorocert.lipschitz.compose import compose
from glorocert.lipschitz.operators import EXACT_MAX_SIDE
from glorocert.loaders import Model, load
from glorocert.results import certified_accuracy_curve, eps_key, plot_curves, summarize

ROWS_SCHEMA_VERSION = "1"


def normalization_of(mean: Sequence[float] | None, std: Sequence[float] | None) -> dict | None:
    if mean is None and std is None:
        return None
    mean = [0.0] if mean is None else [float(m) for m in np.atleast_1d(mean)]
    std = [1.0] if std is None else [float(s) for s in np.atleast_1d(std)]
    if any(s <= 0 for s in std):
        raise GlorocertError(f"--std {std}: standard deviations must be positive")
    return {"mean": mean, "std": std}


def normalised_graph(graph, normalization: dict | None):
    """The graph seen from [0,1] pixels: normalisation applied outside the model becomes its first layer."""
    if not normalization:
        return graph
    mean, std = np.asarray(normalization["mean"]), np.asarray(normalization["std"])
    channels = graph.input_shape[0]
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise GlorocertError(f"--mean/--std have {len(mean)}/{len(std)} values; the model input has {channels} channels")
    mean, std = np.broadcast_to(mean, (channels,)), np.broadcast_to(std, (channels,))
    return graph.with_input_affine(1.0 / std, -mean / std)


def compute_bound(
    model: Model,
    *,
    mode: str = "sound",
    tol: float = 1e-4,
    max_iter: int = 5000,
    exact_side: int = EXACT_MAX_SIDE,
    normalization: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> Bound:
    """Bound the model's global l2 Lipschitz constant and margin matrix, once.

    ``sound`` uses guaranteed upper bounds (lipschitz/operators.py says why
    each is one); ``estimate`` uses power iteration only, which approaches
    the spectral norms from below and is labelled as an estimate. Input
    normalisation applied outside the model is folded in as a first layer.
    """
    if mode not in ("sound", "estimate"):
        raise GlorocertError(f"--mode {mode!r}: use sound or estimate")
    graph = normalised_graph(model.graph, normalization)
    result = compose(graph, tol=tol, max_iter=max_iter, exact_side=exact_side, progress=progress)
    return Bound(
        model_sha256=model.sha256,
        model_name=model.path.name,
        model_format=model.format,
        input_shape=list(model.input_shape),
        mode=mode,
        normalization=normalization,
        blocks=[
            {
                "name": b.name, "op": b.op, "in_shape": list(b.in_shape), "out_shape": list(b.out_shape),
                "estimate": b.estimate, "upper": b.upper, "method": b.method,
                "iterations": b.iterations, "converged": b.converged,
            }
            for b in result.blocks
        ],
        global_estimate=result.global_estimate,
        global_upper=result.global_upper,
        margin_estimate=result.margin_estimate,
        margin_upper=result.margin_upper,
        margin_method=result.margin_method,
        tol=tol,
        max_iter=max_iter,
        seconds=result.seconds,
    )


def resolve_bound(
    model: Model, bound: Bound | str | Path | None, normalization: dict | None, *, cache: bool = True
) -> tuple[Bound, str]:
    """``bound`` as given, else the file next to the model, else computed (and cached there)."""
    if isinstance(bound, Bound):
        source = "given"
    elif bound is not None:
        source, bound = str(bound), Bound.load(bound)
    elif default_path(model.path).is_file():
        source, bound = str(default_path(model.path)), Bound.load(default_path(model.path))
    else:
        bound = compute_bound(model, normalization=normalization)
        source = "computed"
        if cache:
            try:
                bound.save(default_path(model.path))
                source = f"computed, saved to {default_path(model.path)}"
            except GlorocertError:
                pass  # read-only model directory: the bound is still used for this run
    bound.check_matches(model.sha256, model.input_shape, normalization, source)
    if bound.margin_matrix.shape[0] != model.num_classes:
        raise GlorocertError(f"{source}: margin matrix is {bound.margin_matrix.shape[0]}×…, the model has {model.num_classes} classes")
    return bound, source


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
    sample, radius by bisection; ``cascade`` — gloro on everything, then the
    ``fallback`` local method only on samples that gloro leaves ⊥ at the
    largest ε, keeping the larger of the two radii.
    """
    if method not in METHODS:
        raise GlorocertError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if fallback not in ("bcp", "kw"):
        raise GlorocertError(f"--fallback {fallback!r}: use bcp or kw")
    eps = sorted({float(e) for e in eps})
    if not eps or any(not np.isfinite(e) or e < 0 for e in eps):
        raise GlorocertError(f"--eps {eps}: give one or more finite, non-negative radii")
    if batch_size <= 0:
        raise GlorocertError("--batch-size must be positive")
    dataset = open_dataset(data) if isinstance(data, str) else data
    if tuple(dataset.shape) != tuple(model.input_shape):
        raise GlorocertError(f"{dataset.name}: samples have shape {tuple(dataset.shape)}, the model takes {tuple(model.input_shape)}")
    normalization = normalization_of(dataset.mean, dataset.std)
    bound, source = resolve_bound(model, bound, normalization)
    margin_matrix = bound.margin_matrix
    rtol = max(gloro.ROUNDING_RTOL, 4 * model.equivalence_gap)
    shift, scale = _normaliser(normalization, len(model.input_shape))
    local = _local_certifier(method, fallback, model, normalization, max(eps))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("index", "label", "predicted", "runner_up", "margin", "radius", "seconds")}
    forward_seconds = 0.0
    started = time.perf_counter()
    for batch in dataset.batches(batch_size):
        if batch.y is not None and (batch.y >= model.num_classes).any():
            bad = int(np.argmax(batch.y >= model.num_classes))
            raise GlorocertError(
                f"{dataset.name}: row {int(batch.index[bad])} has label {int(batch.y[bad])}, but the model has {model.num_classes} classes"
            )
        x = batch.x if scale is None else (batch.x - shift) / scale
        t0 = time.perf_counter()
        logits = _forward(model, x, batch_size)
        forward_seconds += time.perf_counter() - t0
        if not np.isfinite(logits).all():
            row = int(batch.index[np.argmax(~np.isfinite(logits).all(axis=1))])
            raise GlorocertError(f"{dataset.name}: the model outputs NaN/inf on row {row}")
        predicted, runner_up, margin, radius = gloro.radii(logits, margin_matrix, rtol)
        seconds = np.zeros(len(radius))
        if local is not None:
            radius, seconds = local(batch.x, predicted, radius)
        parts["seconds"].append(seconds)
        parts["index"].append(batch.index)
        parts["label"].append(batch.y if batch.y is not None else np.full(len(batch.index), -1))
        parts["predicted"].append(predicted)
        parts["runner_up"].append(runner_up)
        parts["margin"].append(margin)
        parts["radius"].append(radius)
        if progress:
            progress(len(batch.index))
    seconds = time.perf_counter() - started
    if not parts["index"]:
        raise GlorocertError(f"{dataset.name}: no samples to certify")
    rows = {k: np.concatenate(v) for k, v in parts.items()}
    rows["label"] = rows["label"].astype(np.int64)
    rows["correct"] = (rows["predicted"] == rows["label"]) if dataset.has_labels else np.ones(len(rows["index"]), bool)
    for e in eps:
        rows[f"bottom@{eps_key(e)}"] = gloro.bottom_flags(rows["radius"], e)
        rows[f"certified@{eps_key(e)}"] = rows["correct"] & ~rows[f"bottom@{eps_key(e)}"]
    summary = summarize(rows, eps)
    if local is not None:
        summary.update(local.report(rows, eps))
    summary.update(
        method=method,
        dataset=dataset.name,
        model=str(model.path),
        model_format=model.format,
        runner=model.runner.description,
        device=model.runner.device,
        bound_file=source,
        bound_mode=bound.mode,
        bound_model_sha256=bound.model_sha256,
        lipschitz=bound.lipschitz,
        margin_method=bound.margin_method,
        seconds=seconds,
        forward_seconds=forward_seconds,
        samples_per_second=len(rows["index"]) / seconds if seconds > 0 else None,
        rows_schema_version=ROWS_SCHEMA_VERSION,
        versions=versions(),
    )
    return CertifyResult(rows, summary, eps, bound)


def _forward(model: Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The native forward pass; running out of memory becomes advice instead of a traceback."""
    try:
        return model.runner(x)
    except MemoryError:
        pass
    except Exception as e:  # torch.OutOfMemoryError, onnxruntime's allocation failures
        if "memory" not in str(e).lower() and "alloc" not in str(e).lower():
            raise
    raise GlorocertError(f"out of memory at --batch-size {batch_size}; try --batch-size {max(1, batch_size // 4)}")


METHODS = ("gloro", "bcp", "kw", "cascade")


class _LocalStage:
    """Local-bound certification of selected samples (all for bcp/kw, gloro's ⊥ ones for cascade)."""

    def __init__(self, method: str, module, graph, eps_max: float):
        self.method, self.module, self.graph = method, module, graph
        self.eps_max = eps_max
        self.search_max = max(2.0, 2.0 * eps_max)
        self.samples, self.seconds = 0, 0.0
        self.rescued_from: dict[int, float] = {}  # index position → gloro radius, for the cascade report

    def __call__(self, x: np.ndarray, predicted: np.ndarray, gloro_radius: np.ndarray):
        chosen = np.ones(len(x), bool) if self.method != "cascade" else gloro_radius <= self.eps_max
        radius, seconds = gloro_radius.copy(), np.zeros(len(x))
        if chosen.any():
            import torch

            t0 = time.perf_counter()
            local = self.module.certified_radius(
                self.graph, torch.from_numpy(x[chosen]), torch.from_numpy(predicted[chosen]), eps_max=self.search_max
            ).numpy()
            elapsed = time.perf_counter() - t0
            radius[chosen] = np.maximum(local, gloro_radius[chosen]) if self.method == "cascade" else local
            seconds[chosen] = elapsed / chosen.sum()
            self.samples += int(chosen.sum())
            self.seconds += elapsed
        return radius, seconds

    def report(self, rows: dict, eps: list[float]) -> dict:
        return {"local_method": self.module.__name__.rsplit(".", 1)[-1], "local_samples": self.samples, "local_seconds": self.seconds}


def _local_certifier(method: str, fallback: str, model: Model, normalization: dict | None, eps_max: float):
    if method == "gloro":
        return None
    from glorocert.certify import bcp, kw

    graph = normalised_graph(model.graph, normalization)
    module = {"bcp": bcp, "kw": kw}[fallback if method == "cascade" else method]
    return _LocalStage(method, module, graph, eps_max)


def _normaliser(normalization: dict | None, rank: int):
    if not normalization:
        return None, None
    view = (-1,) + (1,) * (rank - 1)
    return (np.asarray(normalization["mean"], np.float32).reshape(view), np.asarray(normalization["std"], np.float32).reshape(view))


def versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {
        "glorocert": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
    }


__all__ = ["load", "compute_bound", "certify", "resolve_bound", "CertifyResult", "Bound", "Model", "open_dataset"]
