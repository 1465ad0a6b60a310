"""certify on a Ray cluster (``--ray``), and the recipes every distributed command gives its workers.

A worker (glorocert/distributed.py) redoes a command's set-up from a recipe: small and picklable, it holds paths
and options, never a loaded model. Each worker loads its own copy once, through ``localize`` (a readable copy of
each file the driver shipped, checked by sha256); the frozen bound the driver resolved travels with the recipe,
so no worker computes a bound. :func:`certify_on_ray` is :func:`~glorocert.certify.pipeline.certify` with its
batches run by the workers: the same rows (the same :class:`~glorocert.certify.pipeline.BatchCertifier`), the
same summary (:func:`~glorocert.certify.pipeline.certify_summary`) but for the timings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from glorocert import distributed
from glorocert.certify.frozen import frozen_model
from glorocert.certify.methods import check_method
from glorocert.certify.pipeline import (ROWS_SCHEMA_VERSION, BatchCertifier, CertifyResult, check_eps, check_request,
                                        certify_summary)
from glorocert.data import Dataset
from glorocert.errors import InputShapeNeeded
from glorocert.lipschitz.boundfile import Bound
from glorocert.lipschitz.freeze import resolve_bound
from glorocert import loaders
from glorocert.loaders import Model
from glorocert.normalization import Normalization

__all__ = ["CertifyWork", "ModelRecipe", "PART_ROWS", "certify_on_ray", "same_path"]

PART_ROWS = 10_000  # samples per part of a distributed certify (the unit written and resumed)


def same_path(path: str | Path) -> str:
    """``localize`` where the files are read where they are (in process)."""
    return str(path)


@dataclass(frozen=True)
class ModelRecipe:
    """How a model was loaded: its file and the load options, plus (``bound_path``) the bound file that lets
    certify's fast path (certify/frozen.py) load it without the IR — tried first when given."""

    path: str
    input_shape: tuple[int, ...] | None = None
    data_shape: tuple[int, ...] | None = None  # stands in for an input shape the file does not record
    output: str | None = None
    trust_pickle: bool = False
    device: str = "cpu"
    bound_path: str | None = None
    normalization: Normalization | None = None  # the fast path's bound must have been computed for it

    @property
    def files(self) -> tuple[str, ...]:
        """The files a worker reads: the model, and the bound file of the fast path."""
        return (self.path,) + ((self.bound_path,) if self.bound_path else ())

    def load(self, localize: Callable[[str], str] = same_path) -> Model:
        path = localize(self.path)
        if self.bound_path is not None:
            model = frozen_model(path, localize(self.bound_path), self.normalization, device=self.device,
                                 output=self.output, input_shape=self.input_shape)
            if model is not None:
                return model
        options = dict(output=self.output, trust_pickle=self.trust_pickle, device=self.device)
        try:
            return loaders.load(path, input_shape=self.input_shape, **options)  # the full path: IR, equivalence check
        except InputShapeNeeded:
            if self.data_shape is None:
                raise
            return loaders.load(path, data_shape=self.data_shape, **options)


@dataclass(frozen=True)
class CertifyWork:
    """certify's per-batch work on a worker: the model loaded once, the driver's frozen bound, a
    :class:`~glorocert.certify.pipeline.BatchCertifier` — the rows the in-process run gives, batch by batch."""

    model: ModelRecipe
    bound: Bound
    bound_source: str  # where the driver found the bound: for messages
    dataset: Dataset  # detached: name, shape, labels flag, normalisation
    eps: Sequence[float]
    method: str = "gloro"
    fallback: str = "bcp"
    batch_size: int = 256

    def __call__(self, localize: Callable[[str], str] = same_path) -> BatchCertifier:
        model = self.model.load(localize)
        bound, _ = resolve_bound(model, self.bound, self.dataset.normalization)  # checked against this very model
        return BatchCertifier(model, self.dataset, bound, self.bound_source, self.eps, method=self.method,
                              fallback=self.fallback, batch_size=self.batch_size)


def certify_on_ray(model: Model, recipe: ModelRecipe, dataset: Dataset, eps: Sequence[float], out_dir: str | Path, *,
                   bound: Bound | str | Path | None = None, batch_size: int = 256, method: str = "gloro",
                   fallback: str = "bcp", address: str | None = None, workers: int | None = None, resume: bool = False,
                   progress: Callable[[int], None] | None = None) -> CertifyResult:
    """:func:`~glorocert.certify.pipeline.certify` on a Ray cluster: rows as Parquet parts under ``out_dir``
    (glorocert/distributed.py), resumable, equal to the in-process rows. ``model`` is the driver's copy (the bound
    is resolved against it, the summary names it); ``recipe`` says how each worker loads its own. The summary
    equals the in-process one but for its timings (``seconds``, ``samples_per_second``; no ``forward_seconds``,
    which the workers spend) and adds ``distributed`` (address, workers, parts, parts resumed)."""
    check_method(method, fallback)
    eps = check_eps(eps)
    check_request(model, dataset, batch_size)
    bound, source = resolve_bound(model, bound, dataset.normalization)
    work = CertifyWork(recipe, bound, source, dataset.detached(), eps, method, fallback, batch_size)
    identity = {"model_sha256": model.sha256, "bound_sha256": bound.to_json()["content_sha256"], "output": model.output,
                "eps": eps, "method": method, "fallback": fallback if method == "cascade" else None}
    job = distributed.Job("certify", work, identity, batch_size, PART_ROWS, files=recipe.files,
                          schema_version=ROWS_SCHEMA_VERSION)
    started = time.perf_counter()
    run = distributed.run(job, dataset, out_dir, address=address, workers=workers, resume=resume, progress=progress)
    seconds = time.perf_counter() - started
    summary = certify_summary(run.rows, eps, method, fallback, model, dataset, bound, source)
    summary.update(seconds=seconds, samples_per_second=len(run.rows["index"]) / seconds if seconds > 0 else None,
                   distributed=run.report())
    return CertifyResult(run.rows, summary, eps, bound)
