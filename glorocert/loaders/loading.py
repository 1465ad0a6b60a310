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
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from glorocert.errors import GlorocertError, InputShapeNeeded, one_line
from glorocert.files import sha256_of
from glorocert.graph import Graph
from glorocert.loaders.model import Model, check_inputs, measured_gap
from glorocert.loaders.onnx_loader import input_shape_of, onnx_to_graph
from glorocert.loaders.onnx_prepare import GZIP_MAGIC, prepare, read_onnx
from glorocert.loaders.runners import OrtRunner, TorchRunner, resolve_device
from glorocert.zoo import load_checkpoint

def load(
    path: str | Path,
    *,
    input_shape: tuple[int, ...] | None = None,
    data_shape: tuple[int, ...] | None = None,
    output: str | None = None,
    trust_pickle: bool = False,
    device: str = "cpu",
) -> Model:
    """Load a model file; raises GlorocertError with a one-line reason when it cannot be certified.

    ``data_shape`` (the per-sample shape of the data it will see) stands in for an input shape the file does not
    record, and lets a channels-last model take channels-first samples; ``output`` picks the logits tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise GlorocertError(f"{path}: no such model file")
    device, note = resolve_device(device)
    notes = [note] if note else []
    if _is_onnx(path):
        model, rewrites, certified = _prepared(read_onnx(path), output, input_shape or data_shape)
        _, declared = input_shape_of(model)
        shape = input_shape or _static_shape(declared, data_shape, path)
        graph = onnx_to_graph(model, shape)
        # unrewritten, the file itself runs (and is checked), so that certify's fast path may run it without the IR
        runs_file = not rewrites and not certified and not _is_gzip(path)
        runner = OrtRunner(str(path) if runs_file else model.SerializeToString(), device)
        notes += [runner.note] if runner.note else []
        fmt = "onnx"
    else:
        runs_file = False
        module, shape, fmt, static_batch, exportable = _load_torch(path, input_shape, trust_pickle, data_shape)
        model, rewrites, certified = _prepared(torch_to_onnx(exportable, shape), output, shape)
        graph = onnx_to_graph(model, shape)
        runner = TorchRunner(module, device, static_batch)
        if certified:  # the torch module computes what follows the logits; run the logits' own graph instead
            runner = OrtRunner(model.SerializeToString(), device)
            rewrites.append("the model runs through its ONNX export, which stops at the certified logits")
    gap, check_logits = check_equivalence(graph, runner, path)
    given = (input_shape or data_shape) is not None and fmt not in ("checkpoint", "torch.export")
    return Model(path, sha256_of(path), fmt, graph, runner, notes + rewrites, gap, certified, given, runs_file,
                 check_logits=check_logits)


def _is_onnx(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".onnx", ".onnx.gz")) or _is_gzip(path)  # a gzipped file is no TorchScript archive


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == GZIP_MAGIC


def _prepared(model, output: str | None, data_shape) -> tuple:
    """The prepared model, its rewrite notes, and the certified tensor's name when it is not the one declared output."""
    declared = [o.name for o in model.graph.output]
    prepared, rewrites = prepare(model, output=output, data_shape=data_shape)
    certified = prepared.graph.output[0].name
    return prepared, rewrites, ("" if declared == [certified] else certified)


def _static_shape(declared, data_shape, path) -> tuple[int, ...]:
    if declared and all(d is not None for d in declared):
        return tuple(declared)
    if data_shape is not None and len(data_shape) == len(declared) and all(d in (None, s) for d, s in zip(declared, data_shape)):
        return tuple(data_shape)
    raise InputShapeNeeded(f"{path}: the model does not fix its input shape {declared}; pass --input-shape C,H,W or --data")


def _load_torch(path: Path, input_shape, trust_pickle: bool, data_shape=None):
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
            raise GlorocertError(f"{path}: not a readable torch.export archive ({type(e).__name__}: {one_line(str(e), 200)})") from None
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
    if not zipfile.is_zipfile(path) and _starts_as_pickle(path):  # torch.save's format before PyTorch 1.6
        return _load_pickle(path, input_shape or data_shape, trust_pickle)
    if not zipfile.is_zipfile(path):
        raise GlorocertError(f"{path}: not a TorchScript/torch archive (not a zip file); is it truncated, or another format?")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        try:
            with _quiet_torch():
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise GlorocertError(f"{path}: corrupt TorchScript archive ({one_line(str(e), 200)})") from None
        shape = input_shape or data_shape
        if shape is None:
            raise InputShapeNeeded(f"{path}: TorchScript does not record the input shape; pass --input-shape C,H,W or --data (e.g. 1,28,28)")
        return module, tuple(shape), "torchscript", None, module
    return _load_pickle(path, input_shape or data_shape, trust_pickle)


def _starts_as_pickle(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(1) == b"\x80"  # the PROTO opcode that begins every pickle of protocol 2 or later


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
        raise InputShapeNeeded(f"{path}: a pickled module does not record its input shape; pass --input-shape C,H,W or --data")
    return obj, tuple(input_shape), "pickle", None, obj


def _frozen(module):
    """A TorchScript module with its parameters and their in-module computations (torch's spectral_norm,
    orthogonal, weight_norm parametrisations, which the ONNX exporter cannot trace) folded into constants; None
    when it is not TorchScript or freezing fails. Freezing loses the layers' names, so it is the second attempt."""
    if not isinstance(module, torch.jit.ScriptModule):
        return None
    try:
        return torch.jit.freeze(module.eval())
    except Exception:  # noqa: BLE001 — the first export's error is the one to report
        return None


def torch_to_onnx(module, input_shape: tuple[int, ...]):
    """Export a torch module or an ExportedProgram to an in-memory ONNX model (the IR's one converter)."""
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return onnx.load_from_string(_export(module, input_shape))
        except Exception as e:
            frozen = _frozen(module)
            if frozen is not None:
                with contextlib.suppress(Exception):
                    return onnx.load_from_string(_export(frozen, input_shape))
            raise GlorocertError(
                f"could not convert the PyTorch model for analysis ({type(e).__name__}: {one_line(str(e), 300)}); "
                "is --input-shape right?"
            ) from None


def _export(module, input_shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    if isinstance(module, torch.export.ExportedProgram):  # exported as it was saved (its own batch)
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        torch.onnx.export(module, (), buffer, dynamo=True, opset_version=18, verbose=False, optimize=True)
    else:
        torch.onnx.export(
            module.eval() if hasattr(module, "eval") else module, (torch.zeros(1, *input_shape),), buffer,
            dynamo=False, opset_version=17, input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return buffer.getvalue()


def check_equivalence(graph: Graph, runner, path: Path, seed: int = 0) -> tuple[float, np.ndarray]:
    """Refuse the model unless the IR and the native runner agree (module docstring); the gap and the IR's logits."""
    x = check_inputs(graph.input_shape, seed)
    try:
        native = np.asarray(runner(x), dtype=np.float64)
    except Exception as e:
        raise GlorocertError(f"{path}: the model does not run on inputs of shape {graph.input_shape} ({one_line(str(e), 200)})") from None
    with torch.no_grad():
        ir = graph.forward(torch.from_numpy(x).double()).numpy()
    return measured_gap(native, ir, path), ir


__all__ = ["load", "torch_to_onnx", "check_equivalence"]
