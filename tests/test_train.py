"""glorocert.train: architectures, MinMax, power iteration, losses, schedules, loop, exports.

Small, seeded, CPU-only; each test takes seconds.
"""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import digits_split, interrupt_at_the_second_state_json
from glorocert.errors import GlorocertError
from glorocert.train import losses
from glorocert.zoo import (
    ARCHITECTURES,
    MinMax,
    build,
    load_checkpoint,
    save_checkpoint,
)
from glorocert.certify.gloro_onnx import export_gloro_onnx
from glorocert.train.export import export_onnx
from glorocert.train import RobustSettings, TrainConfig, evaluate, train
from glorocert.train.power import PowerIteration
from glorocert.train.schedules import LAMBDA_SCHEDULES, LR_SCHEDULES, RAMP_SCHEDULES, parse_schedule


@pytest.fixture(scope="module")
def digits_512_256():
    """sklearn's 8×8 digits in [0, 1]: 512 train / 256 held-out samples."""
    return digits_split(512, 256)


def spec(arch="2c2f", activation="relu", pairing="halves", shape=(1, 28, 28), classes=10):
    return {"arch": arch, "activation": activation, "minmax_pairing": pairing,
            "input_shape": list(shape), "num_classes": classes}


def explicit_matrix(operator, input_shape) -> torch.Tensor:
    """The matrix of a linear operator, column by column from the standard basis."""
    size = int(np.prod(input_shape))
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *input_shape)
    return operator(basis).reshape(size, -1).T


# -- MinMax and architectures ------------------------------------------------

