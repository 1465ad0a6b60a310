"""What determines a training run: common settings plus one section per kind of method.

``TrainConfig`` holds what every method shares (architecture, optimiser, data,
seed) and exactly one section:

* :class:`RobustSettings` for ``method="gloro"|"bcp"|"kw"`` — nets trained to be
  certified: test / training ε and their schedules, the TRADES λ (gloro) or the
  mixing weight κ (bcp / kw), warm-up, persistent power iteration;
* :class:`SmoothingSettings` for ``method="gaussian"|"macer"`` — randomized-smoothing
  base models: the noise σ and MACER's k, β, γ, λ.

All three are frozen: a run's settings are fixed once validated. Where a run
came from (the command line, what the data split was) is :class:`Provenance`,
passed next to the config, never patched onto it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from glorocert.errors import GlorocertError
from glorocert.train import local_losses, losses
from glorocert.train.schedules import parse_schedule

# Default (ε schedule, λ/κ schedule) per method: the GloRo paper's scripts ramp λ over the run; BCP
# ramps ε and κ over the first part of training (Lee et al. 2020, §3.3); Wong & Kolter ramp ε over
# the first half and train on the robust loss alone (κ = 1 throughout).
METHOD_SCHEDULES = {"gloro": ("fixed", "linear"), "bcp": ("linear_half", "linear_half"), "kw": ("linear_half", "fixed")}

# Settings that may differ between an interrupted run and its --resume.
RESUME_FREE_FIELDS = ("resume", "out_dir", "device", "eval_batch_size")


@dataclass(frozen=True)
class RobustSettings:
    """Training for certification (gloro, bcp, kw). ``None`` schedules / ``train_eps`` take the method's defaults."""

    eps: float = 0.3                    # test ε (l2, [0,1] pixels): VRA is measured here
    train_eps: float | None = None      # ε the loss uses (default: eps); may exceed eps
    eps_schedule: str | None = None     # see glorocert.train.schedules; None: the method's default (METHOD_SCHEDULES)
    loss: str = "gloro"                 # ce | gloro | trades (method gloro only)
    lam: float = 1.0                    # final TRADES λ (gloro) or mixing weight κ of the robust loss (bcp / kw)
    lam_schedule: str | None = None     # None: the method's default
    warmup_epochs: int = 0              # epochs of plain CE before the robust loss starts
    power_iterations: int = 1           # power-iteration steps per training step
    converge_tol: float = 1e-6          # relative change at which the iterates count as converged
    converge_max_iterations: int = 10_000

    def resolved(self, method: str) -> RobustSettings:
        """These settings with the method's default schedules and ``train_eps`` filled in, validated."""
        default_eps, default_lam = METHOD_SCHEDULES[method]
        settings = dataclasses.replace(
            self, eps_schedule=self.eps_schedule or default_eps, lam_schedule=self.lam_schedule or default_lam,
            train_eps=self.eps if self.train_eps is None else self.train_eps,
        )
        losses.parse_loss(settings.loss)
        parse_schedule(settings.eps_schedule, "eps")
        parse_schedule(settings.lam_schedule, "lam")
        _refuse_failed([
            (settings.eps >= 0 and math.isfinite(settings.eps), f"eps must be >= 0, got {settings.eps}"),
            (settings.train_eps >= 0 and math.isfinite(settings.train_eps),
             f"train_eps must be >= 0, got {settings.train_eps}"),
            (settings.lam >= 0, f"lam must be >= 0, got {settings.lam}"),
            (settings.power_iterations >= 0, "power_iterations must be >= 0"),
            (settings.converge_tol > 0, "converge_tol must be > 0"),
        ])
        return settings


