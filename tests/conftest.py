"""Shared fixtures: small seeded torch models of several kinds, and helpers that save them
as ONNX / TorchScript / torch.export / pickles into ``tmp_path``.

Every model takes a tiny per-sample input (``SHAPE`` = 1×8×8 unless a kind says
otherwise) so that tests stay fast on two shared CPU cores.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

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


def _gelu():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.GELU(), nn.Linear(16, NUM_CLASSES))


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
UNSUPPORTED_KINDS = {"gelu": _gelu, "softmax": _softmax}
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
    from glorocert.loaders import load

    return load(path, input_shape=shape, **kwargs)


def run_main(monkeypatch, capsys, *args, width: int | None = None) -> tuple[int, str, str]:
    """Run ``glorocert ARGS`` through cli.main(); returns (exit code, stdout, stderr).

    ``width`` widens stdout's console so that no table cell wraps, whoever imported cli first.
    """
    import sys

    from rich.console import Console

    from glorocert import cli

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


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _seeded_and_single_threaded():
    """Tests are deterministic and leave the second core to the other engineers."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def saved_model(tmp_path):
    """``saved_model(kind, fmt="onnx", seed=0)`` → (module, path of the saved file in tmp_path)."""

    def _save(kind: str, fmt: str = "onnx", seed: int = 0, stem: str | None = None):
        model = make_model(kind, seed)
        return model, save_as(model, fmt, tmp_path, stem or f"{kind}-{seed}")

    return _save


@pytest.fixture(scope="session")
def trained_digits_model(tmp_path_factory):
    """A small conv net trained for a few seconds on sklearn's 8×8 digits (train split), saved as ONNX and TorchScript.

    Returns (module, onnx path, torchscript path). Seeded; the bound files are not precomputed.
    """
    from glorocert.data import open_dataset

    torch.manual_seed(0)
    data = open_dataset("digits", split="train")
    xs, ys = [], []
    for batch in data.batches(2048):
        xs.append(torch.from_numpy(batch.x))
        ys.append(torch.from_numpy(batch.y))
    x, y = torch.cat(xs), torch.cat(ys)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, NUM_CLASSES),
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 128):
            idx = order[start : start + 128]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    torch.set_num_threads(previous)
    model.eval()
    directory = tmp_path_factory.mktemp("digits-convnet")
    return model, save_onnx(model, directory / "convnet.onnx"), save_torchscript(model, directory / "convnet.pt")
