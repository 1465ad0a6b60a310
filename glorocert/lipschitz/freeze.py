"""Compute, freeze and find a model's bound: the one place that turns a Composition into a Bound and back.

``compute_bound`` composes the operator bounds of a model's IR (normalisation
folded in) and freezes them into a :class:`~glorocert.lipschitz.boundfile.Bound`;
``resolve_bound`` decides which bound a run uses (given, the file next to the
model, or computed once and cached there) and refuses one that belongs to
another model, shape or normalisation; ``verify_bound`` recomputes it from the
model and refuses it where it is lower (``--verify-bound``);
``recompute_command`` is the command every refusal of a bound file ends with;
``composition_from_bound`` gives the local certifiers (BCP) the guaranteed
operator norms a sound bound holds.
"""

from __future__ import annotations

import math
import numbers
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from glorocert.errors import GlorocertError
from glorocert.lipschitz.boundfile import Bound, default_path, refusal
from glorocert.loaders import Model
from glorocert.normalization import Normalization, fold

if TYPE_CHECKING:
    from glorocert.lipschitz.compose import Composition

MODES = ("sound", "estimate")
BLOCK_FIELDS = ("name", "op", "in_shape", "out_shape", "estimate", "upper", "method", "iterations", "converged")
# --verify-bound: a sound bound's guaranteed values are deterministic (exact eigensolves, DFTs, closed forms), so a
# file may sit below the recomputation only by float rounding; an estimate only by its power-iteration tolerance.
VERIFY_RTOL = 1e-9
VERIFY_MAX_EXACT_SIDE = 8_192  # exact norms where the file claims them, up to Gram matrices of 512 MB
VERIFY_MAX_ITER = 100_000


def compute_bound(
    model: Model,
    *,
    mode: str = "sound",
    tol: float = 1e-4,
    max_iter: int = 5000,
    exact_side: int | None = None,
    normalization: Normalization | None = None,
    progress: Callable[[str], None] | None = None,
) -> Bound:
    """Bound the model's global l2 Lipschitz constant and margin matrix, once.

    ``sound`` uses guaranteed upper bounds (lipschitz/operators.py says why
    each is one); ``estimate`` uses power iteration only, which approaches
    the spectral norms from below and is labelled as an estimate. Input
    normalisation applied outside the model is folded in as a first layer. ``exact_side``: default
    operators.EXACT_MAX_SIDE.
    """
    from glorocert.lipschitz.compose import compose  # torch: imported by the commands that compute, not by certify
    from glorocert.lipschitz.operators import EXACT_MAX_SIDE

    check_bound_settings(mode, tol, max_iter)
    exact_side = EXACT_MAX_SIDE if exact_side is None else exact_side
    result = compose(fold(model.graph, normalization), tol=tol, max_iter=max_iter, exact_side=exact_side, progress=progress)
    _refuse_degenerate(model, result.global_upper, result.global_estimate)
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
        output=model.output,
        checked_runner=model.runner.description if model.runs_file else "",
        equivalence_gap=model.equivalence_gap,
        check_logits=model.check_logits.tolist() if model.runs_file and model.check_logits is not None else None,
    )


def check_bound_settings(mode: str, tol: float, max_iter: int) -> None:
    """Refuse bound settings before any work: an unknown mode, or power iteration that cannot run or converge."""
    if mode not in MODES:
        raise GlorocertError(f"--mode {mode!r}: use sound or estimate")
    if not isinstance(max_iter, numbers.Integral) or isinstance(max_iter, bool) or max_iter < 1:
        raise GlorocertError(f"--max-iter {max_iter}: power iteration needs at least 1 step (default 5000)")
    if not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol <= 0:
        raise GlorocertError(f"--tol {tol}: the convergence tolerance must be a positive number (default 1e-4)")


def _refuse_degenerate(model: Model, upper: float, estimate: float) -> None:
    """A zero or non-finite global constant certifies nothing (radius ∞ or 0 everywhere): refuse to freeze it."""
    for what, value in (("upper bound", upper), ("estimate", estimate)):
        if not math.isfinite(value):
            raise GlorocertError(f"{model.path}: the Lipschitz {what} came out as {value} (a weight overflows float64); "
                                 "no bound can be given for this model")
        if value <= 0:
            raise GlorocertError(f"{model.path}: the Lipschitz bound is 0 (global {what}): a layer maps every input to "
                                 "zero, so the model gives every input the same logits; glorocert does not certify a "
                                 "constant classifier")


def recompute_command(model: Model, path: str | Path | None = None, normalization: Normalization | None = None) -> str:
    """The `glorocert bound` command line that recomputes ``model``'s bound under ``normalization`` into ``path``."""
    words = ["glorocert", "bound", str(model.path)]
    if model.format in ("torchscript", "pickle") or model.shape_from_data:  # the file does not record this input shape
        words += ["--input-shape", ",".join(map(str, model.input_shape))]
    if model.format == "pickle":
        words.append("--trust-pickle")
    if model.output:
        words += ["--output", model.output]
    if normalization is not None:
        words += ["--mean", ",".join(repr(float(v)) for v in normalization.mean),
                  "--std", ",".join(repr(float(v)) for v in normalization.std)]
    if path is not None and Path(path) != default_path(model.path):
        words += ["--out", str(path)]
    return shlex.join(words)


def recompute_hint(model: Model, source: str, normalization: Normalization | None) -> str:
    """'recompute it with `glorocert bound …`' for the bound :func:`resolve_bound` reported as ``source``."""
    path = Path(source) if Path(source).is_file() else None  # "given" and "computed…" name no file
    return f"recompute it with `{recompute_command(model, path, normalization)}`"


