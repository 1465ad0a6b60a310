"""Model files → a native runner plus the IR, checked to compute the same function (loaders/loading.py).

The names below are imported on first use: ``Model`` and ``ROUNDING_RTOL`` come without torch or onnx, so
that certify's fast path (a frozen bound, an ONNX file, onnxruntime) starts as fast as inference does.
"""

from __future__ import annotations

import importlib

_WHERE = {"Model": "model", "ROUNDING_RTOL": "model", "parse_shape": "model",
          "load": "loading", "torch_to_onnx": "loading", "check_equivalence": "loading"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"glorocert.loaders.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'glorocert.loaders' has no attribute {name!r}")
