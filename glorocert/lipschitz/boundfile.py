"""The frozen bound: computed once, written next to the model as versioned JSON.

A bound file records which model it belongs to (sha256 of the model file),
what it bounds (input shape, l2 norm, normalisation folded in), how (mode
``sound`` — guaranteed upper bounds — or ``estimate`` — power iteration only,
as in the GloRo paper, and labelled as such everywhere), and the numbers: per
block estimate / upper bound / iterations / convergence, the global constant
and the margin matrix K[j][i]. A ``content_sha256`` over everything else
makes a hand-edited file detectable; ``certify`` refuses a bound whose model
hash, shape, normalisation or checksum does not match.

The checksum is unkeyed: it catches accidental edits and truncation, not a
forger, who can recompute it. So :meth:`Bound.validate` also checks the
relations every honestly computed file satisfies (see ``_inconsistency``): no
upper bound below its own power-iteration estimate (per block, global, every
K[j][i]); K square, symmetric, zero on the diagonal; K[j][i] ≤ √2·L (both
margin rules: ‖W_j − W_i‖ ≤ √2‖W‖), and K[j][i] = √2·L off the diagonal with
the ``sqrt2-global`` rule; a finite, positive Lipschitz constant. A file
whose numbers are all scaled down alike passes them: only the model can tell
(lipschitz/freeze.py ``verify_bound``, and the slopes certify observes).
Every refusal ends with the command that recomputes the file.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from glorocert._version import __version__
from glorocert.errors import GlorocertError
from glorocert.files import write_json
from glorocert.normalization import Normalization

FORMAT = "glorocert-bound"
FORMAT_VERSION = 1
MODES = ("sound", "estimate")
MARGIN_METHODS = ("last-linear", "sqrt2-global")
# Relative slack of the consistency checks: far above float rounding (an honest upper bound exceeds its estimate
# by the 1e-6 float margin of lipschitz/operators.py), far below any forgery that would change a certificate.
CONSISTENCY_RTOL = 1e-6
SQRT2 = math.sqrt(2.0)


def default_path(model_path: str | Path) -> Path:
    """``model.onnx`` → ``model.onnx.bound.json`` (one bound per model file)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".bound.json")


@dataclass
class Bound:
    model_sha256: str
    model_name: str
    model_format: str
    input_shape: list[int]
    mode: str
    normalization: dict | None  # {"mean": [...], "std": [...]} applied outside the model, or None
    blocks: list[dict]
    global_estimate: float
    global_upper: float
    margin_estimate: list[list[float]]
    margin_upper: list[list[float]]
    margin_method: str
    tol: float
    max_iter: int
    seconds: float
    norm: str = "l2"
    output: str = ""  # the certified tensor when it is not the model's one declared output (a Softmax tail, --output)
    # What loading the model checked, so that certify can run the file again without the IR (certify/frozen.py):
    # the runner that ran the file itself, unrewritten, against the IR ("" when it ran a rewritten graph or a
    # torch module), the gap it measured, and the IR's logits on the check inputs (loaders/model.py
    # check_inputs), against which certify re-measures the gap with its own runner. Absent in older files.
    checked_runner: str = ""
    equivalence_gap: float | None = None
    check_logits: list[list[float]] | None = None
    tool_version: str = __version__
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    @property
    def lipschitz(self) -> float:
        """The global constant certificates use: the guaranteed bound, or the estimate in estimate mode."""
        return self.global_upper if self.mode == "sound" else self.global_estimate

    @property
    def margin_matrix(self) -> np.ndarray:
        return np.asarray(self.margin_upper if self.mode == "sound" else self.margin_estimate, dtype=np.float64)

    @property
    def all_converged(self) -> bool:
        return all(b.get("converged", True) for b in self.blocks)

    def to_json(self) -> dict:
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}
        body["content_sha256"] = _checksum(body)
        return body

    def save(self, path: str | Path) -> Path:
        write_json(path, self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, recompute: str | None = None) -> "Bound":
        """Read and check a bound file; ``recompute``: the command that recomputes it, which every refusal ends with."""
        path = Path(path)
        try:
            body = json.loads(path.read_text())
        except FileNotFoundError:
            raise GlorocertError(f"{path}: no such bound file; compute it with `{recompute or RECOMPUTE}`") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise refusal(path, f"not a readable bound file ({e})", recompute) from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise refusal(path, "not a glorocert bound file", recompute)
        if body.get("format_version") != FORMAT_VERSION:
            raise refusal(path, f"bound format version {body.get('format_version')} is not {FORMAT_VERSION}", recompute)
        stored = body.pop("content_sha256", None)
        if stored != _checksum({**body}):
            raise refusal(path, "the bound file was modified after it was computed (checksum mismatch)", recompute)
        body.pop("format"), body.pop("format_version")
        try:
            bound = cls(**body)
        except TypeError as e:
            raise refusal(path, f"malformed bound file ({e})", recompute) from None
        bound.validate(path, recompute)
        return bound

    def validate(self, path: Path | str = "bound", recompute: str | None = None) -> None:
        """Refuse a bound no honest computation produces (malformed, zero or non-finite, inconsistent)."""
        try:
            problem = _malformation(self) or _inconsistency(self)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            problem = f"malformed bound file ({type(e).__name__}: {e})"
        if problem:
            raise refusal(path, problem, recompute)

    def same_normalization(self, normalization: Normalization | None) -> bool:
        """Whether the bound was computed under this input normalisation (None: none)."""
        return Normalization.same(normalization, Normalization.from_json(self.normalization))

    def check_matches(self, sha256: str, input_shape, normalization: Normalization | None, path: Path | str = "bound",
                      recompute: str | None = None, output: str = "") -> None:
        """Refuse a bound computed for another model file, shape, normalisation or output tensor."""
        if sha256 != self.model_sha256:
            raise refusal(path, f"this bound belongs to another model file (sha256 {self.model_sha256[:12]}…, the model is "
                                f"{sha256[:12]}…)", recompute)
        if list(input_shape) != list(self.input_shape):
            raise refusal(path, f"bound computed for input shape {self.input_shape}, the model takes {list(input_shape)}",
                          recompute)
        if output != self.output:
            raise refusal(path, f"bound computed for the output {self.output or '(the declared one)'!r}, this run certifies "
                                f"{output or '(the declared one)'!r}", recompute)
        if not self.same_normalization(normalization):
            raise refusal(path, f"bound computed with input normalisation {self.normalization}, but this run uses "
                                f"{None if normalization is None else normalization.to_json()}", recompute)