def minmax_reference(x: np.ndarray, pairing: str) -> np.ndarray:
    if pairing == "halves":
        half = x.shape[1] // 2
        a, b = x[:, :half], x[:, half:]
        return np.concatenate([np.maximum(a, b), np.minimum(a, b)], axis=1)
    flat = x.reshape(x.shape[0], -1)
    out = np.empty_like(flat)
    for k in range(flat.shape[1] // 2):
        pair = flat[:, 2 * k:2 * k + 2]
        out[:, 2 * k] = pair.min(axis=1)
        out[:, 2 * k + 1] = pair.max(axis=1)
    return out.reshape(x.shape)


@pytest.mark.parametrize("pairing", ["halves", "adjacent"])
@pytest.mark.parametrize("shape", [(3, 6), (2, 4, 3, 5)])
def test_minmax_matches_numpy_reference(pairing, shape):
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    x[0, 0] = x[0, 1]  # a tie inside a pair
    out = MinMax(pairing)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(out, minmax_reference(x, pairing))


def test_minmax_rejects_unknown_pairing():
    with pytest.raises(GlorocertError, match="halves, adjacent"):
        MinMax("half")


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
@pytest.mark.parametrize("activation", ["relu", "minmax"])
def test_architectures_map_images_to_class_logits(arch, size, channels, activation):
    torch.manual_seed(0)
    model = build(spec(arch, activation, shape=(channels, size, size), classes=7))
    assert model(torch.rand(2, channels, size, size)).shape == (2, 7)


def test_2c2f_has_the_paper_layer_sizes():
    model = build(spec("2c2f"))
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [(16, (4, 4), (2, 2)), (32, (4, 4), (2, 2))]
    assert [(l.in_features, l.out_features) for l in linears] == [(32 * 7 * 7, 100), (100, 10)]


def test_weights_are_initialised_orthogonally():
    torch.manual_seed(0)
    model = build(spec("2c2f"))
    weight = model[-1].weight  # 10 × 100: orthonormal rows
    torch.testing.assert_close(weight @ weight.T, torch.eye(10), atol=1e-5, rtol=0)


def test_unknown_architecture_and_activation_are_refused():
    with pytest.raises(GlorocertError, match="2c2f, 4c3f, 6c2f, 8c2f"):
        build(spec("2c3f"))
    with pytest.raises(GlorocertError, match="relu, minmax"):
        build(spec(activation="tanh"))


# -- checkpoints -------------------------------------------------------------

def test_checkpoint_round_trip_keeps_weights_and_spec(tmp_path):
    torch.manual_seed(0)
    model = build(spec("2c2f", "minmax", "adjacent"))
    path = save_checkpoint(tmp_path / "m.safetensors", model, spec("2c2f", "minmax", "adjacent"), {"eps": 0.3})
    loaded, loaded_spec = load_checkpoint(path)
    assert loaded_spec == spec("2c2f", "minmax", "adjacent")
    assert not loaded.training
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_corrupt_or_foreign_checkpoints_raise_glorocert_error(tmp_path):
    from safetensors.torch import save_file

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00not a header at all")
    with pytest.raises(GlorocertError, match="not a valid safetensors"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(GlorocertError, match="not a glorocert checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(GlorocertError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    mismatched = tmp_path / "mismatched.safetensors"
    save_file({"0.weight": torch.zeros(2)}, str(mismatched),
              metadata={"glorocert_format": "1", "glorocert_spec": json.dumps(spec())})
    with pytest.raises(GlorocertError, match="do not match"):
        load_checkpoint(mismatched)


# -- power iteration ---------------------------------------------------------

def tiny_net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 4, stride=2, padding=1), nn.ReLU(),   # odd input: needs output_padding
        nn.Conv2d(4, 4, 3, stride=1, padding=1), MinMax(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 6), nn.ReLU(), nn.Linear(6, 3),
    )


def test_conv_transpose_is_the_adjoint_for_strided_padded_odd_inputs():
    model = tiny_net()
    power = PowerIteration(model, (2, 7, 7))
    x = torch.randn(1, 2, 7, 7)
    y = torch.randn(1, 4, 3, 3)
    lhs = (power._forward_operator(0, x) * y).sum()
    rhs = (x * power._transpose_operator(0, y)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)


def test_converged_estimate_bounds_per_step_estimates_and_stays_below_exact_norm():
    model = tiny_net()
    power = PowerIteration(model, (2, 7, 7), seed=0)
    per_step = []
    for _ in range(5):  # what training sees: one step at a time from the persistent state
        power.step(1)
        per_step.append(power.layer_estimates().detach())
    report = power.converge(tol=1e-9, max_iterations=20_000)
    converged = power.layer_estimates().detach()
    assert all(report.converged)
    for estimate in per_step:
        assert torch.all(converged >= estimate * (1 - 1e-6))
    exact = []
    shapes = {0: (2, 7, 7), 2: (4, 3, 3), 5: (36,), 7: (6,)}
    for index, module in zip(power.layer_indices, [model[i] for i in power.layer_indices]):
        weight = module.weight.double()
        if isinstance(module, nn.Conv2d):
            op = lambda b, w=weight, m=module: F.conv2d(b, w, None, m.stride, m.padding)  # noqa: E731
        else:
            op = lambda b, w=weight: b @ w.T  # noqa: E731
        exact.append(torch.linalg.matrix_norm(explicit_matrix(op, shapes[index]), ord=2))
    exact = torch.stack(exact).float()
    assert torch.all(converged <= exact * (1 + 1e-5))
    torch.testing.assert_close(converged, exact, rtol=1e-3, atol=0)


def test_normalisation_adds_no_epsilon_for_tiny_weights():
    torch.manual_seed(0)
    layer = nn.Linear(5, 4)
    with torch.no_grad():
        layer.weight.mul_(1e-7)
    model = nn.Sequential(layer)
    power = PowerIteration(model, (5,))
    power.converge(tol=1e-9)
    exact = torch.linalg.matrix_norm(layer.weight.double(), ord=2)
    torch.testing.assert_close(power.layer_estimates()[0].double(), exact, rtol=1e-5, atol=0)


def test_margin_estimate_is_differentiable_in_the_weights_only():
    model = tiny_net()
    power = PowerIteration(model, (2, 7, 7))
    power.step(3)
    K = power.margin_lipschitz()
    assert torch.all(torch.diagonal(K) == 0)
    torch.testing.assert_close(K, K.T)
    K.sum().backward()
    for module in model:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert module.weight.grad is not None and torch.isfinite(module.weight.grad).all()
    assert all(not b.requires_grad for b in power.buffers())


def test_each_epochs_log_row_and_history_entry_are_formatted_once_and_the_files_are_those_of_a_fresh_format(tmp_path, monkeypatch):
    """end_epoch with the run's HistoryText formats only the new epoch (re-formatting the whole history every epoch
    cost 0.44 s an epoch at 10,000 epochs) and writes the same log.csv and resume state as formatting it all anew."""
    import dataclasses as dc

    from glorocert.files import sha256_of
    from glorocert.train import state as state_files
    from glorocert.train.objectives import make_objective
    from glorocert.train.records import EpochRecord

    spec = {"arch": "2c2f", "activation": "minmax", "input_shape": [1, 8, 8], "num_classes": 3}
    model = build(spec)
    optimizer = torch.optim.Adam(model.parameters())
    config = TrainConfig(arch="2c2f", activation="minmax", robust=RobustSettings(loss="trades"))
    objective = make_objective(config, model, spec, 1)
    formatted = []
    real_jsonable = state_files.jsonable

    def jsonable(obj):  # state.py turns each epoch's record into JSON values exactly once per formatting
        if isinstance(obj, dict) and "loss" in obj:
            formatted.append(obj["epoch"])
        return real_jsonable(obj)

    monkeypatch.setattr(state_files, "jsonable", jsonable)
    text, history = state_files.HistoryText(objective.log_columns), []
    cached, fresh = tmp_path / "cached", tmp_path / "fresh"
    cached.mkdir(), fresh.mkdir()
    for epoch in range(1, 5):
        history.append(EpochRecord(epoch=epoch, loss=1 / epoch, lr=1e-3, seconds=0.5, clean_acc=0.9 if epoch % 2 else None,
                                   vra=0.8 if epoch % 2 else None, bottom_rate=None, train_eps=0.45, lam=epoch / 3,
                                   lipschitz_estimate=float("nan") if epoch == 3 else None))
        formatted.clear()
        state_files.end_epoch(cached, model, optimizer, objective, config, spec, history, float(epoch), text=text)
        assert formatted == [epoch]
        state_files.end_epoch(fresh, model, optimizer, objective, config, spec, history, float(epoch))
        assert (cached / "log.csv").read_bytes() == (fresh / "log.csv").read_bytes()
        state, other = (json.loads((run / "train_state.json").read_text()) for run in (cached, fresh))
        assert state.pop("tensors_sha256") == sha256_of(cached / "train_state.safetensors")  # (safetensors' own
        other.pop("tensors_sha256")  # header order varies from file to file: the hashes of equal states may differ)
        assert repr(state) == repr(other)  # repr: NaN equals NaN
        assert state["epochs_done"] == epoch and state["config"] == config.to_dict()
        assert repr(state["history"]) == repr(json.loads(json.dumps([dc.asdict(r) for r in history])))
        assert repr(state_files._embedded_state(cached / "train_state.safetensors")) == repr(state)
    assert (cached / "log.csv").read_text().splitlines() == [  # the format log.csv has always had
        "epoch,loss,clean_acc,vra,bottom_rate,train_eps,lam,lr,seconds,lipschitz_estimate",
        "1,1,0.9,0.8,,0.45,0.333333,0.001,0.5,",
        "2,0.5,,,,0.45,0.666667,0.001,0.5,",
        "3,0.333333,0.9,0.8,,0.45,1,0.001,0.5,nan",
        "4,0.25,,,,0.45,1.33333,0.001,0.5,",
    ]


@pytest.mark.parametrize("logits_layer", [True, False])
@pytest.mark.parametrize("iterations", [0, 1, 3])
@pytest.mark.parametrize("net", ["tiny", "liresnet"])
def test_a_training_steps_estimates_are_those_before_its_last_advance_and_it_advances_as_step(net, iterations, logits_layer):
    """PowerIteration.step_estimates (the trainer's step) reuses W x of its estimates as half of its last advance:
    estimates, their gradients in every weight and the iterates after it must equal those of step(k − 1),
    layer_estimates(), step(1) — the same advances, one operator fewer. iterations = 0 advances nothing.
    Without the logits layer (GloRo's step) the other layers' estimates, gradients and iterates are the same,
    and the logits layer's iterate is left as it was."""
    if net == "tiny":
        model, shape = tiny_net(), (2, 7, 7)
    else:
        torch.manual_seed(0)
        model, shape = build({"arch": "liresnet", "depth": 2, "width": 4, "activation": "minmax",
                              "input_shape": [1, 8, 8], "num_classes": 3}), (1, 8, 8)
    reference, fused = PowerIteration(model, shape, seed=1), PowerIteration(model, shape, seed=1)
    weights = torch.linspace(1.0, 2.0, len(reference.layer_indices))

    def gradients(estimates):
        model.zero_grad()
        (estimates * weights).sum().backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]

    last = reference.layer_indices[-1]
    untouched = fused.iterate(last).clone()
    if not logits_layer:
        weights[-1] = 0.0  # the reference's logits-layer estimate then adds nothing to any gradient
    reference.step(max(iterations - 1, 0))
    expected = reference.layer_estimates()
    expected_gradients = gradients(expected)
    reference.step(min(iterations, 1))
    got = fused.step_estimates(iterations, logits_layer=logits_layer)
    torch.testing.assert_close(got, expected if logits_layer else expected[:-1], rtol=1e-6, atol=0)
    got_gradients = gradients(got if logits_layer else torch.cat([got, got.new_zeros(1)]))
    assert any(g.abs().sum() > 0 for g in got_gradients)
    for mine, theirs in zip(got_gradients, expected_gradients):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
    for index in reference.layer_indices[:-1]:
        torch.testing.assert_close(fused.iterate(index), reference.iterate(index), rtol=1e-5, atol=1e-7)
    if logits_layer:
        torch.testing.assert_close(fused.iterate(last), reference.iterate(last), rtol=1e-5, atol=1e-7)
    else:
        assert torch.equal(fused.iterate(last), untouched)
    assert all(not b.requires_grad for b in fused.buffers())


