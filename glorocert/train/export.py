"""Exports of a trained torch model: ONNX (opset 17) and TorchScript, each written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from glorocert.files import atomic_write

ONNX_OPSET = 17


def export_onnx(model: torch.nn.Module, input_shape, path: str | os.PathLike) -> Path:
    """ONNX (opset 17, legacy exporter), input ``input`` (N×C×H×W, dynamic N), output ``logits``."""
    model = model.eval()
    example = torch.zeros(1, *input_shape)
    with atomic_write(path) as tmp:
        torch.onnx.export(
            model, example, str(tmp), dynamo=False, opset_version=ONNX_OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return Path(path)


def export_torchscript(model: torch.nn.Module, input_shape, path: str | os.PathLike) -> Path:
    """TorchScript by ``torch.jit.trace`` (the model has no data-dependent control flow)."""
    model = model.eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.zeros(2, *input_shape))
    with atomic_write(path) as tmp:
        traced.save(str(tmp))
    return Path(path)
