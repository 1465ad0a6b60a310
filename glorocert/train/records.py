"""What a training run reports: one record per epoch, the final result, and progress callbacks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glorocert.train.config import TrainConfig
from glorocert.train.power import PowerIteration


@dataclass
class EpochRecord:
    """One row of ``log.csv``. ``clean_acc`` / ``vra`` are on the held-out split;
    ``vra`` uses the converged power-iteration *estimate* of K (bcp / kw: the
    method's own training-time bounds, see :mod:`glorocert.train.objectives`).
    Smoothing base models (method gaussian / macer) have ``noisy_acc``
    (held-out accuracy on x + N(0, σ²I)) and no VRA, ⊥ rate or Lipschitz
    estimate (None)."""

    epoch: int
    loss: float
    clean_acc: float | None              # None on an epoch the --eval-every schedule skips (and vra, bottom_rate)
    vra: float | None
    bottom_rate: float | None
    train_eps: float
    lam: float
    lr: float
    seconds: float
    lipschitz_estimate: float | None
    noisy_acc: float | None = None


@dataclass
class TrainResult:
    """What :func:`glorocert.train.train` returns."""

    model: torch.nn.Module
    spec: dict[str, Any]
    config: TrainConfig
    history: list[EpochRecord]
    clean_acc: float                       # held-out, final weights
    seconds: float                         # training time (all sessions, evaluation included)
    vra_estimate: float | None = None      # held-out, K from converged power iteration (None: smoothing)
    margin_lipschitz_estimate: np.ndarray | None = None  # C×C, estimate (None: smoothing)
    lipschitz_estimate: float | None = None
    power: PowerIteration | None = None    # the persistent iterates (None: smoothing)
    noisy_acc: float | None = None         # smoothing base models: held-out accuracy on x + N(0, σ²I)
    vra_sound: float | None = None         # held-out, K from the frozen sound bound
    bound_global_upper: float | None = None
    bound_error: str | None = None         # why the frozen bound could not be produced
    vra_local_sound: float | None = None   # bcp / kw: held-out VRA by that certifier with guaranteed bounds
    files: dict[str, str] = field(default_factory=dict)


class TrainProgress:
    """Callbacks for progress display; override any of them (all optional)."""

    def on_loading(self, data: str) -> None: ...

    def on_start(self, epochs: int, steps_per_epoch: int, start_epoch: int) -> None: ...

    def on_step(self, epoch: int, step: int, loss: float) -> None: ...

    def on_epoch(self, record: EpochRecord) -> None: ...

    def on_message(self, message: str) -> None: ...

    def on_saved(self, out: Path, epochs_done: int) -> None:
        """The resume state in ``out`` holds ``epochs_done`` epochs (said just before it is put in place, which no
        SIGINT or SIGTERM interrupts; also said when a run resumes)."""

    def on_publishing(self, published: list[Path]) -> None:
        """The results are about to be put in place, together: ``published`` lists those that are."""


def notify(progress: Any, name: str, *args: Any) -> None:
    """Call ``progress.<name>(*args)`` when ``progress`` has it (any object will do, or None)."""
    method: Callable | None = getattr(progress, name, None) if progress is not None else None
    if method is not None:
        method(*args)