@dataclass(frozen=True)
class SmoothingSettings:
    """Randomized-smoothing base models (gaussian: Cohen et al.; macer: Zhai et al.)."""

    sigma: float = 0.25                 # noise std ([0,1] pixels)
    macer_k: int = 16                   # MACER: noisy copies per input
    macer_beta: float = 16.0            # MACER: inverse softmax temperature of the robustness term
    macer_gamma: float = 8.0            # MACER: hinge on ξ = Φ⁻¹(p_y) − Φ⁻¹(p_runner-up)
    macer_lam: float = 12.0             # MACER: weight λ of the robustness term

    def validated(self, method: str) -> SmoothingSettings:
        _refuse_failed([
            (math.isfinite(self.sigma) and self.sigma > 0, f"--sigma must be > 0 for method {method}, got {self.sigma}"),
            (self.macer_k >= 1, f"macer_k must be >= 1, got {self.macer_k}"),
            (math.isfinite(self.macer_beta) and self.macer_beta > 0, f"macer_beta must be > 0, got {self.macer_beta}"),
            (math.isfinite(self.macer_gamma) and self.macer_gamma > 0, f"macer_gamma must be > 0, got {self.macer_gamma}"),
            (math.isfinite(self.macer_lam) and self.macer_lam >= 0, f"macer_lam must be >= 0, got {self.macer_lam}"),
        ])
        return self


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (all JSON-serialisable).

    ``robust`` is the section of gloro / bcp / kw, ``smoothing`` that of
    gaussian / macer; the method's section defaults to its defaults, the other
    one must stay ``None``.
    """

    method: str = "gloro"               # gloro | bcp | kw (local bounds) | gaussian (Cohen et al.) | macer (Zhai et al.)
    robust: RobustSettings | None = None
    smoothing: SmoothingSettings | None = None
    arch: str = "2c2f"
    activation: str = "relu"
    minmax_pairing: str = "halves"
    depth: int = 4                      # residual architectures (liresnet): residual blocks
    width: int = 16                     # ... and their channels
    augment_shift: int = 0              # random translations of up to this many pixels (0: none)
    eval_every: int = 1                 # held-out evaluation (iterates converged) every N epochs and after the last
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    final_lr: float = 1e-6
    lr_schedule: str = "decay_after_half"
    seed: int = 0
    deterministic: bool = True
    data: str = ""                      # data spec (e.g. "mnist-5k"), recorded for the card
    data_limit: int | None = None       # training samples kept (None: all), recorded likewise
    device: str = "cpu"
    eval_batch_size: int = 1000
    out_dir: str | None = None
    resume: bool = False

    @property
    def local(self) -> bool:
        """True for the local-bound training objectives (method bcp or kw)."""
        return self.method in local_losses.METHODS

    def __post_init__(self) -> None:
        losses.parse_method(self.method)
        smoothing = self.method in losses.SMOOTHING_METHODS
        wrong = self.robust if smoothing else self.smoothing
        if wrong is not None:
            raise GlorocertError(f"method {self.method} takes {'smoothing' if smoothing else 'robust'} settings, "
                                 f"not {type(wrong).__name__}")
        if smoothing:  # frozen: the normalised section is set once, here
            object.__setattr__(self, "smoothing", (self.smoothing or SmoothingSettings()).validated(self.method))
        else:
            object.__setattr__(self, "robust", (self.robust or RobustSettings()).resolved(self.method))
        parse_schedule(self.lr_schedule, "lr")
        _refuse_failed([
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and self.final_lr > 0, "lr and final_lr must be > 0"),
            (self.augment_shift >= 0, f"augment_shift must be >= 0, got {self.augment_shift}"),
            (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
            *([] if smoothing else self._robust_checks()),
        ])

    def _robust_checks(self) -> list[tuple[bool, str]]:
        r = self.robust
        checks = [(0 <= r.warmup_epochs < self.epochs or r.loss == "ce",
                   f"warmup_epochs must be in [0, epochs), got {r.warmup_epochs}")]
        if self.local:
            checks += [
                (self.activation == "relu",
                 f"--method {self.method} trains ReLU networks (its bounds need a monotone "
                 f"activation), got --activation {self.activation}; use --activation relu"),
                (r.lam <= 1, f"--lam is the mixing weight κ in [0, 1] for --method {self.method}, got {r.lam}"),
                (r.loss == "gloro", f"--loss {r.loss} is for --method gloro; --method {self.method} "
                                    "minimises its own robust loss (mix it with CE through --lam)"),
            ]
        return checks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_dict` (TypeError for a dict of another shape)."""
        values = dict(values)
        for name, section in (("robust", RobustSettings), ("smoothing", SmoothingSettings)):
            if values.get(name) is not None:
                values[name] = section(**values[name])
        return cls(**values)

    def settings(self) -> dict[str, Any]:
        """The settings that determine the trained weights, by name (the run-only ones left out)."""
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                flat.update(dataclasses.asdict(value))
            elif f.name not in RESUME_FREE_FIELDS and f.name not in ("robust", "smoothing"):
                flat[f.name] = value
        return flat

    def check_resumable(self, saved: TrainConfig) -> None:
        """Refuse to resume ``saved``'s run with settings that differ from these."""
        before, now = saved.settings(), self.settings()
        differing = [name for name in {**before, **now} if before.get(name) != now.get(name)]
        if differing:
            raise GlorocertError("cannot resume with different settings: " + ", ".join(
                f"{name} (was {before.get(name)!r}, now {now.get(name)!r})" for name in differing
            ))


@dataclass(frozen=True)
class Provenance:
    """Where a run came from, for its model card (not a setting: it does not change the weights)."""

    command: str = ""                   # the command line that reproduces the run ("" → reconstructed, marked so)
    data_description: str = ""          # what the card says about the data and the split


def _refuse_failed(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise GlorocertError(message)
