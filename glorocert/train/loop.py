"""The training loop: Adam, schedules, persistent power iteration, checkpoints, resume.

GloRo nets by default; ``method="bcp"|"kw"`` minimises the local certifiers'
objectives instead (:mod:`glorocert.train.local_losses`) in the same loop, and
``method="gaussian"|"macer"`` trains randomized-smoothing base models.

One call, :func:`train`, does what the paper's scripts do, on tensors:

* every step: advance each layer's power-iteration iterate (``power_iterations``
  steps, default 1), estimate the margin matrix ``K`` from them
  (differentiably in the weights), and minimise the GloRo loss at the
  scheduled training ε (and TRADES λ), with Adam at the scheduled LR;
* every epoch: run the iterates to convergence, measure clean accuracy and
  VRA at the *test* ε on the held-out split, append a row to ``log.csv``,
  and checkpoint everything needed to resume bit-for-bit (model, Adam
  state, iterates, RNG state: safetensors + JSON, no pickle);
* at the end: the glorocert checkpoint, ONNX and TorchScript exports, the
  frozen bound (by :mod:`glorocert.api` when available) and a model card.

VRA measured here with the power-iteration *estimate* is labelled as such;
the card's headline VRA comes from the frozen sound bound when it exists.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from glorocert.errors import GlorocertError
from glorocert.train import local_losses, losses
from glorocert.zoo import build, validate_spec
from glorocert.train.power import PowerIteration
from glorocert.train.schedules import parse_schedule

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
LOG_COLUMNS = (
    "epoch", "loss", "clean_acc", "vra", "bottom_rate", "train_eps", "lam", "lr",
    "seconds", "lipschitz_estimate",
)
# --method gaussian|macer: a smoothing base model has no VRA, ⊥ or Lipschitz columns.
SMOOTHING_LOG_COLUMNS = ("epoch", "loss", "noisy_acc", "clean_acc", "lr", "seconds")

# Default (ε schedule, λ/κ schedule) per method: the GloRo paper's scripts ramp λ over the run; BCP
# ramps ε and κ over the first part of training (Lee et al. 2020, §3.3); Wong & Kolter ramp ε over
# the first half and train on the robust loss alone (κ = 1 throughout).
METHOD_SCHEDULES = {"gloro": ("fixed", "linear"), "bcp": ("linear_half", "linear_half"), "kw": ("linear_half", "fixed")}

# Fields that may differ between an interrupted run and its --resume.
_RESUME_FREE_FIELDS = {"resume", "out_dir", "command", "data_description", "device", "eval_batch_size"}


@dataclass
class TrainConfig:
    """Everything that determines a training run (all JSON-serialisable)."""

    arch: str = "2c2f"
    activation: str = "relu"
    minmax_pairing: str = "halves"
    method: str = "gloro"               # gloro | bcp | kw (local bounds) | gaussian (Cohen et al.) | macer (Zhai et al.)
    loss: str = "gloro"                 # ce | gloro | trades (method gloro only)
    eps: float = 0.3                    # test ε (l2, [0,1] pixels): VRA is measured here
    train_eps: float | None = None      # ε the loss uses (default: eps); may exceed eps
    eps_schedule: str | None = None     # see glorocert.train.schedules; None: the method's default (METHOD_SCHEDULES)
    lam: float = 1.0                    # final TRADES λ (gloro) or mixing weight κ of the robust loss (bcp / kw)
    lam_schedule: str | None = None     # None: the method's default
    epochs: int = 10
    warmup_epochs: int = 0              # epochs of plain CE before the GloRo loss starts
    batch_size: int = 256
    lr: float = 1e-3
    final_lr: float = 1e-6
    lr_schedule: str = "decay_after_half"
    seed: int = 0
    power_iterations: int = 1           # power-iteration steps per training step
    converge_tol: float = 1e-6          # relative change at which the iterates count as converged
    converge_max_iterations: int = 10_000
    deterministic: bool = True
    device: str = "cpu"
    eval_batch_size: int = 1000
    out_dir: str | None = None
    resume: bool = False
    data: str = ""                      # data spec (e.g. "mnist-5k"), recorded for the card / finalize
    data_limit: int | None = None       # training samples kept (None: all), recorded likewise
    data_description: str = ""          # what the card says about the data and the split
    command: str = ""                   # exact command line, for the card
    sigma: float = 0.25                 # smoothing noise std ([0,1] pixels), methods gaussian / macer
    macer_k: int = 16                   # MACER: noisy copies per input
    macer_beta: float = 16.0            # MACER: inverse softmax temperature of the robustness term
    macer_gamma: float = 8.0            # MACER: hinge on ξ = Φ⁻¹(p_y) − Φ⁻¹(p_runner-up)
    macer_lam: float = 12.0             # MACER: weight λ of the robustness term

    @property
    def smoothing(self) -> bool:
        """True for randomized-smoothing base models (method gaussian or macer)."""
        return self.method in losses.SMOOTHING_METHODS

    @property
    def local(self) -> bool:
        """True for the local-bound training objectives (method bcp or kw)."""
        return self.method in local_losses.METHODS

    def __post_init__(self) -> None:
        losses.parse_method(self.method)
        defaults = METHOD_SCHEDULES.get(self.method, METHOD_SCHEDULES["gloro"])
        self.eps_schedule = self.eps_schedule or defaults[0]
        self.lam_schedule = self.lam_schedule or defaults[1]
        losses.parse_loss(self.loss)
        parse_schedule(self.eps_schedule, "eps")
        parse_schedule(self.lam_schedule, "lam")
        parse_schedule(self.lr_schedule, "lr")
        if self.train_eps is None:
            self.train_eps = self.eps
        checks = [
            (self.eps >= 0 and math.isfinite(self.eps), f"eps must be >= 0, got {self.eps}"),
            (self.train_eps >= 0 and math.isfinite(self.train_eps), f"train_eps must be >= 0, got {self.train_eps}"),
            (self.lam >= 0, f"lam must be >= 0, got {self.lam}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (0 <= self.warmup_epochs < self.epochs or self.loss == "ce",
             f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and self.final_lr > 0, "lr and final_lr must be > 0"),
            (self.power_iterations >= 0, "power_iterations must be >= 0"),
            (self.converge_tol > 0, "converge_tol must be > 0"),
        ]
        if self.local:
            checks.append((self.activation == "relu",
                           f"--method {self.method} trains ReLU networks (its bounds need a monotone "
                           f"activation), got --activation {self.activation}; use --activation relu"))
            checks.append((self.lam <= 1, f"--lam is the mixing weight κ in [0, 1] for --method {self.method}, got {self.lam}"))
            checks.append((self.loss == "gloro", f"--loss {self.loss} is for --method gloro; --method {self.method} "
                                                 "minimises its own robust loss (mix it with CE through --lam)"))
        if self.smoothing:
            checks += [
                (math.isfinite(self.sigma) and self.sigma > 0,
                 f"--sigma must be > 0 for method {self.method}, got {self.sigma}"),
                (self.macer_k >= 1, f"macer_k must be >= 1, got {self.macer_k}"),
                (math.isfinite(self.macer_beta) and self.macer_beta > 0, f"macer_beta must be > 0, got {self.macer_beta}"),
                (math.isfinite(self.macer_gamma) and self.macer_gamma > 0, f"macer_gamma must be > 0, got {self.macer_gamma}"),
                (math.isfinite(self.macer_lam) and self.macer_lam >= 0, f"macer_lam must be >= 0, got {self.macer_lam}"),
            ]
        for ok, message in checks:
            if not ok:
                raise GlorocertError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EpochRecord:
    """One row of ``log.csv``. ``clean_acc`` / ``vra`` are on the held-out split;
    ``vra`` uses the converged power-iteration *estimate* of K (bcp / kw: the
    method's own training-time bounds, see ``_metrics``). Smoothing base
    models (method gaussian / macer) have ``noisy_acc`` (held-out accuracy on
    x + N(0, σ²I)) and no VRA, ⊥ rate or Lipschitz estimate (None)."""

    epoch: int
    loss: float
    clean_acc: float
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
    """What :func:`train` returns."""

    model: torch.nn.Module
    spec: dict[str, Any]
    config: TrainConfig
    history: list[EpochRecord]
    clean_acc: float                       # held-out, final weights
    vra_estimate: float | None             # held-out, K from converged power iteration (None: smoothing)
    margin_lipschitz_estimate: np.ndarray | None  # C×C, estimate (None: smoothing)
    lipschitz_estimate: float | None
    seconds: float                         # training time (all sessions, evaluation included)
    power: PowerIteration
    vra_sound: float | None = None         # held-out, K from the frozen sound bound
    bound_global_upper: float | None = None
    files: dict[str, str] = field(default_factory=dict)
    bound_error: str | None = None         # why the frozen bound could not be produced
    noisy_acc: float | None = None         # smoothing base models: held-out accuracy on x + N(0, σ²I)
    vra_local_sound: float | None = None   # bcp / kw: held-out VRA by that certifier with guaranteed bounds


class TrainProgress:
    """Callbacks for progress display; override any of them (all optional)."""

    def on_start(self, epochs: int, steps_per_epoch: int, start_epoch: int) -> None: ...

    def on_step(self, epoch: int, step: int, loss: float) -> None: ...

    def on_epoch(self, record: EpochRecord) -> None: ...

    def on_message(self, message: str) -> None: ...


def _call(progress: Any, name: str, *args: Any) -> None:
    method: Callable | None = getattr(progress, name, None) if progress is not None else None
    if method is not None:
        method(*args)


# -- data --------------------------------------------------------------------

def _check_data(x: torch.Tensor, y: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.int64)
    if x.ndim != 4:
        raise GlorocertError(f"{what} images must be N×C×H×W, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise GlorocertError(f"{what} set is empty")
    if y.shape != (x.shape[0],):
        raise GlorocertError(f"{what} labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if not torch.isfinite(x).all():
        raise GlorocertError(f"{what} images contain NaN or inf")
    return x.contiguous(), y.contiguous()


# -- evaluation --------------------------------------------------------------

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


# -- checkpoints (no pickle) -------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def _save_state(out: Path, model, optimizer, power, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensors[f"model.{name}"] = tensor.detach().cpu().contiguous()
    optim_state = optimizer.state_dict()
    for param_id, entries in optim_state["state"].items():
        for key, value in entries.items():
            tensors[f"optim.{param_id}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    for name, tensor in power.iterate_state().items():
        tensors[f"power.{name}"] = tensor.cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    tmp = out / (STATE_TENSORS + ".tmp")
    save_file(tensors, str(tmp), metadata={"glorocert_train_state": "1"})
    os.replace(tmp, out / STATE_TENSORS)
    state = dict(state)
    state["param_groups"] = _jsonable(optim_state["param_groups"])
    state["tensors_sha256"] = _sha256(out / STATE_TENSORS)
    _atomic_write_text(out / STATE_JSON, json.dumps(state, indent=1))


def _load_state(out: Path, model, optimizer, power) -> dict[str, Any]:
    from safetensors.torch import load_file

    json_path, tensor_path = out / STATE_JSON, out / STATE_TENSORS
    if not json_path.exists() or not tensor_path.exists():
        raise GlorocertError(f"nothing to resume in {out}: {STATE_JSON} / {STATE_TENSORS} not found")
    try:
        state = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GlorocertError(f"{json_path} is corrupt ({exc}); cannot resume") from None
    if state.get("tensors_sha256") != _sha256(tensor_path):
        raise GlorocertError(f"{tensor_path} does not match {json_path} (interrupted write?); cannot resume")
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
    power.load_iterate_state({k[6:]: v for k, v in tensors.items() if k.startswith("power.")})
    torch.set_rng_state(tensors["rng.torch"])
    return state


def _end_epoch(out: Path, model, optimizer, power, config, spec, history, seconds: float,
               columns: tuple[str, ...] = LOG_COLUMNS) -> None:
    """After each epoch: the log so far, and everything --resume needs to continue from here."""
    _write_log(out / "log.csv", history, columns)
    _save_state(out, model, optimizer, power, {
        "format": "1",
        "epochs_done": len(history),
        "seconds": seconds,
        "config": config.to_dict(),
        "spec": spec,
        "history": [dataclasses.asdict(r) for r in history],
    })


def _write_log(path: Path, history: list[EpochRecord], columns: tuple[str, ...] = LOG_COLUMNS) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for record in history:
        row = dataclasses.asdict(record)
        writer.writerow([
            "" if row[c] is None else row[c] if isinstance(row[c], int) else f"{row[c]:.6g}" for c in columns
        ])
    _atomic_write_text(path, buffer.getvalue())


# -- the loop ----------------------------------------------------------------

def _epoch_noise_generator(seed: int, epoch: int) -> torch.Generator:
    # Smoothing noise of epoch e depends on (seed, e) only (resume-exact), and
    # its stream is independent of the shuffle's.
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) + 500_000_003)


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
    _call(progress, "on_step", epoch, step, value)
    return value


def train(
    config: TrainConfig,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    progress: TrainProgress | Any | None = None,
) -> TrainResult:
    """Train a GloRo net (or, with ``loss="ce"``, a standard baseline) on tensors.

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
    if tuple(x_train.shape[1:]) != tuple(x_val.shape[1:]):
        raise GlorocertError(
            f"training images are {tuple(x_train.shape[1:])} but validation images are {tuple(x_val.shape[1:])}"
        )
    labels_min = min(int(y_train.min()), int(y_val.min()))
    num_classes = max(int(y_train.max()), int(y_val.max())) + 1
    if labels_min < 0 or num_classes < 2:
        raise GlorocertError(f"labels must be in [0, C) with C >= 2; got range [{labels_min}, {num_classes - 1}]")

    spec = validate_spec({
        "arch": config.arch,
        "activation": config.activation,
        "minmax_pairing": config.minmax_pairing,
        "input_shape": list(x_train.shape[1:]),
        "num_classes": num_classes,
    })
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(config.device)
        except RuntimeError:
            raise GlorocertError(f"unknown device {config.device!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        _call(progress, "on_message", "CUDA is not available here; training on the CPU instead")
        device = torch.device("cpu")
    if config.local and device.type != "cpu":
        _call(progress, "on_message", f"--method {config.method} trains on the CPU (its bound code is CPU-only)")
        device = torch.device("cpu")

    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_rng = torch.get_rng_state()
    try:
        if config.deterministic:
            if device.type == "cuda":  # cuBLAS needs this for deterministic matmuls
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        return _train(config, spec, device, x_train, y_train, x_val, y_val, progress)
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_rng_state(previous_rng)  # training seeds torch's RNG; leave the caller's stream as it was


def _train(config, spec, device, x_train, y_train, x_val, y_val, progress) -> TrainResult:
    torch.manual_seed(config.seed)
    model = build(spec).to(device)
    graph = local_losses.live_graph(model, spec["input_shape"]) if config.local else None
    if graph is not None:
        local_losses.check_supported(config.method, graph)
    power = PowerIteration(model, spec["input_shape"], seed=config.seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    eps_schedule = parse_schedule(config.eps_schedule, "eps")
    lam_schedule = parse_schedule(config.lam_schedule, "lam")
    lr_schedule = parse_schedule(config.lr_schedule, "lr")

    out = Path(config.out_dir) if config.out_dir else None
    history: list[EpochRecord] = []
    start_epoch, seconds_before = 0, 0.0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if config.resume:
            state = _load_state(out, model, optimizer, power)
            try:
                saved = TrainConfig(**state["config"])
            except TypeError as exc:
                raise GlorocertError(f"{out / STATE_JSON} was written by another glorocert version ({exc}); cannot resume") from None
            differing = [
                f.name for f in dataclasses.fields(TrainConfig)
                if f.name not in _RESUME_FREE_FIELDS
                and getattr(saved, f.name) != getattr(config, f.name)
            ]
            if differing:
                raise GlorocertError(
                    "cannot resume with different settings: " + ", ".join(
                        f"{name} (was {getattr(saved, name)!r}, now {getattr(config, name)!r})"
                        for name in differing
                    )
                )
            start_epoch = int(state["epochs_done"])
            seconds_before = float(state["seconds"])
            history = [EpochRecord(**row) for row in state["history"]]
            _call(progress, "on_message", f"resuming {out} after epoch {start_epoch}")
        elif (out / STATE_JSON).exists():
            raise GlorocertError(
                f"{out} already holds a training run; pass --resume to continue it or choose another --out"
            )
        elif (out / "model.safetensors").exists():
            raise GlorocertError(f"{out} already holds a trained model; choose another --out (or delete it first)")
    elif config.resume:
        raise GlorocertError("resume needs an output directory")

    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = config.warmup_epochs * steps_per_epoch if config.loss != "ce" else 0
    if config.smoothing:
        return _train_smoothing(config, spec, device, model, power, optimizer, lr_schedule, out, history,
                                start_epoch, seconds_before, x_train, y_train, x_val, y_val, progress)
    _call(progress, "on_start", config.epochs, steps_per_epoch, start_epoch)

    train_eps = lam = lr = 0.0
    for epoch in range(start_epoch, config.epochs):
        epoch_start = time.perf_counter()
        model.train()
        permutation = _epoch_permutation(config.seed, epoch, n)
        loss_sum, seen = 0.0, 0
        for step in range(steps_per_epoch):
            index = permutation[step * config.batch_size:(step + 1) * config.batch_size]
            xb, yb = x_train[index].to(device), y_train[index].to(device)
            global_step = epoch * steps_per_epoch + step + 1
            lr = lr_schedule.lr(global_step / total_steps, config.lr, config.final_lr)
            robust_progress = (global_step - warmup_steps) / max(total_steps - warmup_steps, 1)
            robust = config.loss != "ce" and global_step > warmup_steps
            train_eps = eps_schedule.ramp(robust_progress, config.train_eps) if robust else 0.0
            ramps_lam = config.loss == "trades" or config.local
            lam = lam_schedule.ramp(robust_progress, config.lam) if robust and ramps_lam else 0.0
            for group in optimizer.param_groups:
                group["lr"] = lr

            power.step(config.power_iterations)
            logits = model(xb)
            if not robust:
                loss = losses.cross_entropy(logits, yb)
            elif config.local:
                lower = local_losses.lower_bounds(config.method, graph, power, xb, yb, train_eps)
                loss = local_losses.mixed_loss(logits, yb, lower, lam)
            elif config.loss == "gloro":
                loss = losses.gloro_cross_entropy(logits, yb, power.margin_lipschitz(), train_eps)
            else:
                loss = losses.gloro_trades(logits, yb, power.margin_lipschitz(), train_eps, lam)
            loss_sum += _optimise(loss, optimizer, epoch, step, progress) * len(index)
            seen += len(index)

        power.converge(config.converge_tol, config.converge_max_iterations)
        with torch.no_grad():
            margin = power.margin_lipschitz()
        metrics = _metrics(config, model, power, graph, margin, x_val, y_val)
        record = EpochRecord(
            epoch=epoch + 1,
            loss=loss_sum / max(seen, 1),
            clean_acc=metrics["clean_acc"],
            vra=metrics["vra"],
            bottom_rate=metrics["bottom_rate"],
            train_eps=train_eps,
            lam=lam,
            lr=lr,
            seconds=time.perf_counter() - epoch_start,
            lipschitz_estimate=power.lipschitz_estimate(),
        )
        history.append(record)
        seconds_before += record.seconds
        if out is not None:
            _end_epoch(out, model, optimizer, power, config, spec, history, seconds_before)
        _call(progress, "on_epoch", record)

    power.converge(config.converge_tol, config.converge_max_iterations)
    model.eval()
    with torch.no_grad():
        margin = power.margin_lipschitz().detach()
    metrics = _metrics(config, model, power, graph, margin, x_val, y_val, final=True)
    result = TrainResult(
        model=model,
        spec=spec,
        config=config,
        history=history,
        clean_acc=metrics["clean_acc"],
        vra_estimate=metrics["vra"],
        margin_lipschitz_estimate=margin.cpu().double().numpy(),
        lipschitz_estimate=power.lipschitz_estimate(),
        seconds=seconds_before,
        power=power,
    )
    if out is not None:
        from glorocert.train.outputs import write_outputs

        write_outputs(result, out, x_val, y_val, progress)
    return result


def _metrics(config, model, power, graph, margin, x_val, y_val, final: bool = False) -> dict[str, float]:
    """Held-out clean accuracy and VRA at the test ε: by the GloRo rule with the converged estimate of K,
    or (bcp / kw) by the method's own training-time bounds — per epoch, KW on its first KW_EVAL_SAMPLES
    samples only; the final figures always use the whole split."""
    if not config.local:
        return evaluate(model, margin, x_val, y_val, config.eps, config.eval_batch_size)
    if config.method == "kw" and not final:
        x_val, y_val = x_val[:local_losses.KW_EVAL_SAMPLES], y_val[:local_losses.KW_EVAL_SAMPLES]
    device = next(model.parameters()).device
    return local_losses.evaluate(config.method, graph, power, model, x_val.to(device), y_val.to(device),
                                 config.eps, config.eval_batch_size)


def _train_smoothing(config, spec, device, model, power, optimizer, lr_schedule, out, history,
                     start_epoch, seconds_before, x_train, y_train, x_val, y_val, progress) -> TrainResult:
    """Base-model training for randomized smoothing: Gaussian augmentation (Cohen et al.) or MACER.

    Same shuffling, LR schedule, checkpoints and resume as the GloRo loop; no
    power iteration. Noise of epoch e comes from a generator seeded by (seed, e).
    """
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    _call(progress, "on_start", config.epochs, steps_per_epoch, start_epoch)
    lr = 0.0
    for epoch in range(start_epoch, config.epochs):
        epoch_start = time.perf_counter()
        model.train()
        permutation = _epoch_permutation(config.seed, epoch, n)
        noise = _epoch_noise_generator(config.seed, epoch)
        loss_sum, seen = 0.0, 0
        for step in range(steps_per_epoch):
            index = permutation[step * config.batch_size:(step + 1) * config.batch_size]
            xb, yb = x_train[index].to(device), y_train[index].to(device)
            global_step = epoch * steps_per_epoch + step + 1
            lr = lr_schedule.lr(global_step / total_steps, config.lr, config.final_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if config.method == "gaussian":
                noisy = xb + losses.gaussian_noise(xb.shape, config.sigma, noise, device)
                loss = losses.cross_entropy(model(noisy), yb)
            else:
                k = config.macer_k
                repeated = xb.repeat_interleave(k, dim=0)
                noisy = repeated + losses.gaussian_noise(repeated.shape, config.sigma, noise, device)
                logits = model(noisy).view(xb.shape[0], k, -1)
                loss = losses.macer_loss(logits, yb, config.sigma, config.macer_beta, config.macer_gamma,
                                         config.macer_lam)
            loss_sum += _optimise(loss, optimizer, epoch, step, progress) * len(index)
            seen += len(index)

        metrics = evaluate_noisy(model, x_val, y_val, config.sigma, config.seed, config.eval_batch_size)
        record = EpochRecord(
            epoch=epoch + 1, loss=loss_sum / max(seen, 1), clean_acc=metrics["clean_acc"],
            vra=None, bottom_rate=None, train_eps=0.0,
            lam=config.macer_lam if config.method == "macer" else 0.0, lr=lr,
            seconds=time.perf_counter() - epoch_start, lipschitz_estimate=None,
            noisy_acc=metrics["noisy_acc"],
        )
        history.append(record)
        seconds_before += record.seconds
        if out is not None:
            _end_epoch(out, model, optimizer, power, config, spec, history, seconds_before, SMOOTHING_LOG_COLUMNS)
        _call(progress, "on_epoch", record)

    model.eval()
    metrics = evaluate_noisy(model, x_val, y_val, config.sigma, config.seed, config.eval_batch_size)
    result = TrainResult(
        model=model, spec=spec, config=config, history=history,
        clean_acc=metrics["clean_acc"], vra_estimate=None, margin_lipschitz_estimate=None,
        lipschitz_estimate=None, seconds=seconds_before, power=power, noisy_acc=metrics["noisy_acc"],
    )
    if out is not None:
        from glorocert.train.outputs import write_outputs

        write_outputs(result, out, x_val, y_val, progress)
    return result
