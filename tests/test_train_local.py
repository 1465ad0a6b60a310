"""`glorocert train --method bcp|kw`: the local certifiers' training objectives.

The objective must be the certifier's own bound (same numbers, with gradients),
its gradient must be the derivative of that bound, and training with it must
produce models the certifier certifies — soundly (PGD finds nothing inside).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from glorocert.certify import bcp, kw, local
from glorocert.cli import app
from glorocert.errors import GlorocertError
from glorocert.lipschitz.compose import compose
from glorocert.train import local_losses
from glorocert.train import RobustSettings, SmoothingSettings, TrainConfig, command_line, train
from glorocert.train.config import METHOD_SCHEDULES
from glorocert.train.power import PowerIteration
from glorocert.zoo import build
from helpers import digits_split, pgd_margin, run_main


@pytest.fixture(scope="module")
def digits_600_240():
    """sklearn's 8×8 digits in [0, 1]: 600 train / 240 held-out samples."""
    return digits_split(600, 240)


def small_net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    spec = {"arch": "2c2f", "activation": "relu", "input_shape": [1, 8, 8], "num_classes": 10}
    model = build(spec).to(dtype)
    with torch.no_grad():  # non-zero biases, so that every term of the bounds is exercised
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    return model


# --------------------------------------------------------------------------- the objective is the certifier's bound


def test_bcp_objective_with_guaranteed_norms_equals_the_certifier(digits_600_240):
    model = small_net().double()
    graph = local_losses.live_graph(model, (1, 8, 8))
    x, y = digits_600_240[0][:40].double(), digits_600_240[1][:40]
    composition = compose(graph)
    upper = {b.name: b.upper for b in composition.blocks}
    trained = bcp.training_lower_bounds(graph, x, y, 0.3, block_norm=lambda b: upper[b.name],
                                        margin=torch.tensor(composition.margin_upper))
    certified = bcp.lower_bounds(graph, x, y, 0.3, composition=composition)
    finite = torch.isfinite(certified)
    assert torch.equal(finite, torch.isfinite(trained))
    assert torch.allclose(trained[finite], certified[finite], rtol=1e-9, atol=1e-9)


def test_kw_objective_in_float32_matches_the_float64_certifier(digits_600_240):
    model = small_net()
    graph = local_losses.live_graph(model, (1, 8, 8))
    x, y = digits_600_240[0][:40], digits_600_240[1][:40]
    trained = kw.training_lower_bounds(graph, x, y, 0.2)
    certified = kw.lower_bounds(graph, x, y, 0.2)
    finite = torch.isfinite(certified)
    assert torch.equal(finite, torch.isfinite(trained))
    scale = certified[finite].abs().max()
    assert (trained[finite].double() - certified[finite]).abs().max() <= 1e-4 * scale


def test_bcp_training_bounds_use_the_power_iteration_estimates(digits_600_240):
    """With estimates (≤ the true norms) the training bound can only be looser-or-equal to the sound
    one's complement: it is ≥ the certified bound, never used to certify."""
    model = small_net()
    power = PowerIteration(model, (1, 8, 8))
    power.converge()
    graph = local_losses.live_graph(model, (1, 8, 8))
    x, y = digits_600_240[0][:40], digits_600_240[1][:40]
    trained = local_losses.lower_bounds("bcp", graph, power, x, y, 0.3).double()
    certified = bcp.lower_bounds(graph, x, y, 0.3)
    finite = torch.isfinite(certified)
    assert (trained[finite] >= certified[finite] - 1e-4 * certified[finite].abs().max()).all()