@pytest.mark.parametrize("method,loss", [("gloro", "trades"), ("gloro", "emma"), ("bcp", "gloro")])
def test_the_objectives_step_takes_its_estimates_before_the_advance_and_only_the_warm_up_advances_alone(method, loss):
    """The trainer's loss after the warm-up is the loss at the estimates of the iterates before the step's last
    advance (PowerIteration.step_estimates), not after it; during the warm-up the iterates advance unused."""
    from glorocert.train import local_losses
    from glorocert.train.objectives import make_objective

    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    spec = {"input_shape": [1, 8, 8], "num_classes": 3}
    activation = "minmax" if method == "gloro" else "relu"
    model = build({"arch": "2c2f", "activation": activation, **spec})
    config = TrainConfig(method=method, activation=activation, epochs=3,
                         robust=RobustSettings(loss=loss, eps=0.3, lam=0.5, power_iterations=2, warmup_epochs=1))
    mine, reference = make_objective(config, model, spec, 1), make_objective(config, model, spec, 1)
    mine.loss(model, x, y, 1)  # warm-up: plain cross-entropy, the iterates advance
    reference.power.step(2)
    last = reference.power.layer_indices[-1]
    after_warm_up = reference.power.iterate(last).clone()
    got = mine.loss(model, x, y, 2)
    reference.power.step(1)
    estimates = reference.power.layer_estimates()
    logits, eps, lam = model(x), mine.train_eps, mine.lam
    assert eps > 0
    if method == "bcp":
        lower = local_losses.lower_bounds(method, reference.graph, reference.power, x, y, eps, estimates)
        expected = local_losses.mixed_loss(logits, y, lower, lam)
    else:
        K = reference.power.margin_matrix(estimates[:-1])
        expected = losses.gloro_trades(logits, y, K, eps, lam) if loss == "trades" else losses.emma(logits, y, K, eps)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    reference.power.step(1)
    for index in mine.power.layer_indices[:-1]:
        torch.testing.assert_close(mine.power.iterate(index), reference.power.iterate(index), rtol=1e-6, atol=1e-8)
    # BCP reads the logits layer's norm and advances it; GloRo's margin matrix reads that layer's rows, not its norm
    expected_last = reference.power.iterate(last) if method == "bcp" else after_warm_up
    torch.testing.assert_close(mine.power.iterate(last), expected_last, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("classes", [3, 30])  # torch's cdist switches to a matmul form beyond 25 rows unless told not to
def test_margin_matrix_is_the_row_distances_times_the_earlier_estimates_with_an_exact_zero_diagonal(classes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, classes))
    power = PowerIteration(model, (5,))
    estimates = torch.tensor([1.7], requires_grad=True)  # the layers' before the logits layer (whose rows are read)
    K = power.margin_matrix(estimates)
    weight = model[2].weight.detach().double()
    expected = torch.linalg.vector_norm(weight[:, None, :] - weight[None, :, :], dim=-1) * 1.7
    torch.testing.assert_close(K.double(), expected, rtol=1e-6, atol=0)
    assert torch.all(torch.diagonal(K) == 0)
    torch.testing.assert_close(K, K.T, rtol=0, atol=0)
    K.sum().backward()
    assert torch.isfinite(model[2].weight.grad).all() and torch.isfinite(estimates.grad).all()
    torch.testing.assert_close(estimates.grad[0].double(), expected.sum() / 1.7, rtol=1e-6, atol=0)
    w = model[2].weight.detach().double().requires_grad_()  # the gradient of Σ ‖w_j − w_i‖, off the diagonal
    distance = ((w[:, None, :] - w[None, :, :]) ** 2).sum(-1) + torch.eye(classes, dtype=torch.float64)
    (torch.sqrt(distance) * (1 - torch.eye(classes, dtype=torch.float64)) * 1.7).sum().backward()
    torch.testing.assert_close(model[2].weight.grad.double(), w.grad, rtol=1e-5, atol=1e-6)


