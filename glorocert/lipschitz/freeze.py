"""Compute, freeze and find a model's bound: the one place that turns a Composition into a Bound and back.

``compute_bound`` composes the operator bounds of a model's IR (normalisation
folded in) and freezes them into a :class:`~glorocert.lipschitz.boundfile.Bound`;
``resolve_bound`` decides which bound a run uses (given, the file next to the
model, or computed once and cached there) and refuses one that belongs to
another model, shape or normalisation; ``composition_from_bound`` gives the
local certifiers (BCP) the guaranteed operator norms a sound bound holds.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from glorocert.errors import GlorocertError
from glorocert.lipschitz.boundfile import Bound, default_path
from glorocert.lipschitz.compose import BlockBound, Composition, blocks_of, compose
from glorocert.lipschitz.operators import EXACT_MAX_SIDE
from glorocert.loaders import Model
from glorocert.normalization import Normalization, fold

MODES = ("sound", "estimate")
BLOCK_FIELDS = ("name", "op", "in_shape", "out_shape", "estimate", "upper", "method", "iterations", "converged")


def compute_bound(
    model: Model,
    *,
    mode: str = "sound",
    tol: float = 1e-4,
    max_iter: int = 5000,
    exact_side: int = EXACT_MAX_SIDE,
    normalization: Normalization | None = None,
    progress: Callable[[str], None] | None = None,
) -> Bound:
    """Bound the model's global l2 Lipschitz constant and margin matrix, once.

    ``sound`` uses guaranteed upper bounds (lipschitz/operators.py says why
    each is one); ``estimate`` uses power iteration only, which approaches
    the spectral norms from below and is labelled as an estimate. Input
    normalisation applied outside the model is folded in as a first layer.
    """
    if mode not in MODES:
        raise GlorocertError(f"--mode {mode!r}: use sound or estimate")
    result = compose(fold(model.graph, normalization), tol=tol, max_iter=max_iter, exact_side=exact_side, progress=progress)
    return Bound(
        model_sha256=model.sha256,
        model_name=model.path.name,
        model_format=model.format,
        input_shape=list(model.input_shape),
        mode=mode,
        normalization=None if normalization is None else normalization.to_json(),
        blocks=[{k: (list(v) if k.endswith("_shape") else v) for k, v in asdict(b).items() if k in BLOCK_FIELDS} for b in result.blocks],
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
    model: Model, bound: Bound | str | Path | None, normalization: Normalization | None, *, cache: bool = True
) -> tuple[Bound, str]:
    """``bound`` as given, else the file next to the model, else computed (and cached there); with where it came from."""
    if isinstance(bound, Bound):
        source = "given"
    elif bound is not None:
        source, bound = str(bound), Bound.load(bound)
    elif default_path(model.path).is_file():
        source, bound = str(default_path(model.path)), Bound.load(default_path(model.path))
    else:
        bound, source = compute_bound(model, normalization=normalization), "computed"
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


def composition_from_bound(bound: Bound, graph, normalization: Normalization | None) -> Composition | None:
    """The guaranteed part of ``bound`` as a Composition for ``graph`` (the model's graph under ``normalization``), or None.

    Only a *sound* bound holds guaranteed values, and only for the graph it was computed on: every linear
    block must be named with the same shapes, and, since block names and shapes cannot tell one input
    normalisation from another, the bound's own record of it must match.
    """
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
    if np.asarray(bound.margin_upper, dtype=np.float64).shape != (graph.num_classes, graph.num_classes):
        return None
    return Composition(blocks, bound.global_estimate, bound.global_upper, bound.margin_estimate, bound.margin_upper, bound.margin_method)
