"""The one training loop: Adam, the LR schedule, shuffling, per-epoch checkpoints, resume.

GloRo nets by default; ``method="bcp"|"kw"`` minimises the local certifiers'
objectives, and ``method="gaussian"|"macer"`` trains randomized-smoothing
base models — each an :class:`~glorocert.train.objectives.Objective` that the
same loop drives. :func:`train` does what the paper's scripts do, on tensors:

* every step: the objective's loss on the batch (GloRo: estimate the margin
  matrix ``K`` differentiably from each layer's power-iteration iterate, advance
  the iterates, and take the GloRo loss at the scheduled training ε and TRADES
  λ), Adam at the scheduled LR;
* every ``eval_every`` epochs and after the last: the objective's held-out
  figures (GloRo: iterates run to convergence, warm-started from the training
  iterates, clean accuracy and VRA at the *test* ε); on the other epochs none
  (the convergence and the held-out pass are most of what a GloRo epoch costs
  beyond a plain one);
* every epoch: a row of ``log.csv`` and a checkpoint that resumes bit for bit
  (:mod:`glorocert.train.state`);
* at the end: the glorocert checkpoint, ONNX and TorchScript exports, the
  frozen sound bound and the model card (:mod:`glorocert.train.outputs`).

:func:`run_training` loads the config's data first (what ``glorocert train`` calls).
VRA measured during training uses the power-iteration *estimate* and is
labelled as such; the card's headline VRA comes from the frozen sound bound.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from glorocert.errors import GlorocertError
from glorocert.loaders.runners import resolve_device
from glorocert.train import augment
from glorocert.train.cards import command_line
from glorocert.train.config import Provenance, TrainConfig
from glorocert.train.datasets import load_training_data
from glorocert.train.objectives import Objective, make_objective, objective_class
from glorocert.train.outputs import write_outputs
from glorocert.train.records import EpochRecord, TrainProgress, TrainResult, notify
from glorocert.train.schedules import parse_schedule
from glorocert.train.state import HistoryText, check_out_dir, end_epoch, open_run
from glorocert.zoo import RESIDUAL_ARCHITECTURES, build, validate_spec


def run_training(config: TrainConfig, progress: TrainProgress | Any | None = None) -> TrainResult:
    """Load ``config.data`` (a built-in name or a labelled file, ``config.data_limit`` training samples) and
    :func:`train` on it, recording the command that reproduces the run on its card."""
    if not config.data:
        raise GlorocertError("run_training needs config.data (a built-in dataset or a labelled file)")
    check_out_dir(Path(config.out_dir) if config.out_dir else None, config.resume)  # before the data is read
    notify(progress, "on_loading", config.data)
    data = load_training_data(config.data, limit=config.data_limit)
    for message in data.notes:  # how the file was read (its scaling, its labels)
        notify(progress, "on_message", message)
    provenance = Provenance(command=command_line(config), data_description=data.description)
    return train(config, data.x_train, data.y_train, data.x_val, data.y_val, progress=progress, provenance=provenance)


def train(
    config: TrainConfig,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    progress: TrainProgress | Any | None = None,
    provenance: Provenance | None = None,
) -> TrainResult:
    """Train a GloRo net (or, with ``loss="ce"``, a standard baseline; or another ``config.method``) on tensors.

    ``x_*`` are float32 N×C×H×W images in [0, 1] pixel space, ``y_*`` int64
    labels in ``[0, C)``; ``C = max label + 1`` over both sets (at least 2).
    With ``config.out_dir`` set, the run checkpoints every epoch, can be
    resumed (``config.resume``) to the same result as an uninterrupted run
    on CPU, and writes its outputs there at the end (see module docstring).

    Guarantee: none by itself — all metrics here use the power-iteration
    *estimate*. The frozen sound bound (``model.onnx.bound.json``) certifies.
    """
    x_train, y_train = _check_data(x_train, y_train, "training")
    x_val, y_val = _check_data(x_val, y_val, "validation")
    spec = _spec(config, x_train, y_train, x_val, y_val)
    device = _device(config, objective_class(config), progress)
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_rng = torch.get_rng_state()
    try:
        if config.deterministic:
            if device.type == "cuda":  # cuBLAS needs this for deterministic matmuls
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        run = _Run(config, spec, device, (x_train, y_train, x_val, y_val), progress)
        return run.fit(provenance or Provenance())
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_rng_state(previous_rng)  # training seeds torch's RNG; leave the caller's stream as it was


class _Run:
    """One training run: the model, Adam and the objective, driven epoch by epoch."""

    def __init__(self, config: TrainConfig, spec: dict, device: torch.device, data: tuple, progress: Any):
        self.config, self.spec, self.device, self.progress = config, spec, device, progress
        self.x_train, self.y_train, self.x_val, self.y_val = data
        self.steps_per_epoch = math.ceil(self.x_train.shape[0] / config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.lr_schedule = parse_schedule(config.lr_schedule, "lr")
        torch.manual_seed(config.seed)
        self.model = build(spec).to(device)
        self.objective: Objective = make_objective(config, self.model, spec, self.steps_per_epoch)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)

    def fit(self, provenance: Provenance) -> TrainResult:
        """Every remaining epoch (after those a resumed run already did), then the final figures and the outputs."""
        config, model = self.config, self.model
        out = Path(config.out_dir) if config.out_dir else None
        resumed = open_run(out, config, model, self.optimizer, self.objective)
        if config.resume:
            notify(self.progress, "on_message", f"resuming {out} after epoch {resumed.epochs_done}")
            notify(self.progress, "on_saved", out, resumed.epochs_done)
        history, seconds = resumed.history, resumed.seconds
        text = HistoryText(self.objective.log_columns)  # each epoch's row formatted once, not once per later epoch
        notify(self.progress, "on_start", config.epochs, self.steps_per_epoch, resumed.epochs_done)
        for epoch in range(resumed.epochs_done, config.epochs):
            record = self._epoch(epoch)
            history.append(record)
            seconds += record.seconds
            if out is not None:
                end_epoch(out, model, self.optimizer, self.objective, config, self.spec, history, seconds,
                          on_saved=lambda: notify(self.progress, "on_saved", out, len(history)), text=text)
            notify(self.progress, "on_epoch", record)
        result = TrainResult(model=model, spec=self.spec, config=config, history=history, seconds=seconds,
                             **self.objective.finish(model, self.x_val, self.y_val))
        if out is not None:
            write_outputs(result, out, self.x_val, self.y_val, provenance, self.progress)
        return result

    def _epoch(self, epoch: int) -> EpochRecord:
        config, model, optimizer = self.config, self.model, self.optimizer
        epoch_start = time.perf_counter()
        model.train()
        permutation = _epoch_permutation(config.seed, epoch, self.x_train.shape[0])
        shifts = augment.epoch_generator(config.seed, epoch) if config.augment_shift else None
        self.objective.start_epoch(epoch)
        loss_sum, seen, lr = 0.0, 0, 0.0
        for step in range(self.steps_per_epoch):
            index = permutation[step * config.batch_size:(step + 1) * config.batch_size]
            xb, yb = self.x_train[index].to(self.device), self.y_train[index].to(self.device)
            if shifts is not None:
                xb = augment.random_shift(xb, config.augment_shift, shifts)
            global_step = epoch * self.steps_per_epoch + step + 1
            lr = self.lr_schedule.lr(global_step / self.total_steps, config.lr, config.final_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = self.objective.loss(model, xb, yb, global_step)
            loss_sum += _optimise(loss, optimizer, epoch, step, self.progress) * len(index)
            seen += len(index)
        evaluate = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
        figures = (self.objective.end_epoch if evaluate else self.objective.skip_evaluation)(model, self.x_val, self.y_val)
        return EpochRecord(epoch=epoch + 1, loss=loss_sum / max(seen, 1), lr=lr,
                           seconds=time.perf_counter() - epoch_start, **figures)


def _epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    # One generator per epoch: the shuffle of epoch e depends on (seed, e) only,
    # so a resumed run sees exactly the batches of an uninterrupted one.
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=generator)


def _optimise(loss: torch.Tensor, optimizer, epoch: int, step: int, progress) -> float:
    """One optimiser step on ``loss`` (refusing a diverged loss); returns its value."""
    if not torch.isfinite(loss):
        raise GlorocertError(
            f"training diverged at epoch {epoch + 1}, step {step + 1} (loss {loss.item()}); "
            "try a smaller --lr"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    value = float(loss.detach())
    notify(progress, "on_step", epoch, step, value)
    return value


def _check_data(x: torch.Tensor, y: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.int64)
    if x.ndim != 4:
        raise GlorocertError(f"{what} images must be N×C×H×W, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        given, use = ("x_train", "training") if what == "training" else ("x_val", "held-out")
        raise GlorocertError(f"{what} set is empty: {given} holds 0 samples; training measures clean accuracy and VRA on a "
                             f"held-out set, so give at least one {use} sample")
    if y.shape != (x.shape[0],):
        raise GlorocertError(f"{what} labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if not torch.isfinite(x).all():
        raise GlorocertError(f"{what} images contain NaN or inf")
    return x.contiguous(), y.contiguous()


def _spec(config: TrainConfig, x_train, y_train, x_val, y_val) -> dict:
    """The architecture spec: the config's net for these images and classes."""
    if tuple(x_train.shape[1:]) != tuple(x_val.shape[1:]):
        raise GlorocertError(
            f"training images are {tuple(x_train.shape[1:])} but validation images are {tuple(x_val.shape[1:])}"
        )
    labels_min = min(int(y_train.min()), int(y_val.min()))
    num_classes = max(int(y_train.max()), int(y_val.max())) + 1
    if labels_min < 0 or num_classes < 2:
        raise GlorocertError(f"labels must be in [0, C) with C >= 2; got range [{labels_min}, {num_classes - 1}]")
    return validate_spec({
        "arch": config.arch,
        "activation": config.activation,
        "minmax_pairing": config.minmax_pairing,
        "input_shape": list(x_train.shape[1:]),
        "num_classes": num_classes,
        **({"depth": config.depth, "width": config.width} if config.arch in RESIDUAL_ARCHITECTURES else {}),
    })


def _device(config: TrainConfig, objective: type[Objective], progress: Any) -> torch.device:
    """``config.device`` (auto: CUDA when present), on the CPU with a note where CUDA is missing or the objective is CPU-only."""
    name, note = resolve_device(config.device)
    if note:
        notify(progress, "on_message", note)
    if objective.cpu_only and name != "cpu":
        notify(progress, "on_message", f"--method {config.method} trains on the CPU (its bound code is CPU-only)")
        name = "cpu"
    try:
        return torch.device(name)
    except RuntimeError:
        raise GlorocertError(f"unknown device {config.device!r}; use cpu, cuda, cuda:N or auto") from None
