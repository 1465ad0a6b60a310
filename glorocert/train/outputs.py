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

The results (all but ``log.csv``, which grows epoch by epoch with the resume
state) are made in a hidden staging directory inside the output directory
(:data:`~glorocert.train.state.STAGING`) — the bound and card from the staged
files, so ``model.onnx.bound.json`` names ``model.onnx`` and its sha256 — and
then moved into place together with SIGINT and SIGTERM held: they appear all
at once or not at all, and never replace half of a previous set.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glorocert import api
from glorocert._version import __version__
from glorocert.errors import GlorocertError
from glorocert.files import Outputs, atomic_write, write_text
from glorocert.results import eps_key
from glorocert.train.cards import model_card, smoothing_card
from glorocert.train.config import Provenance
from glorocert.train.export import export_onnx, export_torchscript
from glorocert.train.records import TrainResult, notify
from glorocert.train.state import LOG, STAGING
from glorocert.zoo import save_checkpoint

GLORO_BATCH = 1000  # held-out samples per forward pass when measuring the sound GloRo VRA
LOCAL_BATCH = 250   # ... and per pass of the local certifier (bcp / kw)


def write_outputs(result: TrainResult, out: Path, x_val: torch.Tensor, y_val: torch.Tensor,
                  provenance: Provenance, progress: Any = None) -> None:
    """Make checkpoint, exports, bound and card of ``result`` in ``out``'s staging directory, then move them into
    ``out`` together (module docstring); ``progress.on_publishing`` gets the list each result joins once in place."""
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed here
    staging.mkdir(parents=True)
    try:
        _make_results(result, staging, x_val, y_val, provenance, progress)
        _publish([Path(p) for k, p in result.files.items() if k != "log"], out, progress)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.files = {key: str(out / Path(path).name) for key, path in result.files.items()}


def _make_results(result: TrainResult, staging: Path, x_val: torch.Tensor, y_val: torch.Tensor,
                  provenance: Provenance, progress: Any) -> None:
    """Every result file, in ``staging`` (``result.files`` names them there; the log stays where it is)."""
    model, spec, out = result.model.cpu().eval(), result.spec, staging.parent
    result.files["checkpoint"] = str(save_checkpoint(staging / "model.safetensors", model, spec,
                                                     _checkpoint_record(result, provenance)))
    result.files["onnx"] = str(export_onnx(model, spec["input_shape"], staging / "model.onnx"))
    result.files["torchscript"] = str(export_torchscript(model, spec["input_shape"], staging / "model.ts.pt"))
    result.files["log"] = str(out / LOG)
    if result.config.smoothing is not None:  # a smoothing base model: no GloRo bound, no VRA claimed
        card = smoothing_card(result, provenance, len(y_val), out.name)
    else:
        _certify_held_out(result, staging / "model.onnx",
                          api.from_arrays(x_val.numpy(), y_val.numpy(), name="held-out split"), progress)
        card = model_card(result, provenance, len(y_val), out.name)
    result.files["card"] = str(write_text(staging / "card.md", card))


def _publish(staged: list[Path], out: Path, progress: Any) -> None:
    """Move the staged files into ``out`` together, with SIGINT and SIGTERM held (files.Outputs publishes them).
    ``progress.on_publishing`` gets, before, the list each joins as it lands: an interrupt that arrives during the
    renames is delivered after them, and whoever it tells can then say they are in place."""
    outputs = Outputs()
    for path in staged:
        outputs.add(out / path.name, "--out")
    notify(progress, "on_publishing", outputs.published)
    with outputs.publishing():
        for path in staged:
            with atomic_write(out / path.name) as tmp:  # staged by Outputs, moved into place with the others
                os.replace(path, tmp)


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
