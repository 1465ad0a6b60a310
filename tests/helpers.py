"""Test helpers: small seeded torch models of several kinds, savers to ONNX / TorchScript /
torch.export / pickles, a CLI runner, sklearn's digits as tensors, and a PGD attack.

Every model takes a tiny per-sample input (``SHAPE`` = 1×8×8 unless a kind says
otherwise) so that tests stay fast on two shared CPU cores. Fixtures live in
conftest.py; test files import these with ``from helpers import …``.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from glorocert.api import compute_bound, default_path
from glorocert.loaders import load
from glorocert.train import state as train_state_files

SHAPE = (1, 8, 8)
NUM_CLASSES = 10


# --------------------------------------------------------------------------- building blocks


class Residual(nn.Module):
    """x + body(x)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class TwoBranchConcat(nn.Module):
    """cat([left(x), right(x)], channels)."""

    def __init__(self, left: nn.Module, right: nn.Module):
        super().__init__()
        self.left, self.right = left, right

    def forward(self, x):
        return torch.cat([self.left(x), self.right(x)], 1)


class MinMaxHalves(nn.Module):
    """Channel c pairs with c + C/2; output [max half, min half] (LiResNet / PyTorch convention)."""

    def forward(self, x):
        a, b = x.chunk(2, 1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], 1)


class MinMaxAdjacent(nn.Module):
    """Flattened elements (2k, 2k+1) pair; output [min, max] per pair (gloro / TensorFlow convention)."""

    def forward(self, x):
        shape = x.shape
        pairs = x.reshape(x.shape[0], -1, 2)
        first, second = pairs[..., 0:1], pairs[..., 1:2]
        lo, hi = torch.minimum(first, second), torch.maximum(first, second)
        return torch.cat([lo, hi], -1).reshape(shape)


class Normalize(nn.Module):
    """(x − mean) / std inside the model (exported as ONNX Sub and Div by constants)."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor([mean]).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor([std]).view(1, 1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def _randomise_batchnorm(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    with torch.no_grad():
        c = bn.num_features
        bn.running_mean.copy_(0.5 * torch.randn(c, generator=gen))
        bn.running_var.copy_(0.2 + 2.0 * torch.rand(c, generator=gen))
        bn.weight.copy_(0.5 + torch.rand(c, generator=gen) * 1.5 * torch.where(torch.rand(c, generator=gen) < 0.3, -1.0, 1.0))
        bn.bias.copy_(0.3 * torch.randn(c, generator=gen))


# --------------------------------------------------------------------------- the model zoo


def _chain():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, NUM_CLASSES),
    )


def _residual():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, NUM_CLASSES),
    )


def _batchnorm_pooling():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
        nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, NUM_CLASSES),
    )


def _activations():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(64, 16), nn.Sigmoid(), nn.Linear(16, NUM_CLASSES),
    )


def _normalised():
    return nn.Sequential(
        Normalize(0.3, 0.4), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, NUM_CLASSES),
    )


def _concat():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        TwoBranchConcat(nn.Conv2d(4, 2, 3, padding=2, dilation=2), nn.Conv2d(4, 4, 3, padding=1, groups=2)), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, NUM_CLASSES),
    )


def _minmax_halves():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), MinMaxHalves(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 16), MinMaxHalves(), nn.Linear(16, NUM_CLASSES),
    )


def _minmax_adjacent():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), MinMaxAdjacent(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 16), MinMaxAdjacent(), nn.Linear(16, NUM_CLASSES),
    )


def _linear_only():
    """No nonlinearity at all: the global bound must equal the exact norm of the product."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, NUM_CLASSES),
    )


def _ends_with_relu():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES), nn.ReLU())


def _ends_with_tanh():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES), nn.Tanh())


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))


class Square(nn.Module):
    """x·x: a product of two tensors, which has no global Lipschitz bound (exported as Mul(x, x))."""

    def forward(self, x):
        return x * x


def _square():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), Square(), nn.Linear(16, NUM_CLASSES))


def _softmax():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, NUM_CLASSES), nn.Softmax(dim=1))


