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
    sample, full radius by bisection on ε (≈ 12 local passes per sample);
    ``cascade`` — gloro on everything, then the ``fallback`` local method, one
    pass per *requested* ε, only where gloro abstains (see below).

    The cascade goes through the requested ε in descending order; at each ε
    the local method runs only on the samples that gloro leaves ⊥ there
    (gloro radius ≤ ε) and that the local method has not already certified
    at a larger ε (a certificate for the closed ball of radius ε' covers
    every ε ≤ ε'). A sample's reported radius is max(gloro radius, largest
    requested ε at which the local method certified it) — a sound lower
    bound on its true radius, but on the requested-ε grid, not a bisected
    one. Rows of a cascade also carry ``gloro_radius`` and ``local_eps``
    (that largest ε, NaN when the local method did not certify the sample);
    ``bottom@ε`` is False where ``local_eps ≥ ε`` (the local certificate
    covers the closed ball, so a radius equal to ε certifies ε). The
    summary adds ``local_samples`` (distinct samples the local method ran
    on), ``local_passes`` (sample·ε evaluations), ``local_seconds`` and
    ``rescued`` (per ε: correct samples certified by the cascade but ⊥
    under gloro).

    BCP (as a method or the fallback) takes its guaranteed operator norms
    from a sound frozen bound instead of recomputing them (see
    :func:`local_options`).
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
    local = _local_certifier(method, fallback, model, normalization, eps, bound, rtol)
    columns = ("index", "label", "predicted", "runner_up", "margin", "radius", "seconds")
    if method == "cascade":
        columns += ("gloro_radius", "local_eps")
    elif method != "gloro":
        columns += ("local_eps",)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in columns}
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
        if method == "cascade":
            parts["gloro_radius"].append(radius)
            radius, seconds, local_eps = local.cascade(batch.x, predicted, logits, radius)
            parts["local_eps"].append(local_eps)
        elif local is not None:
            radius, seconds, local_eps = local(batch.x, predicted, logits)
            parts["local_eps"].append(local_eps)
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
        bottom = gloro.bottom_flags(rows["radius"], e)
        if "local_eps" in rows:  # a local certificate at ε covers the closed ball: radius == ε certifies ε
            bottom &= ~(rows["local_eps"] >= e)  # NaN (no local certificate) compares False
        rows[f"bottom@{eps_key(e)}"] = bottom
        rows[f"certified@{eps_key(e)}"] = rows["correct"] & ~bottom
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
    """Local-bound certification: every sample by bisection (bcp/kw), or gloro's ⊥ samples at the requested ε (cascade).

    A sample counts as certified only when every local lower bound exceeds ``rtol·(1 + max|y|)`` (its
    native logits y): the same budget for the IR/native gap and rounding that GloRo subtracts.
    """

    def __init__(self, module, graph, eps: Sequence[float], options: dict, rtol: float):
        self.module, self.graph, self.options, self.rtol = module, graph, options, rtol
        self.eps = sorted({float(e) for e in eps}, reverse=True)
        self.search_max = max(2.0, 2.0 * self.eps[0])
        self.samples, self.passes, self.seconds = 0, 0, 0.0

    @property
    def name(self) -> str:
        return self.module.__name__.rsplit(".", 1)[-1]

    def __call__(self, x: np.ndarray, predicted: np.ndarray, logits: np.ndarray):
        """bcp/kw: a full certified radius per sample by bisection on [0, search_max], then the requested ε
        within the bisection's tolerance of a radius are tried exactly (so a sample certified at ε is never
        ⊥ at ε for want of bisection steps); (radius, seconds, local_eps)."""
        import torch

        from glorocert.certify.local import BISECTION_TOL

        t0 = time.perf_counter()
        radius = self.module.certified_radius(
            self.graph, torch.from_numpy(x), torch.from_numpy(predicted), eps_max=self.search_max,
            slack=self._slack(logits), **self.options,
        ).numpy()
        self.seconds += time.perf_counter() - t0
        near = lambda e: (radius <= e) & (radius >= e - BISECTION_TOL)  # noqa: E731
        local_eps, _ = self._at_requested_eps(x, predicted, logits, near)
        elapsed = time.perf_counter() - t0
        self.samples += len(x)
        return np.fmax(radius, local_eps), np.full(len(x), elapsed / max(len(x), 1)), local_eps

    def cascade(self, x: np.ndarray, predicted: np.ndarray, logits: np.ndarray, gloro_radius: np.ndarray):
        """One local pass per requested ε (descending) on the samples gloro leaves ⊥ there and the local
        method has not certified at a larger ε; (radius, seconds, local_eps)."""
        local_eps, seconds = self._at_requested_eps(x, predicted, logits, lambda e: gloro.bottom_flags(gloro_radius, e))
        self.samples += int((seconds > 0).sum())
        return np.fmax(gloro_radius, local_eps), seconds, local_eps  # fmax: NaN (not certified) keeps gloro's

    def _at_requested_eps(self, x, predicted, logits, candidates):
        """For each requested ε, largest first: certify ``candidates(ε)`` not yet certified at a larger ε.
        Returns (largest certified requested ε, NaN where none; local seconds spent per sample)."""
        import torch

        local_eps = np.full(len(x), np.nan)  # certificates cover the closed ball
        seconds = np.zeros(len(x))
        slack = self._slack(logits)
        for e in self.eps:
            todo = np.flatnonzero(candidates(e) & np.isnan(local_eps))
            if not len(todo):
                continue
            t0 = time.perf_counter()
            ok = self.module.certify(self.graph, torch.from_numpy(x[todo]), torch.from_numpy(predicted[todo]), e,
                                     slack=slack[todo], **self.options).numpy()
            elapsed = time.perf_counter() - t0
            local_eps[todo[ok]] = e
            seconds[todo] += elapsed / len(todo)
            self.passes += len(todo)
            self.seconds += elapsed
        return local_eps, seconds

    def _slack(self, logits: np.ndarray):
        return local_slack(logits, self.rtol)

    def report(self, rows: dict, eps: list[float]) -> dict:
        report = {"local_method": self.name, "local_samples": self.samples, "local_seconds": self.seconds}
        if "gloro_radius" in rows:  # cascade
            rescued = {}
            for e in eps:
                gloro_bottom = gloro.bottom_flags(rows["gloro_radius"], e)
                rescued[eps_key(e)] = int((rows[f"certified@{eps_key(e)}"] & gloro_bottom).sum())
            report.update(local_passes=self.passes, rescued=rescued)
        else:
            report.update(local_passes=None)  # bisection: a variable number of passes per sample
        return report


