"""A run's output directory while it trains: ``log.csv`` and the resume state (safetensors + JSON, no pickle).

After every epoch :func:`end_epoch` rewrites the log and checkpoints
everything needed to resume bit for bit: the model, Adam's state, the
objective's tensors (the power-iteration iterates), torch's RNG state, the
config and the history so far. Each epoch's log row and history entry are
formatted once (:class:`HistoryText`): re-serialising the whole history every
epoch made a 10,000-epoch run spend 0.44 s an epoch on it by the end. :func:`check_out_dir` refuses, before anything
is written, a directory holding any file a run would write (a user's
``model.onnx``, another run) unless the run resumes its own state there;
:func:`open_run` then, with ``resume``, restores that state. The results
(:data:`RESULT_FILES`) are staged in :data:`STAGING` and appear together at
the end (:mod:`glorocert.train.outputs`); a staging directory left by a killed
run is removed when the run is resumed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from glorocert.errors import GlorocertError
from glorocert.files import PARTIAL, Outputs, atomic_write, jsonable, sha256_of, write_text
from glorocert.train.config import TrainConfig
from glorocert.train.records import EpochRecord

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
STATE_FORMAT = "2"  # 2: the config in sections (robust / smoothing)
LOG = "log.csv"
RESULT_FILES = ("model.safetensors", "model.onnx", "model.ts.pt", "model.onnx.bound.json", "card.md")  # appear together
TRAIN_FILES = (*RESULT_FILES, LOG, STATE_JSON, STATE_TENSORS)  # every file a run writes into its directory
STAGING = f".train-staging{PARTIAL}"  # where the results are made before they appear; never mistaken for a result


@dataclasses.dataclass
class Resumed:
    """Where a resumed run continues: epochs done, seconds spent, the history so far."""

    epochs_done: int = 0
    seconds: float = 0.0
    history: list[EpochRecord] = dataclasses.field(default_factory=list)


def check_out_dir(out: Path | None, resume: bool) -> None:
    """Refuse, before anything is written or created, an output directory this run would damage: one that is a
    file, or holds any file the run writes (a user's model.onnx, card.md, log.csv, another run), unless ``resume``
    continues the run whose state is there; or, with ``resume``, one without a readable resume state."""
    if out is None:
        if resume:
            raise GlorocertError("resume needs an output directory")
        return
    if out.exists() and not out.is_dir():
        raise GlorocertError(f"--out {out} exists and is not a directory")
    if resume:
        _read_state(out)
        return
    present = [name for name in TRAIN_FILES if (out / name).exists()]
    if STATE_JSON in present or STATE_TENSORS in present:
        raise GlorocertError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    if present:
        raise GlorocertError(f"{out} already holds {', '.join(present)}, which train would overwrite; choose another --out "
                             "(or move those files away)")


def open_run(out: Path | None, config: TrainConfig, model, optimizer, objective) -> Resumed:
    """Check ``out`` (:func:`check_out_dir`) and, with ``config.resume``, restore its state. Creates nothing: the
    directory appears with the first epoch's resume state."""
    check_out_dir(out, config.resume)
    if out is None or not config.resume:
        return Resumed()
    state = _read_state(out)
    try:
        saved = TrainConfig.from_dict(state["config"])
    except (TypeError, KeyError) as exc:
        raise GlorocertError(f"{out / STATE_JSON} was written by another glorocert version ({exc}); cannot resume") from None
    config.check_resumable(saved)
    _restore_tensors(out, state, model, optimizer, objective)
    shutil.rmtree(out / STAGING, ignore_errors=True)  # left by a run killed while it made its results
    return Resumed(int(state["epochs_done"]), float(state["seconds"]), [EpochRecord(**row) for row in state["history"]])


class HistoryText:
    """The history's ``log.csv`` rows and JSON entries, each formatted once, as the run appends epochs."""

    def __init__(self, columns: tuple[str, ...]):
        self.columns = columns
        self.rows: list[str] = []   # log.csv lines, without the header
        self.items: list[str] = []  # JSON objects, one per epoch

    def extend(self, history: list[EpochRecord]) -> None:
        """Format the records beyond those already formatted (a run's history only grows)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="")
        for record in history[len(self.rows):]:
            row = dataclasses.asdict(record)
            writer.writerow([
                "" if row[c] is None else row[c] if isinstance(row[c], int) else f"{row[c]:.6g}" for c in self.columns
            ])
            self.rows.append(buffer.getvalue())
            buffer.seek(0)
            buffer.truncate()
            self.items.append(json.dumps(jsonable(row)))

    def log(self) -> str:
        return "\n".join([",".join(self.columns), *self.rows]) + "\n"


def end_epoch(out: Path, model, optimizer, objective, config: TrainConfig, spec: dict,
              history: list[EpochRecord], seconds: float, on_saved: Callable[[], None] | None = None,
              text: HistoryText | None = None) -> None:
    """After each epoch: the log so far, and everything --resume needs to continue from here. The log and both
    halves of the state are published together (SIGINT and SIGTERM held for the renames), so they always agree.
    ``on_saved`` is called once they are complete, just before the renames: an interrupt that arrives during the
    renames is delivered after them, so whoever it tells about the state hears of the new one. ``text``: the run's
    :class:`HistoryText`, kept from epoch to epoch (None: the whole history is formatted now)."""
    text = text or HistoryText(objective.log_columns)
    text.extend(history)
    outputs = Outputs()
    for name in (LOG, STATE_TENSORS, STATE_JSON):
        outputs.add(out / name, "--out")
    with outputs.publishing():
        write_text(out / LOG, text.log())
        _save_state(out, model, optimizer, objective, {
            "format": STATE_FORMAT,
            "epochs_done": len(history),
            "seconds": seconds,
            "config": config.to_dict(),
            "spec": spec,
        }, text.items)
        if on_saved is not None:
            on_saved()


def _save_state(out: Path, model, optimizer, objective, state: dict[str, Any], history: list[str]) -> None:
    """Both halves of the resume state; ``history``: the epochs' JSON entries (HistoryText.items)."""
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
    state = jsonable({**state, "param_groups": optim_state["param_groups"]})
    with atomic_write(out / STATE_TENSORS) as tmp:
        # the state rides in the header too: a kill -9 between the renames of the two halves still resumes
        save_file(tensors, str(tmp), metadata={"glorocert_train_state": STATE_FORMAT,
                                               "state": _with_history(json.dumps(state), history)})
        state["tensors_sha256"] = sha256_of(tmp)
    write_text(out / STATE_JSON, _with_history(json.dumps(state, indent=1), history))


def _with_history(text: str, history: list[str]) -> str:
    """A JSON object's text with the key ``history`` added last, its entries already serialised."""
    return f'{text.rstrip()[:-1].rstrip()}, "history": [{", ".join(history)}]}}'


def _read_state(out: Path) -> dict[str, Any]:
    """The JSON half of the resume state, checked against the tensors' hash; where the two halves differ (a
    kill -9 between their renames), the state the tensors carry in their header."""
    json_path, tensor_path = out / STATE_JSON, out / STATE_TENSORS
    if not tensor_path.exists() or not json_path.exists() and _embedded_state(tensor_path) is None:
        raise GlorocertError(f"nothing to resume in {out}: {STATE_JSON} / {STATE_TENSORS} not found")
    problem = f"{tensor_path} does not match {json_path} (interrupted write?); cannot resume"
    try:
        state = json.loads(json_path.read_text(encoding="utf-8")) if json_path.exists() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        state, problem = {}, f"{json_path} is corrupt ({exc}); cannot resume"
    if isinstance(state, dict) and state.get("tensors_sha256") == sha256_of(tensor_path):
        return state
    embedded = _embedded_state(tensor_path)
    if embedded is None:
        raise GlorocertError(problem)
    return embedded


def _embedded_state(tensor_path: Path) -> dict[str, Any] | None:
    """The state a tensors file carries in its header (None: none, or not readable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(tensor_path), "pt") as f:
            return json.loads((f.metadata() or {})["state"])
    except Exception:  # noqa: BLE001 — an older, damaged or foreign file: no state to fall back on
        return None


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
