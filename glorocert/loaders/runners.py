"""Native runners: the original model, run fast on batches (torch or onnxruntime)."""

from __future__ import annotations

import numpy as np
import torch

from glorocert.errors import GlorocertError


def resolve_device(device: str) -> tuple[str, str | None]:
    """``(device, note)``: falls back to the CPU with a note when CUDA is asked for but absent."""
    if device in ("cpu", "auto"):
        return ("cuda" if device == "auto" and torch.cuda.is_available() else "cpu"), None
    if device.startswith("cuda"):
        if torch.cuda.is_available():
            return device, None
        return "cpu", f"--device {device}: no CUDA device is available here; running on the CPU"
    raise GlorocertError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")


class TorchRunner:
    """A torch module in eval mode on a device; float32 in, float32 logits out."""

    kind = "torch"

    def __init__(self, module: torch.nn.Module, device: str = "cpu"):
        self.device = device
        self.module = module.eval().to(device) if hasattr(module, "eval") else module

    @property
    def description(self) -> str:
        return f"torch {torch.__version__} on {self.device}"

    def torch(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(x.to(self.device, torch.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.torch(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).float().cpu().numpy()


class OrtRunner:
    """An onnxruntime session; the CUDA provider when asked for and present."""

    kind = "onnxruntime"

    def __init__(self, model_bytes: bytes, device: str = "cpu"):
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
        self.session = ort.InferenceSession(model_bytes, options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    @property
    def description(self) -> str:
        import onnxruntime as ort

        return f"onnxruntime {ort.__version__} ({', '.join(self.session.get_providers())})"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def torch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self(x.detach().cpu().numpy())).to(x.device)