def _local_certifier(method: str, fallback: str, model: Model, normalization: dict | None, eps: Sequence[float], bound: Bound,
                     rtol: float):
    if method == "gloro":
        return None
    from glorocert.certify import bcp, kw

    graph = normalised_graph(model.graph, normalization)
    module = {"bcp": bcp, "kw": kw}[fallback if method == "cascade" else method]
    return _LocalStage(module, graph, eps, local_options(module, graph, bound, normalization), rtol)


def local_slack(logits: np.ndarray, rtol: float):
    """(N,) float64 tensor: the margin every local lower bound must exceed, rtol·(1 + max|y|) on the native logits y
    (GloRo's rounding budget, ``gloro.radii``; rtol is raised to 4× the measured IR/native gap by the callers)."""
    import torch

    return torch.from_numpy(rtol * (1.0 + np.abs(logits.astype(np.float64)).max(axis=1)))


def local_options(module, graph, bound: Bound, normalization: dict | None) -> dict:
    """Keyword arguments for ``module.certify`` / ``certified_radius`` on ``graph`` (the normalised graph of ``bound``'s model).

    BCP needs guaranteed operator norms of every linear block and the margin
    matrix; computing them (``lipschitz.compose``) costs far more than a BCP
    pass. A *sound* frozen bound holds exactly these guaranteed values for this
    graph (its hash and normalisation were checked by ``resolve_bound``), so
    they are reused. An estimate-mode bound, or one that does not name every
    linear block, is not: BCP then composes its own.
    """
    from glorocert.certify import bcp

    if module is not bcp:
        return {}
    composition = composition_from_bound(bound, graph, normalization)
    return {} if composition is None else {"composition": composition}


def composition_from_bound(bound: Bound, graph, normalization: dict | None):
    """The guaranteed part of ``bound`` as a ``lipschitz.compose`` Composition for ``graph`` (the model's graph
    under ``normalization``), or None (see local_options). The block names and shapes cannot tell one input
    normalisation from another, so the bound's own record of it must match."""
    from glorocert.lipschitz.compose import BlockBound, Composition, blocks_of

    if bound.mode != "sound" or not bound.same_normalization(normalization):
        return None
    blocks = [
        BlockBound(b["name"], b["op"], tuple(b["in_shape"]), tuple(b["out_shape"]), float(b["estimate"]), float(b["upper"]),
                   b["method"], int(b.get("iterations", 0)), bool(b.get("converged", True)))
        for b in bound.blocks
    ]
    known = {b.name: b for b in blocks}
    for block in blocks_of(graph):
        if block.linear and (block.name not in known or known[block.name].in_shape != tuple(block.in_shape)
                             or known[block.name].out_shape != tuple(block.out_shape)):
            return None
    margin = np.asarray(bound.margin_upper, dtype=np.float64)
    if margin.shape != (graph.num_classes, graph.num_classes):
        return None
    return Composition(blocks, bound.global_estimate, bound.global_upper, bound.margin_estimate, bound.margin_upper, bound.margin_method)


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
