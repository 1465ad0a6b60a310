"""A run's output directory while it trains: ``log.csv`` and the resume state (safetensors + JSON, no pickle).

After every epoch :func:`end_epoch` rewrites the log and checkpoints
everything needed to resume bit for bit: the model, Adam's state, the
objective's tensors (the power-iteration iterates), torch's RNG state, the
config and the history so far. :func:`open_run` refuses to overwrite a run or
a trained model and, with ``resume``, restores that state.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import torch

from glorocert.errors import GlorocertError
from glorocert.files import atomic_write, jsonable, sha256_of, write_text
from glorocert.train.config import TrainConfig
from glorocert.train.records import EpochRecord

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
STATE_FORMAT = "2"  # 2: the config in sections (robust / smoothing)


@dataclasses.dataclass
class Resumed:
    """Where a resumed run continues: epochs done, seconds spent, the history so far."""

    epochs_done: int = 0
    seconds: float = 0.0
    history: list[EpochRecord] = dataclasses.field(default_factory=list)


def open_run(out: Path | None, config: TrainConfig, model, optimizer, objective) -> Resumed:
    """Create ``out`` (refusing one that holds a run or a model) or, with ``config.resume``, restore its state."""
    if out is None:
        if config.resume:
            raise GlorocertError("resume needs an output directory")
        return Resumed()
    out.mkdir(parents=True, exist_ok=True)
    if config.resume:
        state = _read_state(out)
        try:
            saved = TrainConfig.from_dict(state["config"])
        except (TypeError, KeyError) as exc:
            raise GlorocertError(f"{out / STATE_JSON} was written by another glorocert version ({exc}); cannot resume") from None
        config.check_resumable(saved)
        _restore_tensors(out, state, model, optimizer, objective)
        return Resumed(int(state["epochs_done"]), float(state["seconds"]), [EpochRecord(**row) for row in state["history"]])
    if (out / STATE_JSON).exists():
        raise GlorocertError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    if (out / "model.safetensors").exists():
        raise GlorocertError(f"{out} already holds a trained model; choose another --out (or delete it first)")
    return Resumed()


def end_epoch(out: Path, model, optimizer, objective, config: TrainConfig, spec: dict,
              history: list[EpochRecord], seconds: float) -> None:
    """After each epoch: the log so far, and everything --resume needs to continue from here."""
    write_log(out / "log.csv", history, objective.log_columns)
    _save_state(out, model, optimizer, objective, {
        "format": STATE_FORMAT,
        "epochs_done": len(history),
        "seconds": seconds,
        "config": config.to_dict(),
        "spec": spec,
        "history": [dataclasses.asdict(r) for r in history],
    })


def write_log(path: Path, history: list[EpochRecord], columns: tuple[str, ...]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for record in history:
        row = dataclasses.asdict(record)
        writer.writerow([
            "" if row[c] is None else row[c] if isinstance(row[c], int) else f"{row[c]:.6g}" for c in columns
        ])
    write_text(path, buffer.getvalue())


def _save_state(out: Path, model, optimizer, objective, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensors[f"model.{name}"] = tensor.detach().cpu().contiguous()
    optim_state = optimizer.state_dict()
    for param_id, entries in optim_state["state"].items():
        for key, value in entries.items():
            tensors[f"optim.{param_id}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    for name, tensor in objective.state_tensors().items():
        tensors[name] = tensor.cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    with atomic_write(out / STATE_TENSORS) as tmp:
        save_file(tensors, str(tmp), metadata={"glorocert_train_state": STATE_FORMAT})
    state = dict(state)
    state["param_groups"] = jsonable(optim_state["param_groups"])
    state["tensors_sha256"] = sha256_of(out / STATE_TENSORS)
    write_text(out / STATE_JSON, json.dumps(state, indent=1))


def _read_state(out: Path) -> dict[str, Any]:
    """The JSON half of the resume state, checked against the tensors' hash."""
    json_path, tensor_path = out / STATE_JSON, out / STATE_TENSORS
    if not json_path.exists() or not tensor_path.exists():
        raise GlorocertError(f"nothing to resume in {out}: {STATE_JSON} / {STATE_TENSORS} not found")
    try:
        state = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GlorocertError(f"{json_path} is corrupt ({exc}); cannot resume") from None
    if state.get("tensors_sha256") != sha256_of(tensor_path):
        raise GlorocertError(f"{tensor_path} does not match {json_path} (interrupted write?); cannot resume")
    return state


def _restore_tensors(out: Path, state: dict[str, Any], model, optimizer, objective) -> None:
    """Model, Adam, the objective's tensors and torch's RNG as they were after the last finished epoch."""
    from safetensors.torch import load_file

    tensor_path = out / STATE_TENSORS
    try:
        tensors = load_file(str(tensor_path))
    except Exception as exc:
        raise GlorocertError(f"{tensor_path} is corrupt ({exc}); cannot resume") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optim_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, param_id, name = key.split(".", 2)
            optim_state["state"].setdefault(int(param_id), {})[name] = value
    optimizer.load_state_dict(optim_state)
    objective.load_state_tensors(tensors)
    torch.set_rng_state(tensors["rng.torch"])
