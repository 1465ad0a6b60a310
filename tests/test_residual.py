"""Residual Lipschitz nets (LiResNet): the residual block x + conv(x) bounded as ONE operator I + W.

Soundness first: every bound here is checked against the exact spectral norm of the explicit matrix, and the
whole net's margin bound against the largest difference quotient an optimiser finds. Also: the trainer's
power iteration on I + W, EMMA, the random shifts. Small, seeded, CPU-only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import largest_quotient
from glorocert import api
from glorocert.graph import Conv2d
from glorocert.lipschitz import compose, conv_bounds
from glorocert.lipschitz import operators as ops_bounds
from glorocert.train import losses
from glorocert.train.augment import random_shift
from glorocert.train.export import export_onnx, export_torchscript
from glorocert.train.power import PowerIteration
from glorocert.zoo import Residual, build


def exact_norm(f, in_shape) -> float:
    """σ_max of the explicit matrix of the linear map f (float64, by SVD)."""
    return ops_bounds.spectral_norm_exact(ops_bounds.materialise(f, in_shape))


def residual_conv(channels, kernel, padding, dilation=(1, 1), scale=1.0, seed=0) -> Conv2d:
    gen = torch.Generator().manual_seed(seed)
    weight = scale * torch.randn(channels, channels, kernel, kernel, generator=gen, dtype=torch.float64)
    return Conv2d(weight, None, (1, 1), padding, dilation, 1)


def liresnet(depth=2, width=4, size=8, residual_scale=0.4, seed=0):
    torch.manual_seed(seed)
    spec = {"arch": "liresnet", "activation": "minmax", "input_shape": [1, size, size], "num_classes": 5,
            "depth": depth, "width": width}
    model = build(spec).eval()
    with torch.no_grad():
        for module in model:
            if isinstance(module, Residual):
                module.conv.weight.normal_(0.0, residual_scale)
                module.conv.bias.normal_(0.0, 0.1)
    return model, spec


# -- the operator I + W ----------------------------------------------------------

CASES = [  # (channels, kernel, padding (t, b, l, r), dilation, in_shape)
    (3, 3, (1, 1, 1, 1), (1, 1), (3, 6, 6)),
    (2, 3, (1, 1, 1, 1), (1, 1), (2, 5, 7)),
    (2, 5, (2, 2, 2, 2), (1, 1), (2, 6, 6)),
    (2, 3, (2, 2, 2, 2), (2, 2), (2, 7, 6)),  # dilated: extent 5
    (2, 4, (1, 2, 2, 1), (1, 1), (2, 6, 5)),  # even kernel, asymmetric 'same' padding
    (4, 1, (0, 0, 0, 0), (1, 1), (4, 3, 3)),
]


@pytest.mark.parametrize("channels,kernel,padding,dilation,in_shape", CASES)
@pytest.mark.parametrize("scale", [0.05, 0.5, 3.0])
def test_identity_plus_conv_is_exactly_the_residual_block(channels, kernel, padding, dilation, in_shape, scale):
    conv = residual_conv(channels, kernel, padding, dilation, scale)
    merged = conv_bounds.identity_plus(conv, in_shape)
    x = torch.randn(3, *in_shape, dtype=torch.float64)
    torch.testing.assert_close(merged.homogeneous(x), x + conv.homogeneous(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels,kernel,padding,dilation,in_shape", CASES)
@pytest.mark.parametrize("scale", [0.05, 0.5, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_bound_is_never_below_exact_norm_for_residual_conv(channels, kernel, padding, dilation, in_shape, scale, seed):
    conv = residual_conv(channels, kernel, padding, dilation, scale, seed)
    exact = exact_norm(lambda x: x + conv.homogeneous(x), in_shape)
    upper, _ = conv_bounds.conv_upper_bound(conv_bounds.identity_plus(conv, in_shape), in_shape)
    assert upper >= exact * (1 - 1e-9)
    # per frequency σ(I + K̂) ≤ 1 + σ(K̂): never looser than 1 + the circulant bound of W
    assert upper <= 1.0 + conv_bounds.circulant_bound(conv, in_shape) + 1e-9


def test_residual_bound_beats_one_plus_norm_when_the_block_cancels_the_identity():
    # W ≈ −I at the centre tap: I + W is small, 1 + ‖W‖ is about 2.
    weight = 0.02 * torch.randn(3, 3, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weight[range(3), range(3), 1, 1] -= 0.9
    conv = Conv2d(weight, None, (1, 1), (1, 1, 1, 1))
    in_shape = (3, 8, 8)
    exact = exact_norm(lambda x: x + conv.homogeneous(x), in_shape)
    upper, _ = conv_bounds.conv_upper_bound(conv_bounds.identity_plus(conv, in_shape), in_shape)
    assert exact <= upper < 0.3 < 1.0 + exact_norm(conv.homogeneous, in_shape) - 1.5


def test_identity_plus_refuses_convs_that_are_not_size_preserving():
    weight = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    assert conv_bounds.identity_plus(Conv2d(weight, None, (2, 2), (1, 1, 1, 1)), (2, 6, 6)) is None  # strided
    assert conv_bounds.identity_plus(Conv2d(weight, None, (1, 1), (0, 0, 0, 0)), (2, 6, 6)) is None  # shrinks
    wide = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    assert conv_bounds.identity_plus(Conv2d(wide, None, (1, 1), (1, 1, 1, 1)), (2, 6, 6)) is None  # C_out ≠ C_in


# -- the bounder on exported LiResNets --------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, spec = liresnet()
    path = export_onnx(model, spec["input_shape"], tmp_path_factory.mktemp("liresnet") / "model.onnx")
    return model, spec, path


@pytest.mark.parametrize("exact_side", [ops_bounds.EXACT_MAX_SIDE, 1])  # exact Gram / circulant bounds of I + W
def test_bounder_bounds_each_residual_add_as_one_operator_never_below_its_exact_norm(exported, exact_side):
    model, spec, path = exported
    graph = api.load(path).graph
    composition = compose.compose(graph, exact_side=exact_side)
    residual_rows = [b for b in composition.blocks if b.op.startswith("x + (")]
    assert len(residual_rows) == spec["depth"]
    blocks = [m for m in model if isinstance(m, Residual)]
    for row, block in zip(residual_rows, blocks):
        weight = block.conv.weight.detach().double()
        exact = exact_norm(lambda x: x + F.conv2d(x, weight, None, 1, 1), tuple(row.in_shape))
        assert row.upper >= exact * (1 - 1e-9)
        # exact: up to the float margin; circulant bounds of I + W on a 4×4 input: a few % (at 14×14, ≪ 1 %)
        assert row.upper <= exact * (1.10 if exact_side == 1 else 1 + 1e-5)
        assert "1+" not in row.method
        one_plus = 1 + exact_norm(lambda x: F.conv2d(x, weight, None, 1, 1), tuple(row.in_shape))
        assert row.upper < one_plus


def test_margin_bound_of_a_liresnet_is_never_below_a_found_difference_quotient(exported):
    model, spec, path = exported
    bound = api.compute_bound(api.load(path))
    margin = bound.margin_matrix  # sound mode: the upper bounds
    double = model.double()
    for j, i in [(0, 1), (2, 4), (3, 0)]:
        def pair(x, j=j, i=i):
            logits = double(x)
            return (logits[:, j] - logits[:, i])[:, None]
        found = largest_quotient(pair, tuple(spec["input_shape"]), restarts=4, steps=60)
        assert margin[j][i] >= found * (1 - 1e-9)
    model.float()


def test_bound_is_at_least_the_trainers_converged_estimate_and_close_to_it(exported):
    model, spec, path = exported
    power = PowerIteration(model, spec["input_shape"])
    power.converge(tol=1e-10, max_iterations=20_000)
    bound = api.compute_bound(api.load(path))
    trained = power.lipschitz_estimate()
    assert bound.global_upper >= trained * (1 - 1e-6)
    assert bound.global_upper <= trained * 1.05  # the same operators (I + W, not 1 + ‖W‖) in both


def test_certify_agrees_between_the_onnx_and_torchscript_exports_and_the_torch_model(exported, tmp_path):
    model, spec, onnx_path = exported
    ts_path = export_torchscript(model, spec["input_shape"], tmp_path / "model.ts.pt")
    x = torch.rand(64, *spec["input_shape"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1).numpy()
    data = api.from_arrays(x.numpy(), y, name="random")
    rows = []
    for path in (onnx_path, ts_path):
        loaded = api.load(path, input_shape=tuple(spec["input_shape"])) if path.suffix == ".pt" else api.load(path)
        result = api.certify(loaded, data, [0.05], bound=api.compute_bound(loaded))
        rows.append(result.rows)
    onnx_rows, ts_rows = rows
    np.testing.assert_array_equal(np.asarray(onnx_rows["predicted"]), y)
    np.testing.assert_array_equal(np.asarray(onnx_rows["predicted"]), np.asarray(ts_rows["predicted"]))
    np.testing.assert_allclose(np.asarray(onnx_rows["radius"]), np.asarray(ts_rows["radius"]), rtol=1e-5, atol=1e-7)


# -- training: power iteration on I + W, EMMA, shifts ----------------------------------

def test_power_iteration_on_a_residual_block_converges_to_the_norm_of_i_plus_w_from_below():
    model, spec = liresnet(depth=1, width=4, size=6)
    power = PowerIteration(model, spec["input_shape"])
    power.converge(tol=1e-12, max_iterations=50_000)
    index = next(i for i, m in enumerate(model) if isinstance(m, Residual))
    weight = model[index].conv.weight.detach().double()
    exact = exact_norm(lambda x: x + F.conv2d(x, weight, None, 1, 1), (4, 3, 3))
    estimate = float(power.layer_estimates()[power.layer_indices.index(index)].detach())
    assert estimate <= exact * (1 + 1e-5)
    assert estimate >= exact * (1 - 1e-3)


def test_emma_raises_each_other_class_by_its_clipped_certified_radius():
    logits = torch.tensor([[3.0, 1.0, 2.9, -5.0]], requires_grad=True)
    labels = torch.tensor([0])
    K = torch.tensor([[0.0, 2.0, 1.0, 4.0], [2.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0], [4.0, 1.0, 1.0, 0.0]])
    eps = 0.5
    # gaps y_0 − y_i = 0, 2, 0.1, 8; radius gap/K = —, 1.0, 0.1, 2.0 → clipped to [0.01ε, ε] = —, 0.5, 0.1, 0.5
    raised = torch.tensor([[3.0, 1.0 + 0.5 * 2.0, 2.9 + 0.1 * 1.0, -5.0 + 0.5 * 4.0]])
    expected = F.cross_entropy(raised, labels)
    loss = losses.emma(logits, labels, K, eps)
    torch.testing.assert_close(loss, expected)
    loss.backward()  # the per-pair ε is held constant: the gradient is that of CE at the raised logits
    raised_grad = torch.softmax(raised, 1) - F.one_hot(labels, 4)
    torch.testing.assert_close(logits.grad, raised_grad)


def test_emma_on_a_misclassified_sample_uses_the_smallest_radius():
    logits = torch.tensor([[0.0, 1.0]])
    K = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    loss = losses.emma(logits, torch.tensor([0]), K, 0.5)
    torch.testing.assert_close(loss, F.cross_entropy(torch.tensor([[0.0, 1.0 + 0.005 * 2.0]]), torch.tensor([0])))


def test_random_shift_moves_each_image_by_at_most_the_shift_and_fills_zeros():
    x = torch.zeros(16, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0  # one lit pixel in the middle
    shifted = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    rows, cols = torch.nonzero(shifted[:, 0] == 1.0, as_tuple=True)[1:]
    assert len(rows) == 16 and (rows - 4).abs().max() <= 2 and (cols - 4).abs().max() <= 2
    assert len({(int(r), int(c)) for r, c in zip(rows, cols)}) > 1  # not one shift for the whole batch
    assert float(shifted.sum()) == 16.0
    again = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(shifted, again)
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)