RECOMPUTE = "glorocert bound MODEL"


def refusal(path: Path | str, problem: str, recompute: str | None = None) -> GlorocertError:
    """The error for a refused bound file: what is wrong, then the command that recomputes it."""
    return GlorocertError(f"{path}: {problem}; recompute it with `{recompute or RECOMPUTE}`")


def _numbers(values, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all() or (array < 0).any():
        raise ValueError(f"{what} must be finite non-negative numbers")
    return array


def _malformation(bound: Bound) -> str | None:
    """Fields of the wrong kind: unknown mode or margin rule, a margin matrix that is not square, a zero, negative or
    non-finite constant, power-iteration settings no computation uses."""
    if bound.mode not in MODES:
        return f"unknown mode {bound.mode!r}"
    if bound.margin_method not in MARGIN_METHODS:
        return f"unknown margin method {bound.margin_method!r}"
    up, est = _numbers(bound.margin_upper, "margin_upper"), _numbers(bound.margin_estimate, "margin_estimate")
    if up.ndim != 2 or up.shape[0] != up.shape[1] or est.shape != up.shape:
        return "the margin matrices must be square matrices of the same size (one row and column per class)"
    _numbers([[b["estimate"], b["upper"]] for b in bound.blocks], "block bounds")
    if not all(math.isfinite(v) and v > 0 for v in (float(bound.global_upper), float(bound.global_estimate))):
        return (f"the Lipschitz constant is not a finite positive number (upper {bound.global_upper}, estimate "
                f"{bound.global_estimate}): a model with a zero bound maps every input to the same logits")
    gap = bound.equivalence_gap
    if gap is not None and not (isinstance(gap, numbers.Real) and math.isfinite(gap) and gap >= 0):
        return f"equivalence_gap {gap!r} is not a finite non-negative number"
    if not isinstance(bound.checked_runner, str):
        return f"checked_runner {bound.checked_runner!r} is not a runner's description"
    if bound.check_logits is not None:
        logits = np.asarray(bound.check_logits, dtype=np.float64)
        if logits.ndim != 2 or logits.shape[1] != up.shape[0] or not np.isfinite(logits).all():
            return f"check_logits must be finite rows of one logit per class, not an array of shape {logits.shape}"
    if not (isinstance(bound.max_iter, numbers.Integral) and bound.max_iter >= 1 and math.isfinite(bound.tol) and bound.tol > 0):
        return f"power-iteration settings tol={bound.tol}, max_iter={bound.max_iter} are not a positive tolerance and step count"
    return None


def _inconsistency(bound: Bound) -> str | None:
    """The relations every honestly computed bound satisfies (see the module docstring), or what breaks them."""
    below = "is below its own power-iteration estimate {:.6g}: an upper bound never is, so the file is wrong or forged"
    for b in bound.blocks:
        if float(b["estimate"]) > float(b["upper"]) * (1 + CONSISTENCY_RTOL):
            return f"block {b['name']!r}: upper bound {float(b['upper']):.6g} " + below.format(float(b["estimate"]))
    if bound.global_estimate > bound.global_upper * (1 + CONSISTENCY_RTOL):
        return f"the global upper bound {bound.global_upper:.6g} " + below.format(bound.global_estimate)
    up, est = np.asarray(bound.margin_upper, np.float64), np.asarray(bound.margin_estimate, np.float64)
    j, i = np.unravel_index(np.argmax(est - up * (1 + CONSISTENCY_RTOL)), up.shape)
    if est[j, i] > up[j, i] * (1 + CONSISTENCY_RTOL):
        return f"the margin upper bound K[{j}][{i}] = {up[j, i]:.6g} " + below.format(est[j, i])
    for name, k in (("margin_upper", up), ("margin_estimate", est)):
        if np.diagonal(k).any() or not np.allclose(k, k.T, rtol=1e-9, atol=0.0):
            return f"{name} is not symmetric with a zero diagonal, as K[j][i] = Lip(y_j − y_i) is"
    j, i = np.unravel_index(np.argmax(up), up.shape)
    if up[j, i] > SQRT2 * bound.global_upper * (1 + 10 * CONSISTENCY_RTOL):
        return (f"K[{j}][{i}] = {up[j, i]:.6g} exceeds √2 × the global bound {bound.global_upper:.6g}, which bounds every "
                "K[j][i]: the margins and the global bound do not come from one computation")
    if bound.margin_method == "sqrt2-global":
        k, lipschitz = bound.margin_matrix, bound.lipschitz
        off = k[~np.eye(len(k), dtype=bool)]
        if off.size and off.min() < SQRT2 * lipschitz * (1 - 1e-9):
            return (f"with the sqrt2-global rule every K[j][i] is √2 × the global constant {lipschitz:.6g}, but one is "
                    f"{off.min():.6g}")
    return None


def _checksum(body: dict) -> str:
    body = {k: v for k, v in body.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=float).encode()).hexdigest()
