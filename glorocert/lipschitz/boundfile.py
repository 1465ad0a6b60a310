"""The frozen bound: computed once, written next to the model as versioned JSON.

A bound file records which model it belongs to (sha256 of the model file),
what it bounds (input shape, l2 norm, normalisation folded in), how (mode
``sound`` — guaranteed upper bounds — or ``estimate`` — power iteration only,
as in the GloRo paper, and labelled as such everywhere), and the numbers: per
block estimate / upper bound / iterations / convergence, the global constant
and the margin matrix K[j][i]. A ``content_sha256`` over everything else
makes a hand-edited file detectable; ``certify`` refuses a bound whose model
hash, shape, normalisation or checksum does not match.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
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
    def load(cls, path: str | Path) -> "Bound":
        path = Path(path)
        try:
            body = json.loads(path.read_text())
        except FileNotFoundError:
            raise GlorocertError(f"{path}: no such bound file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GlorocertError(f"{path}: not a readable bound file ({e})") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise GlorocertError(f"{path}: not a glorocert bound file")
        if body.get("format_version") != FORMAT_VERSION:
            raise GlorocertError(f"{path}: bound format version {body.get('format_version')} is not {FORMAT_VERSION}; recompute it with `glorocert bound`")
        stored = body.pop("content_sha256", None)
        if stored != _checksum({**body}):
            raise GlorocertError(f"{path}: the bound file was modified after it was computed (checksum mismatch); recompute it with `glorocert bound`")
        body.pop("format"), body.pop("format_version")
        try:
            bound = cls(**body)
        except TypeError as e:
            raise GlorocertError(f"{path}: malformed bound file ({e})") from None
        bound.validate(path)
        return bound

    def validate(self, path: Path | str = "bound") -> None:
        k = self.margin_matrix
        if self.mode not in MODES:
            raise GlorocertError(f"{path}: unknown mode {self.mode!r}")
        if k.ndim != 2 or k.shape[0] != k.shape[1] or not np.isfinite(k).all() or (k < 0).any():
            raise GlorocertError(f"{path}: the margin matrix must be a square matrix of finite non-negative numbers")
        if not (math.isfinite(self.lipschitz) and self.lipschitz >= 0):
            raise GlorocertError(f"{path}: the Lipschitz constant {self.lipschitz} is not a finite non-negative number")

    def same_normalization(self, normalization: Normalization | None) -> bool:
        """Whether the bound was computed under this input normalisation (None: none)."""
        return Normalization.same(normalization, Normalization.from_json(self.normalization))

    def check_matches(self, sha256: str, input_shape, normalization: Normalization | None, path: Path | str = "bound") -> None:
        """Refuse a bound computed for another model file, shape or normalisation."""
        if sha256 != self.model_sha256:
            raise GlorocertError(
                f"{path}: this bound belongs to another model file (sha256 {self.model_sha256[:12]}…, the model is "
                f"{sha256[:12]}…); recompute it with `glorocert bound`"
            )
        if list(input_shape) != list(self.input_shape):
            raise GlorocertError(f"{path}: bound computed for input shape {self.input_shape}, the model takes {list(input_shape)}")
        if not self.same_normalization(normalization):
            raise GlorocertError(
                f"{path}: bound computed with input normalisation {self.normalization}, but this run uses "
                f"{None if normalization is None else normalization.to_json()}; "
                "recompute the bound with the same --mean/--std"
            )


def _checksum(body: dict) -> str:
    body = {k: v for k, v in body.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=float).encode()).hexdigest()
