"""The public Python API; the CLI, the studies and training are built on it.

    import glorocert
    model = glorocert.load("model.onnx")            # native runner + IR, checked equal
    bound = glorocert.compute_bound(model)          # frozen Bound (sound by default)
    res = glorocert.certify(model, "mnist-5k", eps=[0.3, 1.58], bound=bound)
    res.rows; res.summary; res.plot("curve.png")

Each name is imported on first use, so that a command pays only for what it runs: certify's fast path
(``frozen_model``) never imports torch or onnx.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "certify.cluster": ["CertifyWork", "ModelRecipe", "certify_on_ray"],
    "certify.frozen": ["frozen_model"],
    "certify.gloro_onnx": ["export_gloro_onnx"],
    "certify.methods": ["LOCAL_METHODS", "METHODS"],
    "certify.pipeline": ["ROWS_SCHEMA_VERSION", "BatchCertifier", "BatchLocalAtEps", "CertifyResult", "certify",
                         "certify_locally_at", "certify_summary", "local_at_eps_summary", "versions"],
    "data": ["BUILTINS", "Dataset", "export_shards", "from_arrays", "open_dataset", "SHARD_MANIFEST"],
    "lipschitz.boundfile": ["Bound", "default_path"],
    "lipschitz.freeze": ["check_bound_settings", "compute_bound", "resolve_bound", "verify_bound"],
    "loaders": ["Model", "load", "parse_shape"],
    "normalization": ["Normalization"],
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
_RENAMED = {"SHARD_MANIFEST": "MANIFEST"}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'glorocert.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"glorocert.{_MODULE_OF[name]}"), _RENAMED.get(name, name))
    globals()[name] = value  # the next lookup is a plain attribute
    return value
