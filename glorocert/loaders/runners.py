"""Native runners: the original model, run fast on batches (torch or onnxruntime).

torch is imported where it is used: an ONNX model on the CPU runs with onnxruntime and numpy alone.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from glorocert.errors import GlorocertError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str) -> tuple[str, str | None]:
    """``(device, note)``: falls back to the CPU with a note when CUDA is asked for but absent."""
    if device == "cpu":
        return "cpu", None
    import torch

    if device == "auto":
        return ("cuda" if device == "auto" and torch.cuda.is_available() else "cpu"), None
    if device.startswith("cuda"):
        if torch.cuda.is_available():
            return device, None
        return "cpu", f"--device {device}: no CUDA device is available here; running on the CPU"
    raise GlorocertError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")


def in_chunks(run, x, static_batch: int | None):
    """Run a model whose batch size is fixed at ``static_batch`` on any batch (numpy or torch): chunk, pad the last."""
    if not static_batch or len(x) == static_batch:
        return run(x)
    outputs = []
    for start in range(0, len(x), static_batch):
        chunk = x[start : start + static_batch]
        kept = len(chunk)
        if kept < static_batch:
            chunk = _concat([chunk, chunk[[0] * (static_batch - kept)]])  # padded with copies of its first sample
        outputs.append(run(chunk)[:kept])
    return _concat(outputs)


def _concat(parts):
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    return torch.cat(parts)


class TorchRunner:
    """A torch module in eval mode on a device; float32 in, float32 logits out."""

    kind = "torch"

    def __init__(self, module: torch.nn.Module, device: str = "cpu", static_batch: int | None = None):
        import torch

        self._torch = torch
        self.device = device
        self.static_batch = static_batch
        try:
            module = module.eval()
        except NotImplementedError:  # torch.export modules carry no train/eval state
            pass
        self.module = module.to(device) if hasattr(module, "to") else module
        for parameter in getattr(self.module, "parameters", lambda: [])():
            parameter.requires_grad_(False)

    @property
    def description(self) -> str:
        return f"torch {self._torch.__version__} on {self.device}"

    def torch(self, x: torch.Tensor) -> torch.Tensor:
        # no_grad, not inference_mode: TorchScript modules that were exported once reject inference tensors
        with self._torch.no_grad():
            return in_chunks(self.module, x.to(self.device, self._torch.float32), self.static_batch)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.torch(self._torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).float().cpu().numpy()


class OrtRunner:
    """An onnxruntime session; the CUDA provider when asked for and present."""

    kind = "onnxruntime"

    def __init__(self, model: bytes | str, device: str = "cpu"):
        """``model``: the serialized ModelProto, or the file's path (onnxruntime then reads its external data too)."""
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        self.note = None
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" in available:
                providers.insert(0, "CUDAExecutionProvider")
            else:
                self.note = "onnxruntime has no CUDA provider here (pip install 'glorocert[gpu]'); running on the CPU"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:  # as torch does; Ray sets it to an actor's CPUs (glorocert/distributed.py)
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(model, options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        batch = self.session.get_inputs()[0].shape[0]
        self.static_batch = batch if isinstance(batch, int) and batch > 0 else None
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    @property
    def description(self) -> str:
        import onnxruntime as ort

        return f"onnxruntime {ort.__version__} ({', '.join(self.session.get_providers())})"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        run = lambda chunk: self.session.run(None, {self.input_name: np.ascontiguousarray(chunk, dtype=np.float32)})[0]  # noqa: E731
        return in_chunks(run, np.asarray(x), self.static_batch)

    def torch(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.from_numpy(self(x.detach().cpu().numpy())).to(x.device)
