"""What a finished training run leaves in its output directory.

``model.safetensors``  glorocert checkpoint (weights + spec, :func:`glorocert.zoo.load_checkpoint`)
``model.onnx``         ONNX opset 17, input ``input``, output ``logits``, dynamic batch
``model.ts.pt``        TorchScript (traced)
``model.onnx.bound.json``  the frozen *sound* bound of model.onnx, from :mod:`glorocert.api`
                       (where ``glorocert certify model.onnx`` finds it; nets trained to be
                       certified only — smoothing base models, ``--method gaussian|macer``, get none)
``log.csv``            one row per epoch (written during training, :mod:`glorocert.train.state`)
``card.md``            the model card (:mod:`glorocert.train.cards`)

The held-out VRA on the card is measured through the public API, exactly as
``glorocert certify`` (``--method bcp|kw`` for the local methods) counts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from glorocert import api
from glorocert._version import __version__
from glorocert.errors import GlorocertError
from glorocert.files import write_text
from glorocert.results import eps_key
from glorocert.train.cards import model_card, smoothing_card
from glorocert.train.config import Provenance
from glorocert.train.export import export_onnx, export_torchscript
from glorocert.train.records import TrainResult, notify
from glorocert.zoo import save_checkpoint

GLORO_BATCH = 1000  # held-out samples per forward pass when measuring the sound GloRo VRA
LOCAL_BATCH = 250   # ... and per pass of the local certifier (bcp / kw)


def write_outputs(result: TrainResult, out: Path, x_val: torch.Tensor, y_val: torch.Tensor,
                  provenance: Provenance, progress: Any = None) -> None:
    """Write checkpoint, exports, bound and card of ``result`` into ``out`` (atomically, file by file)."""
    model, spec = result.model.cpu().eval(), result.spec
    result.files["checkpoint"] = str(save_checkpoint(out / "model.safetensors", model, spec,
                                                     _checkpoint_record(result, provenance)))
    result.files["onnx"] = str(export_onnx(model, spec["input_shape"], out / "model.onnx"))
    result.files["torchscript"] = str(export_torchscript(model, spec["input_shape"], out / "model.ts.pt"))
    result.files["log"] = str(out / "log.csv")
    if result.config.smoothing is not None:  # a smoothing base model: no GloRo bound, no VRA claimed
        card = smoothing_card(result, provenance, len(y_val), out.name)
    else:
        _certify_held_out(result, out / "model.onnx", api.from_arrays(x_val.numpy(), y_val.numpy(), name="held-out split"),
                          progress)
        card = model_card(result, provenance, len(y_val), out.name)
    result.files["card"] = str(write_text(out / "card.md", card))


def _checkpoint_record(result: TrainResult, provenance: Provenance) -> dict[str, Any]:
    """The training record in the checkpoint's header: settings, provenance and the final figures."""
    config = result.config
    record: dict[str, Any] = {
        "glorocert_version": __version__,
        "method": config.method,
        "data": config.data,
        "data_description": provenance.data_description,
        "clean_acc": result.clean_acc,
        "seconds": result.seconds,
        "epochs_done": len(result.history),
        "train_config": config.to_dict(),
    }
    if config.smoothing is not None:
        record.update({"sigma": config.smoothing.sigma, "noisy_acc": result.noisy_acc,
                       "model_kind": "randomized-smoothing base model"})
    else:
        record.update({
            "eps": config.robust.eps, "train_eps": config.robust.train_eps, "loss": config.robust.loss,
            "vra_estimate": result.vra_estimate, "lipschitz_estimate": result.lipschitz_estimate,
            "margin_lipschitz_estimate": np.round(result.margin_lipschitz_estimate, 8).tolist(),
        })
    return record


def _certify_held_out(result: TrainResult, onnx_path: Path, held_out: api.Dataset, progress: Any) -> None:
    """Freeze the sound bound of ``onnx_path`` next to it and certify the held-out split as ``glorocert certify``
    does: the GloRo VRA with that bound, and (bcp / kw) the VRA by the local certifier with guaranteed bounds."""
    config = result.config
    eps = config.robust.eps
    model = bound = None
    result.bound_error = None
    try:
        model = api.load(onnx_path)
        bound = api.compute_bound(model)
        bound.save(api.default_path(onnx_path))
        certified = api.certify(model, held_out, [eps], bound=bound, batch_size=GLORO_BATCH)
    except GlorocertError as exc:
        result.bound_error = f"the bound could not be computed: {exc}"
        bound = None
    else:
        result.files["bound"] = str(api.default_path(onnx_path))
        result.vra_sound = certified.summary["vra"][eps_key(eps)]
        result.bound_global_upper = float(bound.global_upper)
    if config.local:
        notify(progress, "on_message", f"certifying the held-out split with {config.method.upper()} (sound bounds)…")
        report = api.certify_locally_at(model or api.load(onnx_path), held_out, [eps], config.method, bound=bound,
                                        batch_size=LOCAL_BATCH)
        result.vra_local_sound = report["vra"][eps_key(eps)]
    if result.bound_error:
        notify(progress, "on_message", f"no frozen bound written: {result.bound_error}")
