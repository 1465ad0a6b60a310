"""A loaded classifier (:class:`Model`) and the rounding budget every certificate keeps; torch-free.

A Model has its native runner, and its IR when it was loaded through ``loaders.load`` (loaders/loading.py). On certify's fast
path (certify/frozen.py) it has no IR: a frozen bound whose model hash matches, computed when the IR was
checked against this very runner, stands in for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from glorocert.errors import GlorocertError

if TYPE_CHECKING:
    from glorocert.graph import Graph
    from glorocert.loaders.runners import OrtRunner, TorchRunner

# The native forward runs in float32. Its rounding error, relative to the
# logits' scale, is budgeted here (and raised to 4× the measured IR/native gap
# when that is larger, :attr:`Model.rounding_rtol`); every certifier subtracts
# it from every margin.
ROUNDING_RTOL = 1e-5
EQUIVALENCE_RTOL = 1e-4
EQUIVALENCE_SAMPLES = 16


@dataclass
class Model:
    """A loaded classifier: where it came from, its IR (None on the fast path) and its native runner."""

    path: Path
    sha256: str
    format: str
    graph: Graph | None
    runner: TorchRunner | OrtRunner
    notes: list[str]
    equivalence_gap: float = 0.0  # max |IR − native| on the random check inputs
    output: str = ""  # the tensor certified when it is not the file's one declared output (--output, a Softmax tail)
    shape_from_data: bool = False  # the input shape was given (--input-shape, the data's), not read from the file
    runs_file: bool = False  # the native runner runs the file itself, unrewritten (what the fast path may run again)
    shape: tuple[int, ...] = ()  # input shape and class count without an IR (the fast path reads them from the bound)
    classes: int = 0
    check_logits: np.ndarray | None = None  # the IR's logits on check_inputs(): the fast path checks the runner against them

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.graph.input_shape if self.graph is not None else self.shape

    @property
    def num_classes(self) -> int:
        return self.graph.num_classes if self.graph is not None else self.classes

    @property
    def rounding_rtol(self) -> float:
        """The relative margin budget every certificate of this model keeps (rounding and the IR/native gap)."""
        return max(ROUNDING_RTOL, 4 * self.equivalence_gap)


_SHAPE = re.compile(r"\s*[0-9]+\s*(?:,\s*[0-9]+\s*)*|\s*[0-9]+\s*(?:x\s*[0-9]+\s*)*")


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """'1,28,28' or '1x28x28' → (1, 28, 28); anything else (a stray letter, an empty part, a mix) is refused."""
    if text is None:
        return None
    if not _SHAPE.fullmatch(text):
        raise GlorocertError(f"--input-shape {text!r}: expected positive integers separated by commas or by x, "
                             "such as 1,28,28 or 1x28x28 (channels, height, width)")
    shape = tuple(int(p) for p in re.split(r"[,x]", text))
    if any(s <= 0 for s in shape):
        raise GlorocertError(f"--input-shape {text!r}: every dimension must be positive, such as 1,28,28 or 1x28x28")
    return shape


def check_inputs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """The equivalence check's inputs (float32, seeded): half uniform in [0, 1], half Gaussian around 0.5 (σ 0.5)."""
    rng = np.random.default_rng(seed)
    half = EQUIVALENCE_SAMPLES // 2
    return np.concatenate([rng.random((half, *shape)), 0.5 + 0.5 * rng.standard_normal((half, *shape))]).astype(np.float32)


def measured_gap(native: np.ndarray, ir: np.ndarray, path: Path) -> float:
    """max |IR − native| on the check inputs; refuses the model where they differ beyond EQUIVALENCE_RTOL of the
    logits' scale (a converter bug that changed the function would otherwise become an unsound certificate)."""
    if native.shape != ir.shape:
        raise GlorocertError(f"{path}: the IR produces shape {ir.shape[1:]} but the model {native.shape[1:]}; conversion refused")
    if not np.isfinite(native).all():
        raise GlorocertError(f"{path}: the model outputs NaN/inf on random inputs; check its weights")
    gap = float(np.abs(native - ir).max())
    if gap > EQUIVALENCE_RTOL * (1.0 + float(np.abs(native).max())):
        raise GlorocertError(
            f"{path}: the converted graph differs from the model by {gap:.3g} on random inputs; "
            "refusing to certify (please report this model)"
        )
    return gap