def test_one_image_conv_matches_onednn_and_autograd_and_leaves_the_switches_as_they_were():
    """The power-iteration operators run ATen's kernels (train/power.py _OneImageConv): the float32 values of
    oneDNN's convolution, F.conv2d's own gradients (float64, gradcheck), and afterwards oneDNN's switch as it was
    (on or off, also after a failing op) while its precision and determinism settings are never touched."""
    from glorocert.train.power import _one_image_kernels, _OneImageConv

    torch.manual_seed(0)
    x32, w32 = torch.randn(1, 2, 7, 7), torch.randn(4, 2, 4, 4)
    torch.testing.assert_close(_OneImageConv.apply(x32, w32, (2, 2), (1, 1)), F.conv2d(x32, w32, None, (2, 2), (1, 1)))
    x = x32.double().requires_grad_()
    weight = w32.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w: _OneImageConv.apply(a, w, (2, 2), (1, 1)), (x, weight))
    mine = _OneImageConv.apply(x, weight, (2, 2), (1, 1))
    reference = F.conv2d(x, weight, None, (2, 2), (1, 1))
    g = torch.randn_like(mine)
    torch.testing.assert_close(torch.autograd.grad(mine, (x, weight), g), torch.autograd.grad(reference, (x, weight), g))
    cpu = torch.device("cpu")
    enabled, precision = torch.backends.mkldnn.enabled, torch.backends.fp32_precision
    try:
        for start in (True, False):
            torch.backends.mkldnn.enabled = start
            with pytest.raises(RuntimeError), _one_image_kernels(cpu):
                assert not torch.backends.mkldnn.enabled
                F.conv2d(x, weight[:, :1])  # wrong channel count
            assert torch.backends.mkldnn.enabled == start
        torch.backends.mkldnn.enabled = True
        deterministic = torch.backends.mkldnn.deterministic
        torch.backends.fp32_precision = "tf32"
        with _one_image_kernels(cpu):
            pass
        torch.backends.fp32_precision = "ieee"  # oneDNN's convolutions inherit it still: nothing was pinned
        assert torch.backends.mkldnn.conv.fp32_precision == "ieee"
        assert torch.backends.mkldnn.deterministic == deterministic
    finally:
        torch.backends.mkldnn.enabled, torch.backends.fp32_precision = enabled, precision


def test_unknown_layers_are_refused_not_assumed_one_lipschitz():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    with pytest.raises(GlorocertError, match="BatchNorm2d"):
        PowerIteration(model, (1, 8, 8))


# -- losses and the certification rule ---------------------------------------

