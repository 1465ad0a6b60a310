"""Model files → a native runner plus the IR, checked to compute the same function.

Formats, chosen by extension and content:

* ``.onnx`` — validated with ``onnx.checker``, run by onnxruntime.
* ``.pt2`` — a ``torch.export`` archive.
* ``.safetensors`` — glorocert's own checkpoint (weights + architecture JSON in the header).
* ``.pt``/``.pth``/``.ts``/… — TorchScript (``torch.jit.save``). A pickled
  ``nn.Module`` (``torch.save(model)``) runs arbitrary code when loaded, so it
  is refused unless the caller passes ``trust_pickle=True``.

PyTorch models reach the IR through an in-memory ONNX export, so there is one
converter to trust; the native runner stays the original torch module.

**Equivalence check.** After conversion, the IR (float64) and the native
runner (float32) are run on the same random inputs — uniform in [0, 1] and
Gaussian around 0.5 — and must agree to within ``EQUIVALENCE_RTOL`` of the
logits' scale: max|IR − native| ≤ 1e-4 · (1 + max|native|). A converter bug
that changed the function would otherwise become an unsound certificate.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from glorocert.errors import GlorocertError
from glorocert.files import sha256_of
from glorocert.graph import Graph
from glorocert.loaders.onnx_loader import input_shape_of, onnx_to_graph, read_onnx
from glorocert.loaders.runners import OrtRunner, TorchRunner, resolve_device
from glorocert.zoo import load_checkpoint

EQUIVALENCE_RTOL = 1e-4
EQUIVALENCE_SAMPLES = 16
# The native forward runs in float32. Its rounding error, relative to the
# logits' scale, is budgeted here (and raised to 4× the measured IR/native gap
# when that is larger, :attr:`Model.rounding_rtol`); every certifier subtracts
# it from every margin.
ROUNDING_RTOL = 1e-5


@dataclass
class Model:
    """A loaded classifier: where it came from, its IR and its native runner."""

    path: Path
    sha256: str
    format: str
    graph: Graph
    runner: TorchRunner | OrtRunner
    notes: list[str]
    equivalence_gap: float = 0.0  # max |IR − native| on the random check inputs

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.graph.input_shape

    @property
    def num_classes(self) -> int:
        return self.graph.num_classes

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


def load(
    path: str | Path, *, input_shape: tuple[int, ...] | None = None, trust_pickle: bool = False, device: str = "cpu"
) -> Model:
    """Load a model file; raises GlorocertError with a one-line reason when it cannot be certified."""
    path = Path(path)
    if not path.is_file():
        raise GlorocertError(f"{path}: no such model file")
    device, note = resolve_device(device)
    notes = [note] if note else []
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        model = read_onnx(path)
        _, declared = input_shape_of(model)
        shape = input_shape or _require_static(declared, path)
        graph = onnx_to_graph(model, shape)
        runner = OrtRunner(model.SerializeToString(), device)
        if runner.note:
            notes.append(runner.note)
        fmt = "onnx"
    else:
        module, shape, fmt, static_batch, exportable = _load_torch(path, input_shape, trust_pickle)
        graph = onnx_to_graph(torch_to_onnx(exportable, shape), shape)
        runner = TorchRunner(module, device, static_batch)
    gap = check_equivalence(graph, runner, path)
    return Model(path, sha256_of(path), fmt, graph, runner, notes, gap)


def _require_static(declared, path) -> tuple[int, ...]:
    if not declared or any(d is None for d in declared):
        raise GlorocertError(f"{path}: the model does not fix its input shape {declared}; pass --input-shape C,H,W")
    return tuple(declared)


def _load_torch(path: Path, input_shape, trust_pickle: bool):
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        module, spec = load_checkpoint(path)
        shape = tuple(spec["input_shape"])
        if input_shape and tuple(input_shape) != shape:
            raise GlorocertError(f"--input-shape {input_shape} differs from the checkpoint's {shape}")
        return module, shape, "checkpoint", None, module
    if suffix == ".pt2":
        try:
            with _quiet_torch():
                program = torch.export.load(str(path))
        except Exception as e:
            raise GlorocertError(f"{path}: not a readable torch.export archive ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and "val" in n.meta]
        user_inputs = program.graph_signature.user_inputs
        vals = [n.meta["val"] for n in placeholders if n.name in user_inputs]
        if len(vals) != 1:
            raise GlorocertError(f"{path}: the exported program takes {len(vals)} inputs; glorocert certifies single-input classifiers")
        shape = tuple(int(d) for d in vals[0].shape[1:])
        if input_shape and tuple(input_shape) != shape:
            raise GlorocertError(f"--input-shape {input_shape} differs from the exported program's {shape}")
        batch = vals[0].shape[0]
        static_batch = batch if isinstance(batch, int) else None  # a SymInt when exported with a dynamic batch
        return program.module(), shape, "torch.export", static_batch, program
    if not zipfile.is_zipfile(path):
        raise GlorocertError(f"{path}: not a TorchScript/torch archive (not a zip file); is it truncated, or another format?")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        try:
            with _quiet_torch():
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise GlorocertError(f"{path}: corrupt TorchScript archive ({str(e).splitlines()[0][:200]})") from None
        if input_shape is None:
            raise GlorocertError(f"{path}: TorchScript does not record the input shape; pass --input-shape C,H,W (e.g. 1,28,28)")
        return module, tuple(input_shape), "torchscript", None, module
    return _load_pickle(path, input_shape, trust_pickle)


@contextlib.contextmanager
def _quiet_torch():
    """Silence torch's loggers and warnings while it reads a file: a damaged file is then one GlorocertError line,
    not torch's log of the traceback it recovers from (torch.export.load logs one, then fails further on)."""
    loggers = [logger for name, logger in list(logging.root.manager.loggerDict.items())
               if isinstance(logger, logging.Logger) and (name == "torch" or name.startswith("torch."))]
    disabled = [logger.disabled for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for logger in loggers:
                logger.disabled = True
            yield
        finally:
            for logger, was in zip(loggers, disabled):
                logger.disabled = was


def _load_pickle(path: Path, input_shape, trust_pickle: bool):
    if not trust_pickle:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:
            raise GlorocertError(
                f"{path}: a pickled model, which can run arbitrary code when loaded; glorocert refuses it. "
                "Save it with torch.jit.save / torch.export / ONNX, or pass --trust-pickle if you trust the file"
            ) from None
        raise GlorocertError(
            f"{path}: holds only weights ({type(obj).__name__}), no architecture; save the model with "
            "torch.jit.save, torch.export or ONNX"
        )
    obj = torch.load(str(path), map_location="cpu", weights_only=False)
    if not isinstance(obj, torch.nn.Module):
        raise GlorocertError(f"{path}: unpickled a {type(obj).__name__}, not an nn.Module")
    if input_shape is None:
        raise GlorocertError(f"{path}: a pickled module does not record its input shape; pass --input-shape C,H,W")
    return obj, tuple(input_shape), "pickle", None, obj


def torch_to_onnx(module, input_shape: tuple[int, ...]):
    """Export a torch module or an ExportedProgram to an in-memory ONNX model (the IR's one converter)."""
    import onnx

    example = (torch.zeros(1, *input_shape),)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if isinstance(module, torch.export.ExportedProgram):  # exported as it was saved (its own batch)
                logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
                torch.onnx.export(module, (), buffer, dynamo=True, opset_version=18, verbose=False, optimize=True)
            else:
                torch.onnx.export(
                    module.eval() if hasattr(module, "eval") else module, example, buffer, dynamo=False,
                    opset_version=17, input_names=["input"], output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                )
        except Exception as e:
            raise GlorocertError(
                f"could not convert the PyTorch model for analysis ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                "is --input-shape right?"
            ) from None
    return onnx.load_from_string(buffer.getvalue())


def check_equivalence(graph: Graph, runner, path: Path, seed: int = 0) -> float:
    """Refuse the model unless the IR and the native runner agree (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    half = EQUIVALENCE_SAMPLES // 2
    x = torch.cat([
        torch.rand(half, *graph.input_shape, generator=gen),
        0.5 + 0.5 * torch.randn(half, *graph.input_shape, generator=gen),
    ])
    try:
        native = np.asarray(runner(x.numpy()), dtype=np.float64)
    except Exception as e:
        raise GlorocertError(f"{path}: the model does not run on inputs of shape {graph.input_shape} ({str(e).splitlines()[0][:200]})") from None
    with torch.no_grad():
        ir = graph.forward(x.double()).numpy()
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


__all__ = ["Model", "ROUNDING_RTOL", "load", "parse_shape", "torch_to_onnx", "check_equivalence"]
