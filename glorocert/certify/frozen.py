"""certify's fast path: an ONNX file whose frozen bound already vouches for it runs on onnxruntime alone.

Loading a model (loaders/loading.py) converts it to the IR and checks the IR against the native runner.
When that runner ran the file itself, unrewritten, `glorocert bound` records in the bound file the IR's
logits on the check inputs (``check_logits``; the inputs are seeded, loaders/model.py ``check_inputs``).
Certifying the same file again (same sha256, the declared output, the same normalisation) needs no IR:
GloRo certification uses the frozen margin matrix and the forward pass. :func:`frozen_model` runs the
check inputs through onnxruntime and measures the gap to the recorded IR logits: on this machine, with
this runtime, so the rounding budget is exactly the one the full load would measure here, and a runner
that computes another function is caught as the full load would catch it. The command then imports
neither torch nor onnx (about 2 s of start-up: most of certify's cost on 60k images).

Anything else takes the full path, which checks everything again and says what is wrong: another output
or a rewritten graph (Softmax tail, channels-last, folded constants), TorchScript, CUDA, a local method,
--verify-bound, a bound file from before these fields, or one that fails any check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from glorocert.errors import GlorocertError
from glorocert.files import sha256_of
from glorocert.lipschitz.boundfile import Bound, default_path
from glorocert.loaders.model import Model, check_inputs, measured_gap
from glorocert.loaders.runners import OrtRunner
from glorocert.normalization import Normalization

def frozen_model(path: str | Path, bound_path: str | Path | None, normalization: Normalization | None, *,
                 device: str = "cpu", output: str | None = None, input_shape: tuple[int, ...] | None = None) -> Model | None:
    """The Model of the ONNX file ``path`` as its bound file recorded it, or None when the full load is needed."""
    path = Path(path)
    source = Path(bound_path) if bound_path is not None else default_path(path)
    if device != "cpu" or output is not None or path.suffix.lower() != ".onnx" or not (path.is_file() and source.is_file()):
        return None
    try:
        bound = Bound.load(source)
    except GlorocertError:
        return None  # the full path refuses it with the command that recomputes it
    shape = tuple(bound.input_shape)
    if (not bound.checked_runner or bound.check_logits is None or bound.output or bound.model_format != "onnx"
            or (input_shape is not None and tuple(input_shape) != shape) or not bound.same_normalization(normalization)):
        return None
    sha256 = sha256_of(path)
    if sha256 != bound.model_sha256:
        return None
    try:
        runner = OrtRunner(str(path), "cpu")
        gap = measured_gap(np.asarray(runner(check_inputs(shape)), np.float64), np.asarray(bound.check_logits), path)
    except Exception:  # noqa: BLE001 — onnxruntime's errors and a failed check: the full path reports them
        return None
    declared = runner.session.get_inputs()[0].shape[1:]
    return Model(path, sha256, "onnx", None, runner, [], gap, shape_from_data=not all(isinstance(d, int) for d in declared),
                 runs_file=True, shape=shape, classes=len(bound.margin_upper))