@pytest.mark.parametrize("method", ["bcp", "kw"])
def test_gradient_is_the_derivative_of_the_bound(method, digits_600_240):
    """Directional derivative of the summed bounds along a random weight direction vs central differences.

    BCP's value is the Lagrange dual at the loop's multiplier t* (computed without gradients):
    by the envelope theorem its gradient is the optimum's — this checks that claim numerically.
    """
    model = small_net(seed=3).double()
    graph = local_losses.live_graph(model, (1, 8, 8))
    x, y = digits_600_240[0][:16].double(), digits_600_240[1][:16]
    composition = compose(graph)  # fixed norms: their own derivative is autograd's business, not the bound's
    upper = {b.name: b.upper for b in composition.blocks}
    margin = torch.tensor(composition.margin_upper)

    def objective():
        if method == "kw":
            lower = kw.training_lower_bounds(graph, x, y, 0.1)
        else:
            lower = bcp.training_lower_bounds(graph, x, y, 0.1, block_norm=lambda b: upper[b.name], margin=margin)
        return torch.where(torch.isfinite(lower), lower, torch.zeros_like(lower)).sum()

    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    value = objective()
    grads = torch.autograd.grad(value, params)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction)).item()
    h = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        up = objective().item()
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        down = objective().item()
        for p, d in zip(params, direction):
            p.add_(h * d)
    numeric = (up - down) / (2 * h)
    assert abs(analytic - numeric) <= 1e-4 * max(1.0, abs(numeric)), (analytic, numeric)


def test_robust_cross_entropy_is_the_cross_entropy_of_the_worst_translated_logits():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    lower = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    lower[torch.arange(7), labels] = math.inf
    worst = logits.gather(1, labels[:, None]) - lower  # z̲_i = z_y − m_i
    worst[torch.arange(7), labels] = logits[torch.arange(7), labels]
    assert torch.allclose(local_losses.robust_cross_entropy(lower), F.cross_entropy(worst, labels))
    mixed = local_losses.mixed_loss(logits, labels, lower, 0.25)
    assert torch.allclose(mixed, 0.75 * F.cross_entropy(logits, labels) + 0.25 * F.cross_entropy(worst, labels))


