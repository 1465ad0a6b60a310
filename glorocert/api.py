"""The public Python API; the CLI, the studies and training are built on it.

    import glorocert
    model = glorocert.load("model.onnx")            # native runner + IR, checked equal
    bound = glorocert.compute_bound(model)          # frozen Bound (sound by default)
    res = glorocert.certify(model, "mnist-5k", eps=[0.3, 1.58], bound=bound)
    res.rows; res.summary; res.plot("curve.png")
"""

from __future__ import annotations

from glorocert.certify.gloro_onnx import export_gloro_onnx
from glorocert.certify.methods import LOCAL_METHODS, METHODS
from glorocert.certify.pipeline import ROWS_SCHEMA_VERSION, CertifyResult, certify, certify_locally_at, versions
from glorocert.data import BUILTINS, MANIFEST as SHARD_MANIFEST, Dataset, export_shards, from_arrays, open_dataset
from glorocert.lipschitz.boundfile import Bound, default_path
from glorocert.lipschitz.freeze import check_bound_settings, compute_bound, resolve_bound, verify_bound
from glorocert.loaders import Model, load, parse_shape
from glorocert.normalization import Normalization

__all__ = [
    "load", "check_bound_settings", "compute_bound", "resolve_bound", "verify_bound", "certify", "certify_locally_at",
    "CertifyResult", "Bound", "Model",
    "BUILTINS", "Dataset", "Normalization", "open_dataset", "from_arrays", "parse_shape", "default_path", "versions",
    "export_gloro_onnx", "export_shards", "SHARD_MANIFEST", "METHODS", "LOCAL_METHODS", "ROWS_SCHEMA_VERSION",
]