MODEL_KINDS = {
    "chain": _chain,
    "residual": _residual,
    "batchnorm_pooling": _batchnorm_pooling,
    "activations": _activations,
    "normalised": _normalised,
    "concat": _concat,
    "minmax_halves": _minmax_halves,
    "minmax_adjacent": _minmax_adjacent,
    "linear_only": _linear_only,
    "ends_with_relu": _ends_with_relu,
    "ends_with_tanh": _ends_with_tanh,
    "mlp": _mlp,
}
UNSUPPORTED_KINDS = {"square": _square, "softmax": _softmax}
# the kinds the IR must express (everything except the deliberately unsupported ones)
SUPPORTED_KINDS = tuple(MODEL_KINDS)


def make_model(kind: str, seed: int = 0) -> nn.Module:
    """A seeded model of ``kind`` in eval mode (BatchNorm with non-trivial running statistics)."""
    torch.manual_seed(seed)
    model = {**MODEL_KINDS, **UNSUPPORTED_KINDS}[kind]()
    gen = torch.Generator().manual_seed(seed + 1000)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            _randomise_batchnorm(module, gen)
    return model.eval()


# --------------------------------------------------------------------------- saving


def save_onnx(model: nn.Module, path: Path, shape=SHAPE) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (torch.zeros(1, *shape),), str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return Path(path)


def save_torchscript(model: nn.Module, path: Path, shape=SHAPE) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model.eval(), torch.zeros(1, *shape)).save(str(path))
    return Path(path)


def save_export(model: nn.Module, path: Path, shape=SHAPE) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(model.eval(), (torch.zeros(2, *shape),)), str(path))
    return Path(path)


def save_pickle(model: nn.Module, path: Path, shape=SHAPE) -> Path:
    torch.save(model, str(path))
    return Path(path)


SAVERS = {"onnx": (save_onnx, ".onnx"), "torchscript": (save_torchscript, ".pt"), "torch.export": (save_export, ".pt2")}


def save_as(model: nn.Module, fmt: str, directory: Path, stem: str = "model", shape=SHAPE) -> Path:
    """Save ``model`` in format ``fmt`` (onnx, torchscript, torch.export) as ``directory/stem.ext``."""
    saver, ext = SAVERS[fmt]
    return saver(model, Path(directory) / f"{stem}{ext}", shape)


def load_saved(path: Path, shape=SHAPE, **kwargs):
    """glorocert.loaders.load with the input shape given (TorchScript needs it; harmless for the others)."""
    return load(path, input_shape=shape, **kwargs)


