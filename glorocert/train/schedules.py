"""Named schedules for the training ε, the TRADES λ and the learning rate.

A schedule maps training *progress* ``t`` in ``[0, 1]`` (fraction of the
optimisation steps done, counted after the step) to a value. Names are
matched exactly against a closed list — never by prefix, so one schedule can
never silently become another (a defect of the reference trainer) — and an
unknown name is refused with the list of valid ones.

ε and λ schedules ramp *towards* a target value:

``fixed``             the target from the first step
``linear``            0 → target linearly over the whole run
``linear_half``       0 → target over the first half, then the target
``logarithmic``       0.01·target → target over the whole run, with the
                      reference's curve log((e^b − e^a)·t + e^a)
``logarithmic_half``  the same over the first half, then the target

learning-rate schedules go from ``lr`` to ``final_lr``:

``fixed``             ``lr`` throughout
``decay``             exponential decay ``lr → final_lr`` over the whole run
``decay_after_half``  ``lr`` for the first half, then exponential decay to
                      ``final_lr`` (the paper's "constant, then decay")
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from glorocert.errors import GlorocertError

RAMP_SCHEDULES = ("fixed", "linear", "linear_half", "logarithmic", "logarithmic_half")
LAMBDA_SCHEDULES = ("fixed", "linear", "linear_half")
LR_SCHEDULES = ("fixed", "decay", "decay_after_half")

_VALID = {"eps": RAMP_SCHEDULES, "lam": LAMBDA_SCHEDULES, "lr": LR_SCHEDULES}
_WHAT = {"eps": "epsilon", "lam": "TRADES lambda", "lr": "learning-rate"}


def _log_ramp(t: float, start: float, end: float) -> float:
    return math.log((math.exp(end) - math.exp(start)) * t + math.exp(start))


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule: ``kind`` is ``"eps"``, ``"lam"`` or ``"lr"``."""

    name: str
    kind: str

    def ramp(self, progress: float, target: float) -> float:
        """Value of an ε / λ schedule at ``progress`` for the final value ``target``."""
        if self.kind == "lr":
            raise GlorocertError("ramp() is for epsilon / lambda schedules; use lr() for learning rates")
        t = min(max(float(progress), 0.0), 1.0)
        if self.name.endswith("_half"):
            t = min(2.0 * t, 1.0)
        if self.name == "fixed":
            return float(target)
        if self.name in ("linear", "linear_half"):
            return t * target
        # logarithmic, logarithmic_half
        return _log_ramp(t, 0.01 * target, target)

    def lr(self, progress: float, lr: float, final_lr: float) -> float:
        """Learning rate at ``progress`` going from ``lr`` to ``final_lr``."""
        if self.kind != "lr":
            raise GlorocertError(f"lr() called on a {_WHAT[self.kind]} schedule")
        t = min(max(float(progress), 0.0), 1.0)
        if self.name == "fixed":
            return float(lr)
        if self.name == "decay_after_half":
            if t <= 0.5:
                return float(lr)
            t = (t - 0.5) / 0.5
        return float(lr) * (float(final_lr) / float(lr)) ** t


def parse_schedule(name: str, kind: str) -> Schedule:
    """Parse a schedule name for ``kind`` in {"eps", "lam", "lr"}; exact match only."""
    if kind not in _VALID:
        raise GlorocertError(f"unknown schedule kind {kind!r}; valid: {', '.join(_VALID)}")
    valid = _VALID[kind]
    if name not in valid:
        raise GlorocertError(
            f"unknown {_WHAT[kind]} schedule {name!r}; valid: {', '.join(valid)}"
        )
    return Schedule(name=name, kind=kind)
