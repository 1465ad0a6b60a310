"""Training objectives: what each method adds to the one epoch loop of :mod:`glorocert.train.loop`.

The loop owns shuffling, batching, the learning rate, Adam, checkpoints and
resume. An :class:`Objective` owns the rest:

* ``loss(model, x, y, step)`` — the loss of one batch at global step ``step``
  (1-based; the objective schedules its own ε and λ from it);
* ``end_epoch(model, x_val, y_val)`` — the held-out figures of an epoch: the
  :class:`~glorocert.train.records.EpochRecord` fields beyond epoch, loss, LR, seconds;
  ``skip_evaluation`` the same fields on an epoch the schedule does not evaluate (None for the figures);
* ``finish(model, x_val, y_val)`` — the final figures: the
  :class:`~glorocert.train.records.TrainResult` fields beyond model, spec, config, history, seconds;
* ``log_columns`` (``log.csv``), ``state_tensors`` / ``load_state_tensors``
  (what a checkpoint needs beyond the model and Adam), ``start_epoch`` and
  ``cpu_only``.

Three objectives: :class:`GloroObjective` (cross-entropy, GloRo, GloRo-TRADES
with the persistent power-iteration estimate of K), :class:`LocalObjective`
(BCP / KW bounds, :mod:`glorocert.train.local_losses`) and
:class:`SmoothingObjective` (Gaussian augmentation or MACER). None of them
draws from torch's global RNG: every random stream has its own seeded
generator, so a resumed run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from glorocert.train import local_losses, losses
from glorocert.train.config import TrainConfig
from glorocert.train.power import PowerIteration
from glorocert.train.schedules import parse_schedule

LOG_COLUMNS = (
    "epoch", "loss", "clean_acc", "vra", "bottom_rate", "train_eps", "lam", "lr",
    "seconds", "lipschitz_estimate",
)
# --method gaussian|macer: a smoothing base model has no VRA, ⊥ or Lipschitz columns.
SMOOTHING_LOG_COLUMNS = ("epoch", "loss", "noisy_acc", "clean_acc", "lr", "seconds")


class Objective:
    """The interface (and the defaults) of a training objective; see the module docstring."""

    log_columns: tuple[str, ...] = LOG_COLUMNS
    cpu_only = False

    def start_epoch(self, epoch: int) -> None:
        """Called before the first batch of each epoch."""

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        raise NotImplementedError

    def end_epoch(self, model: torch.nn.Module, x_val: torch.Tensor, y_val: torch.Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def finish(self, model: torch.nn.Module, x_val: torch.Tensor, y_val: torch.Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def skip_evaluation(self, model: torch.nn.Module, x_val: torch.Tensor, y_val: torch.Tensor) -> dict[str, Any]:
        """The record's fields on an epoch without evaluation: the held-out figures None, nothing computed."""
        return {"clean_acc": None, "vra": None, "bottom_rate": None, "train_eps": 0.0, "lam": 0.0,
                "lipschitz_estimate": None}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` returned (the checkpoint's tensors, all of them)."""


def objective_class(config: TrainConfig) -> type[Objective]:
    if config.smoothing is not None:
        return SmoothingObjective
    return LocalObjective if config.local else GloroObjective


def make_objective(config: TrainConfig, model: torch.nn.Module, spec: dict, steps_per_epoch: int) -> Objective:
    """The objective of ``config.method`` for ``model`` (refusing, before anything is written, a net it cannot train)."""
    return objective_class(config)(config, model, spec, steps_per_epoch)


# -- nets trained to be certified: GloRo, BCP, KW -----------------------------

class RobustObjective(Objective):
    """Shared by GloRo and the local methods: ε / λ schedules after a warm-up of plain
    cross-entropy, and the persistent power iteration (one ``power_iterations`` advance per step,
    run to convergence before every evaluation)."""

    ramps_lam = True
    # whether the loss reads the logits layer's norm estimate (BCP's last block does); GloRo's margin matrix reads
    # that layer's rows exactly instead, so its steps leave the layer out (PowerIteration.step_estimates)
    logits_layer_norm = True

    def __init__(self, config: TrainConfig, model: torch.nn.Module, spec: dict, steps_per_epoch: int):
        self.config, self.settings = config, config.robust
        device = next(model.parameters()).device
        self.power = PowerIteration(model, spec["input_shape"], seed=config.seed).to(device)
        self.eps_schedule = parse_schedule(self.settings.eps_schedule, "eps")
        self.lam_schedule = parse_schedule(self.settings.lam_schedule, "lam")
        self.total_steps = config.epochs * steps_per_epoch
        self.warmup_steps = self.settings.warmup_epochs * steps_per_epoch if self.settings.loss != "ce" else 0
        self.train_eps = self.lam = 0.0  # the values of the latest step, for the epoch's record

    def loss(self, model, x, y, step):
        s = self.settings
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        robust = s.loss != "ce" and step > self.warmup_steps
        self.train_eps = self.eps_schedule.ramp(progress, s.train_eps) if robust else 0.0
        self.lam = self.lam_schedule.ramp(progress, s.lam) if robust and self.ramps_lam else 0.0
        if robust:
            estimates = self.power.step_estimates(s.power_iterations, logits_layer=self.logits_layer_norm)
        elif s.loss != "ce":  # warm-up; plain CE never reads the iterates (they are converged from where they are to evaluate)
            self.power.step(s.power_iterations)
        logits = model(x)
        if not robust:
            return losses.cross_entropy(logits, y)
        return self.robust_loss(logits, x, y, estimates)

    def robust_loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, estimates: torch.Tensor) -> torch.Tensor:
        """The loss of a step after the warm-up; ``estimates``: the layers' differentiable norm estimates
        (:meth:`~glorocert.train.power.PowerIteration.step_estimates`), the logits layer's only if
        ``logits_layer_norm``."""
        raise NotImplementedError

    def metrics(self, model, margin: torch.Tensor, x_val, y_val, final: bool) -> dict[str, float]:
        """Held-out clean accuracy, VRA and ⊥ (uncertified) rate at the test ε: estimates."""
        raise NotImplementedError

    def _converged_margin(self) -> torch.Tensor:
        self.power.converge(self.settings.converge_tol, self.settings.converge_max_iterations)
        with torch.no_grad():
            return self.power.margin_lipschitz().detach()

    def end_epoch(self, model, x_val, y_val):
        metrics = self.metrics(model, self._converged_margin(), x_val, y_val, final=False)
        return {**metrics, "train_eps": self.train_eps, "lam": self.lam,
                "lipschitz_estimate": self.power.lipschitz_estimate()}

    def skip_evaluation(self, model, x_val, y_val):
        return {**super().skip_evaluation(model, x_val, y_val), "train_eps": self.train_eps, "lam": self.lam}

    def finish(self, model, x_val, y_val):
        margin = self._converged_margin()
        model.eval()
        metrics = self.metrics(model, margin, x_val, y_val, final=True)
        return {"clean_acc": metrics["clean_acc"], "vra_estimate": metrics["vra"],
                "margin_lipschitz_estimate": margin.cpu().double().numpy(),
                "lipschitz_estimate": self.power.lipschitz_estimate(), "power": self.power}

    def state_tensors(self):
        return {f"power.{name}": tensor for name, tensor in self.power.iterate_state().items()}

    def load_state_tensors(self, tensors):
        self.power.load_iterate_state({k[6:]: v for k, v in tensors.items() if k.startswith("power.")})


class GloroObjective(RobustObjective):
    """GloRo cross-entropy, GloRo-TRADES or EMMA (``loss="ce"``: plain cross-entropy throughout), with the
    power-iteration estimate of the margin matrix K; VRA by the GloRo rule with the converged estimate."""

    logits_layer_norm = False  # the loss reads the margin matrix only

    def __init__(self, config, model, spec, steps_per_epoch):
        super().__init__(config, model, spec, steps_per_epoch)
        self.ramps_lam = self.settings.loss == "trades"

    def robust_loss(self, logits, x, y, estimates):
        s, margin = self.settings, self.power.margin_matrix(estimates)
        if s.loss == "gloro":
            return losses.gloro_cross_entropy(logits, y, margin, self.train_eps)
        if s.loss == "emma":
            return losses.emma(logits, y, margin, self.train_eps)
        return losses.gloro_trades(logits, y, margin, self.train_eps, self.lam)

    def metrics(self, model, margin, x_val, y_val, final):
        return evaluate(model, margin, x_val, y_val, self.settings.eps, self.config.eval_batch_size)


class LocalObjective(RobustObjective):
    """BCP or KW: (1 − κ)·CE + κ·CE of the worst-translated logits from the method's own bounds,
    computed on the live weights (ReLU nets, CPU only); VRA by those training-time bounds."""

    cpu_only = True

    def __init__(self, config, model, spec, steps_per_epoch):
        self.graph = local_losses.live_graph(model, spec["input_shape"])
        local_losses.check_supported(config.method, self.graph)
        super().__init__(config, model, spec, steps_per_epoch)

    def robust_loss(self, logits, x, y, estimates):
        lower = local_losses.lower_bounds(self.config.method, self.graph, self.power, x, y, self.train_eps, estimates)
        return local_losses.mixed_loss(logits, y, lower, self.lam)

    def metrics(self, model, margin, x_val, y_val, final):
        """Per epoch KW runs on its first KW_EVAL_SAMPLES held-out samples only; the final figures use them all."""
        if self.config.method == "kw" and not final:
            x_val, y_val = x_val[:local_losses.KW_EVAL_SAMPLES], y_val[:local_losses.KW_EVAL_SAMPLES]
        device = next(model.parameters()).device
        return local_losses.evaluate(self.config.method, self.graph, self.power, model, x_val.to(device),
                                     y_val.to(device), self.settings.eps, self.config.eval_batch_size)


# -- randomized-smoothing base models -----------------------------------------

class SmoothingObjective(Objective):
    """Gaussian noise augmentation (Cohen et al.) or MACER (Zhai et al.); no power iteration.
    The noise of epoch e comes from a generator seeded by (seed, e)."""

    log_columns = SMOOTHING_LOG_COLUMNS

    def __init__(self, config: TrainConfig, model: torch.nn.Module, spec: dict, steps_per_epoch: int):
        self.config, self.settings = config, config.smoothing
        self.device = next(model.parameters()).device
        self.noise: torch.Generator | None = None

    def start_epoch(self, epoch):
        # Smoothing noise of epoch e depends on (seed, e) only (resume-exact), and
        # its stream is independent of the shuffle's.
        self.noise = torch.Generator().manual_seed(int(self.config.seed) * 1_000_003 + int(epoch) + 500_000_003)

    def loss(self, model, x, y, step):
        s = self.settings
        if self.config.method == "gaussian":
            noisy = x + losses.gaussian_noise(x.shape, s.sigma, self.noise, self.device)
            return losses.cross_entropy(model(noisy), y)
        repeated = x.repeat_interleave(s.macer_k, dim=0)
        noisy = repeated + losses.gaussian_noise(repeated.shape, s.sigma, self.noise, self.device)
        logits = model(noisy).view(x.shape[0], s.macer_k, -1)
        return losses.macer_loss(logits, y, s.sigma, s.macer_beta, s.macer_gamma, s.macer_lam)

    def _noisy_metrics(self, model, x_val, y_val) -> dict[str, float]:
        return evaluate_noisy(model, x_val, y_val, self.settings.sigma, self.config.seed, self.config.eval_batch_size)

    def end_epoch(self, model, x_val, y_val):
        return {**self._noisy_metrics(model, x_val, y_val), "vra": None, "bottom_rate": None, "train_eps": 0.0,
                "lam": self.settings.macer_lam if self.config.method == "macer" else 0.0, "lipschitz_estimate": None}

    def finish(self, model, x_val, y_val):
        model.eval()
        return self._noisy_metrics(model, x_val, y_val)


# -- held-out evaluation -------------------------------------------------------

@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    margin_lipschitz: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Clean accuracy, VRA and ⊥ rate at ``eps`` (float64 comparison; ties count as ⊥).

    The VRA is sound only if ``margin_lipschitz`` is an upper bound.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    K = margin_lipschitz.detach().to(device=device, dtype=torch.float64)
    correct = certified_correct = bottoms = 0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        yb = y[start:start + batch_size].to(device)
        logits = model(xb).double()
        predicted, bottom = losses.certify_predictions(logits, K, eps)
        hit = predicted == yb
        correct += int(hit.sum())
        certified_correct += int((hit & ~bottom).sum())
        bottoms += int(bottom.sum())
    model.train(was_training)
    n = x.shape[0]
    return {"clean_acc": correct / n, "vra": certified_correct / n, "bottom_rate": bottoms / n}


@torch.no_grad()
def evaluate_noisy(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: float,
    seed: int,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Accuracy of a smoothing base model on ``x`` and on ``x + N(0, σ²I)`` (one draw per sample).

    The noise comes from its own generator seeded with ``seed``, so every
    evaluation sees the same noise and the training RNG is untouched. This is
    the base model's accuracy under noise, not a certificate.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + 999_983)
    correct = noisy_correct = 0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        yb = y[start:start + batch_size].to(device)
        correct += int((model(xb).argmax(dim=1) == yb).sum())
        noisy = xb + losses.gaussian_noise(xb.shape, sigma, generator, device)
        noisy_correct += int((model(noisy).argmax(dim=1) == yb).sum())
    model.train(was_training)
    n = x.shape[0]
    return {"clean_acc": correct / n, "noisy_acc": noisy_correct / n}