def test_bcp_worst_case_gradient_is_finite_when_the_box_binds_everywhere():
    """t* = inf (every coordinate clipped): the value is the box bound and gradients stay finite."""
    c = torch.tensor([[1.0, -2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    z = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    lo, hi = torch.full((1, 3), -0.1, dtype=torch.float64), torch.full((1, 3), 0.1, dtype=torch.float64)
    result = bcp.worst_case(c, z, torch.tensor([10.0], dtype=torch.float64), lo, hi)
    assert torch.isclose(result.value, bcp.box_bound(c, lo, hi)).all()
    result.value.sum().backward()
    assert torch.isfinite(c.grad).all() and torch.isfinite(z.grad).all()


# --------------------------------------------------------------------------- configuration


def _schedules(config: TrainConfig) -> tuple[str, str]:
    return config.robust.eps_schedule, config.robust.lam_schedule


def test_method_defaults_follow_the_papers():
    assert _schedules(TrainConfig(method="bcp")) == METHOD_SCHEDULES["bcp"]
    assert _schedules(TrainConfig(method="kw")) == ("linear_half", "fixed")
    assert _schedules(TrainConfig()) == ("fixed", "linear")
    assert TrainConfig(method="bcp", robust=RobustSettings(eps_schedule="fixed")).robust.eps_schedule == "fixed"
    assert TrainConfig(method="kw", robust=RobustSettings(eps=0.2)).robust.train_eps == 0.2  # train_eps defaults to eps


@pytest.mark.parametrize("kwargs, robust, message", [
    ({"method": "bcp", "activation": "minmax"}, {}, "ReLU"),
    ({"method": "kw"}, {"lam": 2.0}, "κ"),
    ({"method": "bcp"}, {"loss": "ce"}, "--loss ce is for --method gloro"),
    ({"method": "kw"}, {"loss": "trades"}, "--loss trades is for --method gloro"),
])
def test_invalid_local_configs_are_refused(kwargs, robust, message):
    with pytest.raises(GlorocertError, match=message):
        TrainConfig(**kwargs, robust=RobustSettings(**robust))


def test_a_config_section_of_another_method_is_refused():
    with pytest.raises(GlorocertError, match="method bcp takes robust settings, not SmoothingSettings"):
        TrainConfig(method="bcp", smoothing=SmoothingSettings())


def test_command_line_spells_out_the_method():
    line = command_line(TrainConfig(method="bcp", robust=RobustSettings(eps=0.3), data="digits", out_dir="out"))
    assert "--method bcp" in line and "--lam-schedule linear_half" in line and "--loss" not in line


# --------------------------------------------------------------------------- training end to end


@pytest.fixture(scope="module")
def trained(digits_600_240, tmp_path_factory):
    x, y, xv, yv = digits_600_240
    runs = {}
    for method, epochs, held_out in (("ce", 6, 240), ("bcp", 6, 240), ("kw", 4, 120)):  # exact KW bounds are slow
        out = tmp_path_factory.mktemp(method)
        config = TrainConfig(method="gloro" if method == "ce" else method,
                             robust=RobustSettings(loss="ce" if method == "ce" else "gloro", eps=0.3),
                             epochs=epochs, batch_size=50, lr=3e-3, final_lr=1e-4, out_dir=str(out),
                             eval_batch_size=120)
        runs[method] = (train(config, x, y, xv[:held_out], yv[:held_out]), out)
    return runs


def _vra(module, result, xv, yv, eps=0.3):
    from glorocert.loaders import load

    loaded = load(str(result[1] / "model.onnx"))
    predicted = torch.from_numpy(loaded.runner(xv.numpy()).argmax(1))
    return float((module.certify(loaded.graph, xv, predicted, eps) & (predicted == yv)).float().mean()), loaded


def test_training_for_a_certifier_beats_standard_training_under_it(trained, digits_600_240):
    xv, yv = digits_600_240[2], digits_600_240[3]
    vra_bcp_ce, _ = _vra(bcp, trained["ce"], xv, yv)
    vra_bcp, _ = _vra(bcp, trained["bcp"], xv, yv)
    assert vra_bcp > vra_bcp_ce + 0.15
    assert trained["bcp"][0].vra_local_sound == pytest.approx(vra_bcp)
    vra_kw_ce, _ = _vra(kw, trained["ce"], xv[:120], yv[:120])
    vra_kw, _ = _vra(kw, trained["kw"], xv[:120], yv[:120])
    assert vra_kw > vra_kw_ce + 0.1
    assert trained["kw"][0].vra_local_sound == pytest.approx(vra_kw)


@pytest.mark.parametrize("method", ["bcp", "kw"])
def test_certified_samples_of_trained_models_resist_pgd(method, trained, digits_600_240):
    xv, yv = digits_600_240[2][:60], digits_600_240[3][:60]
    module = {"bcp": bcp, "kw": kw}[method]
    _, loaded = _vra(module, trained[method], xv, yv)
    predicted = torch.from_numpy(loaded.runner(xv.numpy()).argmax(1))
    certified = module.certify(loaded.graph, xv, predicted, 0.3)
    assert certified.sum() >= 5
    graph = loaded.graph
    margins = pgd_margin(lambda v: graph.forward(v), xv[certified].double(), predicted[certified], 0.3,
                         steps=40, restarts=2)
    assert (margins > 0).all()


def test_cards_and_logs_name_the_method(trained):
    for method in ("bcp", "kw"):
        result, out = trained[method]
        card = (out / "card.md").read_text()
        assert f"--method {method}" in card
        assert f"({method.upper()}, sound local bounds)" in card
        assert result.history[-1].train_eps == pytest.approx(0.3)  # linear_half reached the target
    assert trained["bcp"][0].history[-1].lam == pytest.approx(1.0)
    assert trained["kw"][0].history[0].lam == pytest.approx(1.0)  # KW: the robust loss alone from the start


class _Interrupt(Exception):
    pass


class _StopAfterFirstEpoch:
    def on_epoch(self, record):
        raise _Interrupt


def test_bcp_training_resumes_to_the_same_weights(digits_600_240, tmp_path):
    x, y, xv, yv = digits_600_240
    x, y, xv, yv = x[:200], y[:200], xv[:100], yv[:100]
    settings = dict(method="bcp", robust=RobustSettings(eps=0.3), epochs=2, batch_size=100, eval_batch_size=100)
    whole = train(TrainConfig(**settings, out_dir=str(tmp_path / "whole")), x, y, xv, yv)
    with pytest.raises(_Interrupt):
        train(TrainConfig(**settings, out_dir=str(tmp_path / "cut")), x, y, xv, yv, progress=_StopAfterFirstEpoch())
    with pytest.raises(GlorocertError, match=r"cannot resume with different settings: method \(was 'bcp', now 'kw'\)"):
        train(TrainConfig(**{**settings, "method": "kw"}, out_dir=str(tmp_path / "cut"), resume=True), x, y, xv, yv)
    resumed = train(TrainConfig(**settings, out_dir=str(tmp_path / "cut"), resume=True), x, y, xv, yv)
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert [r.loss for r in whole.history] == [r.loss for r in resumed.history]


def test_cli_train_bcp_on_digits(tmp_path, monkeypatch, capsys):
    result = CliRunner().invoke(app, ["train", "--method", "bcp", "--data", "digits", "--eps", "0.3", "--epochs", "1",
                                      "--limit", "200", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "BCP, sound local bounds" in result.output
    code, _, err = run_main(monkeypatch, capsys, "train", "--method", "kw", "--activation", "minmax", "--data", "digits",
                            "--eps", "0.3", "--out", tmp_path / "n")
    assert code == 2 and "ReLU" in err and not (tmp_path / "n").exists()
    code, _, err = run_main(monkeypatch, capsys, "train", "--method", "bcp", "--data", "digits", "--out", tmp_path / "n")
    assert code == 2 and "--eps is required" in err


# --------------------------------------------------------------------------- the conv adjoint both objectives rest on


@pytest.mark.parametrize("stride, kernel, padding, dilation, groups, size", [
    (s, k, p, d, g, h)
    for s in (1, 2, 3) for k in (1, 3, 4) for p in ((0, 0, 0, 0), (1, 1, 1, 1), (0, 1, 2, 0))
    for d in (1, 2) for g in (1, 2) for h in (7, 8)
])
def test_conv_adjoint_equals_autograd(stride, kernel, padding, dilation, groups, size):
    """local.adjoint (transposed conv, cropped) is exactly Wᵀ, output_padding and odd padding included."""
    from glorocert.graph import Conv2d

    gen = torch.Generator().manual_seed(0)
    op = Conv2d(torch.randn(4, 4 // groups, kernel, kernel, generator=gen, dtype=torch.float64), None,
                (stride, stride), padding, (dilation, dilation), groups)
    out = op.forward(torch.zeros(1, 4, size, size, dtype=torch.float64))  # the widest kernel (7) still fits
    v = torch.randn(3, *out.shape[1:], generator=gen, dtype=torch.float64)
    x = torch.randn(3, 4, size, size, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(op.homogeneous(x), x, grad_outputs=v)
    assert torch.allclose(local.adjoint(op, v, (4, size, size)), expected, atol=1e-10)


def test_a_network_too_wide_for_exact_kw_bounds_is_refused_before_anything_is_written(tmp_path):
    x = torch.rand(8, 1, 28, 28)
    y = torch.arange(8) % 2
    out = tmp_path / "wide"
    with pytest.raises(GlorocertError, match="too large for exact KW bounds"):
        train(TrainConfig(method="kw", arch="4c3f", robust=RobustSettings(eps=0.3), epochs=1, out_dir=str(out)), x, y, x, y)
    assert not out.exists()


def test_certifying_a_live_graph_never_reuses_a_plan_from_before_the_weights_moved(digits_600_240):
    model = small_net()
    graph = local_losses.live_graph(model, (1, 8, 8))
    x, y = digits_600_240[0][:30], digits_600_240[1][:30]
    before = bcp.lower_bounds(graph, x, y, 0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    after = bcp.lower_bounds(graph, x, y, 0.1)
    fresh = bcp.lower_bounds(local_losses.live_graph(model, (1, 8, 8)), x, y, 0.1)
    finite = torch.isfinite(fresh)
    assert torch.equal(after[finite], fresh[finite]) and not torch.equal(before[finite], after[finite])


def test_final_kw_figures_cover_the_whole_held_out_split(digits_600_240):
    x, y, xv, yv = digits_600_240
    assert len(yv) > local_losses.KW_EVAL_SAMPLES
    result = train(TrainConfig(method="kw", robust=RobustSettings(eps=0.1), epochs=1, batch_size=100), x[:100], y[:100], xv, yv)
    with torch.no_grad():
        expected = float((result.model(xv).argmax(1) == yv).float().mean())
    assert result.clean_acc == pytest.approx(expected)