def resolve_bound(
    model: Model, bound: Bound | str | Path | None, normalization: Normalization | None, *, cache: bool = True,
    verify: bool = False,
) -> tuple[Bound, str]:
    """``bound`` as given, else the file next to the model, else computed (and cached there); with where it came from.

    Every refusal (unreadable, corrupt, inconsistent, for another model, shape or normalisation) ends with the
    command that recomputes the file. ``verify``: also recompute the bound from the model (:func:`verify_bound`)
    unless it was computed just now.
    """
    path = None
    if isinstance(bound, Bound):
        source = "given"
    elif bound is not None or default_path(model.path).is_file():
        path = Path(bound) if bound is not None else default_path(model.path)
        source = str(bound) if bound is not None else str(path)
        bound = Bound.load(path, recompute_command(model, path, normalization))
    else:
        bound, source = compute_bound(model, normalization=normalization), "computed"
        if cache:
            try:
                bound.save(default_path(model.path))
                source = f"computed, saved to {default_path(model.path)}"
            except GlorocertError:
                pass  # read-only model directory: the bound is still used for this run
    command = recompute_command(model, path, normalization)
    bound.check_matches(model.sha256, model.input_shape, normalization, source, command, model.output)
    if bound.margin_matrix.shape[0] != model.num_classes:
        raise refusal(source, f"margin matrix is {bound.margin_matrix.shape[0]}×…, the model has {model.num_classes} classes",
                      command)
    if verify and (path is not None or source == "given"):
        verify_bound(model, bound, normalization, source=source, recompute=command)
    return bound, source


def verify_bound(model: Model, bound: Bound, normalization: Normalization | None = None, *, source: str = "bound",
                 recompute: str | None = None) -> None:
    """Recompute ``bound`` from the model and refuse it where any number certificates use is lower (``--verify-bound``).

    Sound: each block's upper bound (BCP reads them), the global bound and every K[j][i] must be at least the
    recomputed value, up to VERIFY_RTOL. Norms are recomputed exactly at least wherever the file says it computed
    them exactly (an exact norm is the smallest value any honest method gives; other methods only add), and power
    iteration runs one step (estimates enter no sound certificate). Estimate mode: the estimates, recomputed with
    the file's tolerance and step cap, compared up to that tolerance. Costs about one `glorocert bound`.
    """
    from glorocert.lipschitz.compose import compose
    from glorocert.lipschitz.operators import EXACT_MAX_SIDE

    graph = fold(model.graph, normalization)
    sound = bound.mode == "sound"
    fresh = compose(graph, tol=bound.tol, max_iter=1 if sound else min(bound.max_iter, VERIFY_MAX_ITER),
                    exact_side=_exact_side_for(graph, bound) if sound else EXACT_MAX_SIDE)
    problem = _first_below(bound, fresh, "upper" if sound else "estimate", VERIFY_RTOL if sound else max(VERIFY_RTOL, bound.tol))
    if problem:
        raise refusal(source, f"{problem}: the file is wrong or forged",
                      recompute or recompute_command(model, None, normalization))


def _exact_side_for(graph, bound: Bound) -> int:
    """An exact-norm threshold that recomputes exactly every block the file says it bounded exactly (capped)."""
    claimed = {b["name"] for b in bound.blocks if b.get("method") == "exact"}
    from glorocert.lipschitz.compose import blocks_of
    from glorocert.lipschitz.operators import EXACT_MAX_SIDE

    sides = [min(math.prod(b.in_shape), math.prod(b.out_shape)) for b in blocks_of(graph) if b.linear and b.name in claimed]
    return min(max([EXACT_MAX_SIDE, *sides]), VERIFY_MAX_EXACT_SIDE)


def _first_below(bound: Bound, fresh: Composition, key: str, rtol: float) -> str | None:
    """The first number of ``bound`` (``key``: upper or estimate) below its recomputation ``fresh``, described."""
    below = "{} {:.6g} is below the value recomputed from the model ({:.6g})"
    mine = {b["name"]: float(b[key]) for b in bound.blocks}
    theirs = {b.name: getattr(b, key) for b in fresh.blocks}
    if set(mine) != set(theirs):
        return f"its blocks {sorted(mine)} are not the model's {sorted(theirs)}"
    for name, value in theirs.items():
        if mine[name] < value * (1 - rtol):
            return below.format(f"block {name!r}: {key}", mine[name], value)
    value = getattr(fresh, f"global_{key}")
    if getattr(bound, f"global_{key}") < value * (1 - rtol):
        return below.format(f"the global {key}", getattr(bound, f"global_{key}"), value)
    k, recomputed = np.asarray(getattr(bound, f"margin_{key}"), np.float64), np.asarray(getattr(fresh, f"margin_{key}"), np.float64)
    if k.shape != recomputed.shape:
        return f"its margin matrix is {k.shape}, the model's {recomputed.shape}"
    j, i = np.unravel_index(np.argmax(recomputed * (1 - rtol) - k), k.shape)
    if k[j, i] < recomputed[j, i] * (1 - rtol):
        return below.format(f"the margin constant K[{j}][{i}] ({key})", k[j, i], recomputed[j, i])
    return None


def composition_from_bound(bound: Bound, graph, normalization: Normalization | None) -> Composition | None:
    """The guaranteed part of ``bound`` as a Composition for ``graph`` (the model's graph under ``normalization``), or None.

    Only a *sound* bound holds guaranteed values, and only for the graph it was computed on: every linear
    block must be named with the same shapes, and, since block names and shapes cannot tell one input
    normalisation from another, the bound's own record of it must match.
    """
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
    if np.asarray(bound.margin_upper, dtype=np.float64).shape != (graph.num_classes, graph.num_classes):
        return None
    return Composition(blocks, bound.global_estimate, bound.global_upper, bound.margin_estimate, bound.margin_upper, bound.margin_method)