def test_bottom_logit_follows_the_definition_and_ties_are_not_certified():
    K = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]])
    logits = torch.tensor([[3.0, 1.0, 0.5], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    bottom = losses.bottom_logit(logits, K, 0.5)
    # row 0: j=0, max(1 + 0.5·1, 0.5 + 0.5·2) = 1.5
    torch.testing.assert_close(bottom, torch.tensor([1.5, 1.5, 1.0]))
    predicted, is_bottom = losses.certify_predictions(logits, K, 0.5)
    assert predicted.tolist() == [0, 0, 0]
    assert is_bottom.tolist() == [False, True, True]
    # at ε = 0 a tie is still not certified
    assert losses.certify_predictions(logits, K, 0.0)[1].tolist() == [False, True, True]


def test_gloro_losses_never_use_bottom_as_a_label():
    torch.manual_seed(0)
    logits = torch.randn(8, 4, requires_grad=True)
    labels = torch.randint(0, 4, (8,))
    K = torch.rand(4, 4)
    K = (K + K.T) * (1 - torch.eye(4))
    assert losses.gloro_logits(logits, K, 0.3).shape == (8, 5)
    ce = losses.gloro_cross_entropy(logits, labels, K, 0.3)
    assert ce >= F.cross_entropy(logits, labels) - 1e-6  # an extra class only adds mass
    trades = losses.gloro_trades(logits, labels, K, 0.3, lam=2.0)
    assert trades >= F.cross_entropy(logits, labels) - 1e-6  # KL ≥ 0
    torch.testing.assert_close(losses.gloro_trades(logits, labels, K, 0.3, lam=0.0), F.cross_entropy(logits, labels))
    # without a margin (ε = 0) TRADES' KL still sees the ⊥ logit = the runner-up
    trades.backward()
    assert torch.isfinite(logits.grad).all()


def test_trades_closed_form_equals_the_divergence_it_replaces():
    """gloro_trades computes KL(p ‖ q) as softplus(y_⊥ − LSE(y)); the explicit sum Σ p_i (log p_i − log q_i) over the
    softmaxes of f and f̄ must give the same value and the same gradients (logits and K)."""
    torch.manual_seed(1)
    logits0 = torch.randn(64, 10, dtype=torch.float64) * 4
    top = logits0.argmax(dim=1)
    logits0[:8, (top[:8] + 1) % 10] = logits0[:8].amax(dim=1)  # tied top logits: argmax and max pick among equals
    labels = torch.randint(0, 10, (64,))
    K0 = torch.rand(10, 10, dtype=torch.float64) * 5
    K0 = (K0 + K0.T) * (1 - torch.eye(10, dtype=torch.float64))
    for eps in (0.0, 0.3, 1.58):
        results = []
        for closed in (True, False):
            logits, K = logits0.clone().requires_grad_(), K0.clone().requires_grad_()
            if closed:
                loss = losses.gloro_trades(logits, labels, K, eps, lam=2.0)
            else:
                log_p = F.log_softmax(logits, dim=1)
                log_q = F.log_softmax(losses.gloro_logits(logits, K, eps), dim=1)[:, :-1]
                loss = F.cross_entropy(logits, labels) + 2.0 * (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
            loss.backward()
            results.append((loss.detach(), logits.grad, K.grad))
        for closed, explicit in zip(*results):
            torch.testing.assert_close(closed, explicit, rtol=1e-10, atol=1e-12)


# -- schedules ---------------------------------------------------------------

@pytest.mark.parametrize("kind,names", [("eps", RAMP_SCHEDULES), ("lam", LAMBDA_SCHEDULES), ("lr", LR_SCHEDULES)])
def test_each_known_schedule_parses_to_itself(kind, names):
    for name in names:
        assert parse_schedule(name, kind).name == name


@pytest.mark.parametrize("name", ["linear_from_0.1", "linear_halfway", "Linear", "linear ", "decay_to_1e-6",
                                  "log", "logarithmic_half_x", ""])
def test_unknown_or_prefixed_schedule_names_are_rejected_with_the_valid_list(name):
    with pytest.raises(GlorocertError, match="valid: fixed, linear"):
        parse_schedule(name, "eps")


def test_schedule_values():
    assert parse_schedule("fixed", "eps").ramp(0.0, 0.45) == 0.45
    assert parse_schedule("linear", "lam").ramp(0.5, 2.0) == pytest.approx(1.0)
    assert parse_schedule("linear_half", "lam").ramp(0.75, 2.0) == 2.0
    log = parse_schedule("logarithmic", "eps")
    assert log.ramp(0.0, 1.0) == pytest.approx(0.01)
    assert log.ramp(1.0, 1.0) == pytest.approx(1.0)
    lr = parse_schedule("decay_after_half", "lr")
    assert lr.lr(0.3, 1e-3, 1e-6) == 1e-3
    assert lr.lr(0.75, 1e-3, 1e-6) == pytest.approx(10 ** -4.5)
    assert lr.lr(1.0, 1e-3, 1e-6) == pytest.approx(1e-6)
    with pytest.raises(GlorocertError):
        TrainConfig(lr_schedule="decay_to_1e-6")


# -- the loop ----------------------------------------------------------------

_ROBUST_FIELDS = {f.name for f in dataclasses.fields(RobustSettings)}


def _small_config(**overrides) -> TrainConfig:
    """A small GloRo run; ``overrides`` may name common and robust settings alike."""
    settings = dict(arch="2c2f", loss="gloro", eps=0.3, train_eps=0.45, epochs=3, batch_size=64,
                    lr=3e-3, final_lr=1e-4, seed=0)
    settings.update(overrides)
    robust = {name: settings.pop(name) for name in list(settings) if name in _ROBUST_FIELDS}
    return TrainConfig(robust=RobustSettings(**robust), **settings)


def test_short_gloro_training_improves_vra_over_the_untrained_net(digits_512_256):
    x_train, y_train, x_val, y_val = digits_512_256
    torch.manual_seed(0)
    untrained = build(spec("2c2f", shape=(1, 8, 8)))
    power = PowerIteration(untrained, (1, 8, 8))
    power.converge()
    before = evaluate(untrained, power.margin_lipschitz().detach(), x_val, y_val, 0.3)
    result = train(_small_config(epochs=6, batch_size=32, lr=5e-3), x_train, y_train, x_val, y_val)
    assert result.vra_estimate >= before["vra"] + 0.25
    assert result.clean_acc > 0.5
    assert len(result.history) == 6


class _Interrupt(Exception):
    pass


class _StopAfter:
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch(self, record):
        if record.epoch == self.epoch:
            raise _Interrupt


def test_a_runs_checkpoints_format_each_epoch_once(digits_512_256, tmp_path, monkeypatch):
    """The loop keeps one HistoryText for the run: four epochs, four records formatted (not 1 + 2 + 3 + 4)."""
    from glorocert.train import state as state_files

    x_train, y_train, x_val, y_val = digits_512_256
    formatted, real_jsonable = [], state_files.jsonable

    def jsonable(obj):
        if isinstance(obj, dict) and "loss" in obj:
            formatted.append(obj["epoch"])
        return real_jsonable(obj)

    monkeypatch.setattr(state_files, "jsonable", jsonable)
    train(_small_config(out_dir=str(tmp_path / "run"), epochs=4, eval_every=4), x_train[:128], y_train[:128], x_val, y_val)
    assert formatted == [1, 2, 3, 4]
    assert len((tmp_path / "run" / "log.csv").read_text().splitlines()) == 5


# LiResNet with EMMA, random shifts and a held-out evaluation every 2nd epoch: the augmentation's draws and the
# evaluation schedule (which converges the iterates the next steps start from) must resume bit for bit too.
@pytest.mark.parametrize("loss,extra", [
    ("trades", {}),
    ("emma", {"arch": "liresnet", "depth": 2, "width": 4, "augment_shift": 1, "eval_every": 2}),
])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(digits_512_256, tmp_path, loss, extra):
    x_train, y_train, x_val, y_val = digits_512_256
    x_train, y_train = x_train[:256], y_train[:256]
    config = dict(loss=loss, lam=1.5, epochs=3, eps_schedule="linear_half", activation="minmax", **extra)
    whole = train(_small_config(out_dir=str(tmp_path / "whole"), **config), x_train, y_train, x_val, y_val)
    with pytest.raises(_Interrupt):
        train(_small_config(out_dir=str(tmp_path / "cut"), **config), x_train, y_train, x_val, y_val,
              progress=_StopAfter(1))
    with pytest.raises(GlorocertError, match="--resume"):
        train(_small_config(out_dir=str(tmp_path / "cut"), **config), x_train, y_train, x_val, y_val)
    with pytest.raises(GlorocertError, match="lam"):
        train(_small_config(out_dir=str(tmp_path / "cut"), resume=True, **{**config, "lam": 1.0}),
              x_train, y_train, x_val, y_val)
    resumed = train(_small_config(out_dir=str(tmp_path / "cut"), resume=True, **config),
                    x_train, y_train, x_val, y_val)
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    for key, value in whole.power.iterate_state().items():
        assert torch.equal(value, resumed.power.iterate_state()[key])
    assert [r.loss for r in whole.history] == [r.loss for r in resumed.history]
    with open(tmp_path / "cut" / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"epoch", "loss", "clean_acc", "vra", "bottom_rate", "train_eps", "lam", "lr",
                            "seconds", "lipschitz_estimate"}
    for name in ("model.safetensors", "model.onnx", "model.ts.pt", "card.md", "log.csv"):
        assert (tmp_path / "cut" / name).exists(), name
    loaded, loaded_spec = load_checkpoint(tmp_path / "cut" / "model.safetensors")
    assert loaded_spec["activation"] == "minmax"
    scripted = torch.jit.load(str(tmp_path / "cut" / "model.ts.pt"))
    torch.testing.assert_close(scripted(x_val[:5]), loaded(x_val[:5]))


def test_an_interrupt_between_the_two_halves_of_the_resume_state_loses_nothing(digits_512_256, tmp_path, monkeypatch):
    """The tensors and then the JSON (which holds the tensors' hash) were written one by one: Ctrl-C between
    them left new tensors beside the old JSON, and --resume refused: the run was lost. Now the log and both
    halves appear together, and a pair split by kill -9 between the renames resumes from the tensors' header."""
    x_train, y_train, x_val, y_val = digits_512_256
    x_train, y_train = x_train[:128], y_train[:128]
    config = dict(epochs=3, batch_size=64)
    whole = train(_small_config(out_dir=str(tmp_path / "whole"), **config), x_train, y_train, x_val, y_val)
    interrupt_at_the_second_state_json(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(_small_config(out_dir=str(tmp_path / "cut"), **config), x_train, y_train, x_val, y_val)
    monkeypatch.undo()
    state = json.loads((tmp_path / "cut" / "train_state.json").read_text())
    assert state["epochs_done"] == 1 and len((tmp_path / "cut" / "log.csv").read_text().splitlines()) == 2
    epoch_1 = (tmp_path / "cut" / "train_state.json").read_bytes()
    with pytest.raises(_Interrupt):  # on to epoch 2, then a kill -9 between the renames: epoch 1's JSON comes back
        train(_small_config(out_dir=str(tmp_path / "cut"), resume=True, **config), x_train, y_train, x_val, y_val,
              progress=_StopAfter(2))
    (tmp_path / "cut" / "train_state.json").write_bytes(epoch_1)
    resumed = train(_small_config(out_dir=str(tmp_path / "cut"), resume=True, **config), x_train, y_train, x_val, y_val)
    assert [r.epoch for r in resumed.history] == [1, 2, 3]
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_train_refuses_an_out_dir_holding_a_model_and_resume_of_nothing_creates_nothing(digits_512_256, tmp_path):
    x_train, y_train, x_val, y_val = digits_512_256
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "card.md").write_text("my card")
    with pytest.raises(GlorocertError, match="card.md"):
        train(_small_config(out_dir=str(tmp_path / "mine"), epochs=1), x_train[:64], y_train[:64], x_val, y_val)
    assert (tmp_path / "mine" / "card.md").read_text() == "my card" and len(list((tmp_path / "mine").iterdir())) == 1
    with pytest.raises(GlorocertError, match="nothing to resume"):
        train(_small_config(out_dir=str(tmp_path / "nodir"), resume=True, epochs=1), x_train[:64], y_train[:64], x_val, y_val)
    assert not (tmp_path / "nodir").exists()


def test_standard_training_baseline_runs(digits_512_256):
    x_train, y_train, x_val, y_val = digits_512_256
    result = train(_small_config(loss="ce", epochs=2), x_train, y_train, x_val, y_val)
    assert result.clean_acc > 0.5
    assert all(r.train_eps == 0.0 for r in result.history)


def test_bad_data_is_refused(digits_512_256):
    x_train, y_train, x_val, y_val = digits_512_256
    bad = x_train.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(GlorocertError, match="NaN"):
        train(_small_config(epochs=1), bad, y_train, x_val, y_val)
    with pytest.raises(GlorocertError, match="labels"):
        train(_small_config(epochs=1), x_train, y_train[:10], x_val, y_val)


# -- the GloRo ONNX export ---------------------------------------------------

def numpy_certify(logits: np.ndarray, K: np.ndarray, eps: float) -> np.ndarray:
    """Direct certify rule: pred = first argmax; ⊥ (index C) when min_{i≠j}(y_j − y_i)/K[j,i] ≤ ε."""
    logits = logits.astype(np.float64)
    out = []
    for y in logits:
        j = int(np.argmax(y))
        radius = np.inf
        for i in range(len(y)):
            if i == j:
                continue
            gap = y[j] - y[i]
            radius = min(radius, gap / K[j, i] if K[j, i] > 0 else (np.inf if gap > 0 else 0.0))
        out.append(len(y) if radius <= eps else j)
    return np.array(out)


def test_gloro_onnx_argmax_matches_the_certify_rule(tmp_path):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    onnx_path = export_onnx(model, (1, 3, 4), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    K = rng.uniform(0.5, 2.0, size=(4, 4))
    K = (K + K.T) / 2
    np.fill_diagonal(K, 0)
    eps = 0.2
    out = export_gloro_onnx(onnx_path, K, eps, tmp_path / "gloro.onnx", rounding_rtol=0.0)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = rng.uniform(0, 1, size=(400, 1, 3, 4)).astype(np.float32)
    scores = session.run(None, {"input": x})[0]
    logits = plain.run(None, {"input": x})[0]
    assert scores.shape == (400, 5)
    np.testing.assert_array_equal(scores[:, :4], logits)
    expected = numpy_certify(logits, K, eps)
    np.testing.assert_array_equal(scores.argmax(axis=1), expected)
    assert 0 < (expected == 4).sum() < 400  # both outcomes are exercised


def test_gloro_onnx_ties_go_to_bottom(tmp_path):
    import onnxruntime as ort

    # identity "model": the logits are the input, so ties can be made exactly
    model = nn.Sequential(nn.Flatten()).eval()
    onnx_path = export_onnx(model, (1, 1, 3), tmp_path / "id.onnx")
    K = np.array([[0, 1.0, 1.0], [1.0, 0, 1.0], [1.0, 1.0, 0]])
    out = export_gloro_onnx(onnx_path, K, 0.5, tmp_path / "gloro.onnx", rounding_rtol=0.0)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.array([
        [2.0, 2.0, 0.0],     # tie in the top logits → ⊥
        [1.5, 1.0, 0.0],     # margin 0.5 = ε·K exactly → ⊥ (y_⊥ == y_j)
        [1.6, 1.0, 0.0],     # margin 0.6 > 0.5 → certified class 0
        [0.0, 0.0, 0.0],     # all equal, including 0 → ⊥
        [-3.0, -1.0, -1.5],  # negative logits, margin 0.5 → ⊥
    ], dtype=np.float32)[:, None, None, :]
    scores = session.run(None, {"input": x})[0]
    assert scores.argmax(axis=1).tolist() == [3, 3, 0, 3, 3]
    expected = numpy_certify(x.reshape(5, 3), K, 0.5)
    assert expected.tolist() == [3, 3, 0, 3, 3]


def test_gloro_onnx_applies_certifys_rounding_slack(tmp_path):
    """With the default slack the ONNX argmax is certify's ⊥ rule (glorocert.certify.gloro)."""
    import onnxruntime as ort

    from glorocert.certify import gloro

    model = nn.Sequential(nn.Flatten()).eval()
    onnx_path = export_onnx(model, (1, 1, 4), tmp_path / "id.onnx")
    rng = np.random.default_rng(1)
    K = rng.uniform(0.5, 2.0, size=(4, 4))
    np.fill_diagonal(K, 0)
    eps = 0.25
    out = export_gloro_onnx(onnx_path, K, eps, tmp_path / "gloro.onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = rng.normal(size=(2000, 4)).astype(np.float32) * 3
    # samples right at the boundary: margin to class 1 exactly ε·K (± far less than the slack)
    j = y.argmax(axis=1)
    y[:200, 1] = (y[np.arange(200), j[:200]] - eps * K[j[:200], 1] + 1e-7).astype(np.float32)
    y[:200, 1] = np.where(j[:200] == 1, y[:200, 0], y[:200, 1])
    scores = session.run(None, {"input": y[:, None, None, :]})[0]
    predicted, _, _, radius = gloro.radii(y, K)
    bottom = gloro.bottom_flags(radius, eps)
    expected = np.where(bottom, 4, predicted)
    np.testing.assert_array_equal(scores.argmax(axis=1), expected)
    assert 0 < bottom.sum() < len(bottom)


def test_gloro_onnx_refuses_a_mismatched_margin_matrix(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 4)).eval()
    onnx_path = export_onnx(model, (1, 1, 3), tmp_path / "m.onnx")
    with pytest.raises(GlorocertError, match="margin matrix"):
        export_gloro_onnx(onnx_path, np.zeros((3, 3)), 0.1, tmp_path / "g.onnx")
    with pytest.raises(GlorocertError, match="non-negative"):
        export_gloro_onnx(onnx_path, -np.ones((4, 4)), 0.1, tmp_path / "g.onnx")


def test_trained_model_gloro_onnx_matches_certify_rows_and_bound_exceeds_estimate(digits_512_256, tmp_path):
    """End to end: train → frozen sound bound → GloRo ONNX; ORT argmax == `certify`'s rows."""
    import onnxruntime as ort

    from glorocert import api
    from glorocert.data import open_dataset
    from glorocert.lipschitz.boundfile import Bound
    from glorocert.results import eps_key

    x_train, y_train, x_val, y_val = digits_512_256
    out = tmp_path / "run"
    result = train(_small_config(epochs=4, batch_size=32, lr=5e-3, activation="minmax", data="digits",
                                 out_dir=str(out)), x_train, y_train, x_val, y_val)
    bound = Bound.load(out / "model.onnx.bound.json")
    # the frozen sound margin matrix can never be below the training-time power-iteration estimate
    assert np.all(bound.margin_matrix >= result.margin_lipschitz_estimate * (1 - 1e-6))
    assert result.vra_sound is not None and result.vra_sound <= result.vra_estimate

    model = api.load(out / "model.onnx")
    eps = 0.3
    dataset = open_dataset("digits", split="test")
    certified = api.certify(model, dataset, [eps])  # finds model.onnx.bound.json by itself
    assert certified.summary["bound_file"] == str(out / "model.onnx.bound.json")
    rows = certified.rows
    gloro_path = export_gloro_onnx(out / "model.onnx", bound.margin_matrix, eps, tmp_path / "gloro.onnx",
                                   rounding_rtol=model.rounding_rtol)
    session = ort.InferenceSession(str(gloro_path), providers=["CPUExecutionProvider"])
    x = np.concatenate([b.x for b in dataset.batches(512)])
    argmax = session.run(None, {"input": x})[0].argmax(axis=1)
    expected = np.where(rows[f"bottom@{eps_key(eps)}"], 10, rows["predicted"])
    np.testing.assert_array_equal(argmax, expected)
    assert 0 < (argmax == 10).sum() < len(argmax)

    # the card's sound VRA is exactly what `glorocert certify` reports on the held-out samples
    np.savez(tmp_path / "held_out.npz", x=x_val.numpy(), y=y_val.numpy())
    summary = api.certify(model, open_dataset(tmp_path / "held_out.npz"), [eps]).summary
    assert summary["vra"][eps_key(eps)] == pytest.approx(result.vra_sound, abs=0)
