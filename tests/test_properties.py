"""Property-based: random small architectures with random weights never break the bound or the converter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from glorocert.api import certify, compute_bound, from_arrays, load
from glorocert.errors import GlorocertError
from glorocert.studies.audit import audit
from helpers import MinMaxHalves, Residual, save_onnx

SHAPE = (2, 8, 8)

BLOCKS = {
    "conv": lambda c: nn.Conv2d(c, c, 3, padding=1),
    "conv_stride": lambda c: nn.Conv2d(c, c, 3, stride=2, padding=1),
    "batchnorm": lambda c: nn.BatchNorm2d(c),
    "relu": lambda c: nn.ReLU(),
    "leaky": lambda c: nn.LeakyReLU(0.3),
    "minmax": lambda c: MinMaxHalves(),
    "avgpool": lambda c: nn.AvgPool2d(3, 1, 1),
    "maxpool": lambda c: nn.MaxPool2d(3, 1, 1),
    "residual": lambda c: Residual(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU())),
}


def build(names: list[str], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(SHAPE[0], 4, 3, padding=1)] + [BLOCKS[n](4) for n in names] + [nn.Flatten()]
    probe = nn.Sequential(*layers)(torch.zeros(1, *SHAPE))
    model = nn.Sequential(*layers, nn.Linear(probe.shape[1], 3)).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.3, 3)
            m.weight.data.uniform_(-2, 2)
    return model


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=4), seed=st.integers(0, 10_000))
def test_random_architectures_bound_every_difference_quotient_and_convert_exactly(tmp_path_factory, names, seed):
    model = build(names, seed)
    path = save_onnx(model, tmp_path_factory.mktemp("prop") / "m.onnx", SHAPE)
    loaded = load(path)  # raises if the IR and onnxruntime disagree
    x = torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        native = model(x)
        ir = loaded.graph.forward(x.double()).float()
    assert torch.allclose(native, ir, atol=1e-4 * (1 + native.abs().max().item()))
    bound = compute_bound(loaded)
    # difference quotients on random nearby pairs, plus gradient ascent on the margin gradient norm
    y = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        quotients = (model(x) - model(y)).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert quotients.max().item() <= bound.global_upper * (1 + 1e-6)
    z = x[:8].clone().requires_grad_(True)
    out = model(z)
    for j, i in ((0, 1), (1, 2), (2, 0)):
        (grad,) = torch.autograd.grad((out[:, j] - out[:, i]).sum(), z, retain_graph=True)
        assert grad.flatten(1).norm(dim=1).max().item() <= bound.margin_matrix[j][i] * (1 + 1e-6)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.sampled_from(["conv", "relu", "minmax", "batchnorm", "residual"]), min_size=1, max_size=3), seed=st.integers(0, 10_000))
def test_random_architectures_certified_samples_survive_attacks(tmp_path_factory, names, seed):
    model = build(names, seed)
    loaded = load(save_onnx(model, tmp_path_factory.mktemp("prop") / "m.onnx", SHAPE))
    x = np.random.default_rng(seed).random((16, *SHAPE)).astype(np.float32)
    random_inputs = from_arrays(x, name="random")  # unlabelled
    result = audit(loaded, random_inputs, bound=compute_bound(loaded), steps=20, restarts=1)
    assert result.violations == []


def test_out_of_memory_becomes_advice(monkeypatch, tmp_path):
    loaded = load(save_onnx(build(["relu"], 0), tmp_path / "m.onnx", SHAPE))
    bound = compute_bound(loaded)

    def exhausted(x):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer")

    monkeypatch.setattr(loaded, "runner", exhausted)
    with pytest.raises(GlorocertError, match="--batch-size"):
        certify(loaded, from_arrays(np.zeros((2, *SHAPE), np.float32), name="tiny"), [0.1], bound=bound, batch_size=512)
