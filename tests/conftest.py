"""Shared fixtures: seeded single-threaded tests, small models saved into ``tmp_path``, a conv net
trained on sklearn's 8×8 digits, and the CLI tests' workspace of models and data files. Helper functions and classes live in helpers.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from glorocert.api import compute_bound, default_path, load
from glorocert.data import open_dataset
from helpers import NUM_CLASSES, SHAPE, make_model, save_as, save_onnx, save_pickle, save_torchscript


@pytest.fixture(autouse=True)
def _seeded_and_single_threaded():
    """Tests are deterministic and leave the second core to the other xdist worker."""
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


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A model directory (ONNX with its bound computed, TorchScript, broken and hostile models) and data files."""
    root = tmp_path_factory.mktemp("cli")
    models, data = root / "models", root / "data"
    models.mkdir()
    data.mkdir()
    module = make_model("chain")
    paths = {
        "onnx": save_as(module, "onnx", models, "chain"),
        "torchscript": save_as(module, "torchscript", models, "chain"),
        "other_onnx": save_as(make_model("chain", seed=1), "onnx", models, "other"),
        "square": save_as(make_model("square"), "onnx", models, "square"),
        "pickle": save_pickle(module, models / "pickled.pt"),
    }
    corrupt = models / "corrupt.onnx"
    corrupt.write_bytes(paths["onnx"].read_bytes()[:400])
    paths["corrupt"] = corrupt

    compute_bound(load(paths["onnx"])).save(default_path(paths["onnx"]))
    paths["other_bound"] = compute_bound(load(paths["other_onnx"])).save(models / "other.bound.json")

    batch = next(open_dataset("digits", limit=40).batches(1000))
    x, y = batch.x.astype(np.float32), batch.y.astype(np.int64)
    np.savez(data / "digits.npz", x=x, y=y)
    np.save(data / "x.npy", x)
    np.save(data / "y.npy", y)
    nan = x.copy()
    nan[7, 0, 3, 4] = np.nan
    np.save(data / "nan.npy", nan)
    np.save(data / "wrong_shape.npy", np.random.default_rng(0).random((10, 1, 9, 9), dtype=np.float32))
    bad_labels = y.copy()
    bad_labels[5] = 10
    np.save(data / "labels_out_of_range.npy", bad_labels)
    np.save(data / "empty.npy", np.zeros((0, *SHAPE), np.float32))
    (data / "garbage.npy").write_bytes(b"\x93NUMPY this is not really an array" + bytes(range(256)))
    return {**paths, "data": data, "root": root}


@pytest.fixture
def out_dir(tmp_path):
    directory = tmp_path / "out"
    directory.mkdir()
    return directory