def run_main(monkeypatch, capsys, *args, width: int | None = None) -> tuple[int, str, str]:
    """Run ``glorocert ARGS`` through cli.main(); returns (exit code, stdout, stderr).

    ``width`` widens stdout's console so that no table cell wraps, whoever imported cli first.
    """
    from rich.console import Console

    from glorocert import cli  # imported late: only the CLI tests pay for typer and rich

    monkeypatch.setattr(sys, "argv", ["glorocert", *map(str, args)])
    monkeypatch.setitem(cli.DEBUG, "on", False)
    if width is not None:
        monkeypatch.setattr(cli, "out", Console(width=width))
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def digits_split(n_train: int, n_held_out: int):
    """sklearn's 8×8 digits in [0, 1], shuffled with seed 0: (x, y) train, then (x, y) held out."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    end = n_train + n_held_out
    return x[:n_train], y[:n_train], x[n_train:end], y[n_train:end]


# --------------------------------------------------------------------------- a PGD attack (tests of the local certifiers)


def pgd_pair_margins(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    predicted: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    norm: str = "l2",
    steps: int = 100,
    restarts: int = 4,
    seed: int = 0,
) -> torch.Tensor:
    """Smallest y_ŷ − y_i found by projected gradient descent inside the ε-ball, (N, C).

    One targeted attack per (sample, class), ``restarts`` random starts each
    (the first starts at x), normalised-gradient steps on a cosine schedule
    summing to 2.5ε, projected back onto the ball after each step. An *upper*
    bound on the true minimum: every certified lower bound must stay below it.
    Entry i = ŷ is +inf. No clipping to [0, 1]: certificates are for the full ball.
    """
    x = x.detach().to(torch.float64)
    n = x.shape[0]
    with torch.no_grad():
        classes = forward(x[:1]).shape[1]
    eps_t = torch.as_tensor(eps, dtype=torch.float64).expand(n).reshape(n)
    gen = torch.Generator().manual_seed(seed)
    shape = x.shape[1:]
    # problems: restart × sample × class
    xs = x.unsqueeze(0).unsqueeze(2).expand(restarts, n, classes, *shape).reshape(-1, *shape)
    e = eps_t.view(1, n, 1).expand(restarts, n, classes).reshape(-1)
    pred = predicted.view(1, n, 1).expand(restarts, n, classes).reshape(-1)
    target = torch.arange(classes).view(1, 1, classes).expand(restarts, n, classes).reshape(-1)
    view = (-1,) + (1,) * len(shape)

    def project(delta):
        if norm == "l2":
            length = delta.flatten(1).norm(dim=1).clamp_min(1e-300)
            return delta * torch.clamp(e / length, max=1.0).view(view)
        return torch.maximum(torch.minimum(delta, e.view(view)), -e.view(view))

    delta = torch.randn(xs.shape, generator=gen, dtype=torch.float64)
    if norm == "l2":
        delta = delta / delta.flatten(1).norm(dim=1).view(view) * e.view(view) * torch.rand(
            xs.shape[0], generator=gen, dtype=torch.float64
        ).view(view)
    else:
        delta = (torch.rand(xs.shape, generator=gen, dtype=torch.float64) * 2 - 1) * e.view(view)
    delta[: n * classes] = 0.0  # first restart from the clean point
    best = torch.full((xs.shape[0],), math.inf, dtype=torch.float64)
    rows = torch.arange(xs.shape[0])
    for k in range(steps + 1):
        delta = delta.detach().requires_grad_(True)
        y = forward(xs + delta)
        margin = y[rows, pred] - y[rows, target]
        best = torch.minimum(best, margin.detach())
        if k == steps:
            break
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        step = 2.5 * e / max(steps, 1) * (1 + math.cos(math.pi * k / steps)) + 1e-12
        with torch.no_grad():
            if norm == "l2":
                g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-300).view(view)
                delta = project(delta - step.view(view) * g)
            else:
                delta = project(delta - step.view(view) * grad.sign())
    best = best.view(restarts, n, classes).amin(dim=0)
    best[torch.arange(n), predicted] = math.inf
    return best


def pgd_margin(forward, x, predicted, eps, **kwargs) -> torch.Tensor:
    """min over classes of :func:`pgd_pair_margins`: < 0 means an adversarial example was found."""
    return pgd_pair_margins(forward, x, predicted, eps, **kwargs).amin(dim=1)


def chain_model_with_bound(root: Path) -> Path:
    """A small ONNX model (``make_model("chain")``) saved as ROOT/model.onnx, with its frozen bound next to it."""
    model = save_as(make_model("chain"), "onnx", root, "model")
    compute_bound(load(model)).save(default_path(model))
    return model


def largest_quotient(f, in_shape, *, restarts=8, steps=80, spread=3.0, gap=0.5, seed=0) -> float:
    """max ‖f(x)−f(y)‖/‖x−y‖ found by Adam over (x, y − x): x ~ N(0, spread²), y − x ~ N(0, gap²) to start."""
    gen = torch.Generator().manual_seed(seed)
    x = (spread * torch.randn(restarts, *in_shape, generator=gen, dtype=torch.float64)).requires_grad_()
    delta = (gap * torch.randn(restarts, *in_shape, generator=gen, dtype=torch.float64)).requires_grad_()
    optimiser = torch.optim.Adam([x, delta], lr=0.05)
    best = 0.0
    for _ in range(steps):
        ratio = (f(x + delta) - f(x)).flatten(1).norm(dim=1) / delta.flatten(1).norm(dim=1)
        best = max(best, ratio.max().item())
        optimiser.zero_grad()
        (-ratio.sum()).backward()
        optimiser.step()
    return best


def interrupt_at_the_second_state_json(monkeypatch) -> Callable:
    """Ctrl-C as train writes train_state.json the second time (after epoch 2, whose tensors are written by then).
    Returns the real writer, to put back."""
    real, calls = train_state_files.write_text, []

    def write_text(path, text):
        if Path(path).name == train_state_files.STATE_JSON:
            calls.append(path)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real(path, text)

    monkeypatch.setattr(train_state_files, "write_text", write_text)
    return real
