"""`glorocert train --method gaussian|macer`: randomized-smoothing base models (issue 5, item 3).

Small, seeded, CPU-only on sklearn's 8×8 digits; each test takes seconds.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from typer.testing import CliRunner

from glorocert.cli import app
from glorocert.data import open_dataset
from glorocert.errors import GlorocertError
from glorocert.train import losses
from glorocert.train import RobustSettings, SmoothingSettings, TrainConfig, evaluate_noisy, train
from glorocert.zoo import build, read_checkpoint_metadata


def _tensors(split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = open_dataset("digits", split=split, limit=limit)
    xs, ys = zip(*[(b.x, b.y) for b in dataset.batches(4096)])
    x = torch.tensor(np.concatenate(xs), dtype=torch.float32)
    if x.ndim == 3:
        x = x[:, None]
    return x, torch.tensor(np.concatenate(ys), dtype=torch.int64)


@pytest.fixture(scope="module")
def builtin_digits():
    """The built-in digits splits: the first 512 of train, the first 256 of test."""
    x_train, y_train = _tensors("train", 512)
    x_val, y_val = _tensors("test", 256)
    assert x_train.shape[1:] == (1, 8, 8) and float(x_train.max()) <= 1.0
    return x_train, y_train, x_val, y_val


def _config(method: str, sigma: float = 0.25, macer_k: int = 16, **overrides) -> TrainConfig:
    settings = {"arch": "2c2f", "epochs": 3, "batch_size": 64, "lr": 3e-3, "seed": 0}
    settings.update(overrides)
    return TrainConfig(method=method, smoothing=SmoothingSettings(sigma=sigma, macer_k=macer_k), **settings)


def test_gaussian_training_makes_the_base_model_accurate_under_noise(builtin_digits):
    x_train, y_train, x_val, y_val = builtin_digits
    config = _config("gaussian")
    result = train(config, x_train, y_train, x_val, y_val)
    torch.manual_seed(config.seed)
    untrained = build(result.spec)  # the same initialisation the run started from
    before = evaluate_noisy(untrained, x_val, y_val, config.smoothing.sigma, config.seed)["noisy_acc"]
    assert result.noisy_acc == pytest.approx(result.history[-1].noisy_acc)
    assert result.noisy_acc > before + 0.3, (before, result.noisy_acc)
    assert result.vra_estimate is None and all(r.vra is None for r in result.history)
    # seeded: the same run again gives the same weights
    again = train(config, x_train, y_train, x_val, y_val)
    for (name, a), (_, b) in zip(result.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_macer_runs_and_its_loss_is_finite_and_decreases(builtin_digits):
    x_train, y_train, x_val, y_val = builtin_digits
    result = train(_config("macer", macer_k=4, epochs=4), x_train[:256], y_train[:256], x_val, y_val)
    curve = [r.loss for r in result.history]
    assert all(np.isfinite(curve)), curve
    assert curve[-1] < curve[0], curve
    assert 0.0 <= result.noisy_acc <= 1.0


def test_macer_robustness_term_vanishes_beyond_gamma_and_is_positive_inside():
    sigma, beta, gamma, lam = 0.5, 1.0, 1.0, 3.0
    labels = torch.tensor([0, 1])
    # k = 2 identical copies; class 0 (resp. 1) far ahead: ξ ≈ 2.04 > γ for both samples
    far = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])[:, None, :].repeat(1, 2, 1)
    total, classification, robustness = losses.macer_loss(far, labels, sigma, beta, gamma, lam, return_parts=True)
    assert float(robustness) == 0.0
    expected_ce = -torch.log(F.softmax(far, dim=2).mean(dim=1)[[0, 1], labels]).mean()
    assert float(classification) == pytest.approx(float(expected_ce), rel=1e-6)
    assert float(total) == pytest.approx(float(classification))

    # sample 0 close: p = softmax([0.5, 0, 0]), ξ = Φ⁻¹(p_0) − Φ⁻¹(p_1) ∈ (0, γ); sample 1 still far
    near = far.clone()
    near[0] = torch.tensor([0.5, 0.0, 0.0])
    _, _, robustness = losses.macer_loss(near, labels, sigma, beta, gamma, lam, return_parts=True)
    p = F.softmax(torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64), dim=0).numpy()
    xi = norm.ppf(p[0]) - norm.ppf(p[1])
    assert 0 < xi < gamma
    assert float(robustness) > 0
    assert float(robustness) == pytest.approx(lam * sigma / 2 * (gamma - xi) / 2, rel=1e-5)

    # a misclassified sample (smoothed top-1 ≠ label) gets no robustness loss, only classification
    wrong = near.clone()
    wrong[0] = torch.tensor([0.0, 0.5, 0.0])
    _, _, robustness = losses.macer_loss(wrong, labels, sigma, beta, gamma, lam, return_parts=True)
    assert float(robustness) == 0.0

    # probabilities of exactly 0/1 (huge β) stay finite, with finite gradients
    logits = torch.tensor([[[30.0, 0.0, 0.0], [0.0, 0.1, 0.0]]], requires_grad=True)
    loss = losses.macer_loss(logits, torch.tensor([0]), 0.25, beta=16.0, gamma=8.0, lam=12.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_gaussian_resume_gives_the_same_weights(builtin_digits, tmp_path):
    x_train, y_train, x_val, y_val = builtin_digits
    x_train, y_train = x_train[:192], y_train[:192]

    class Stop(Exception):
        pass

    class StopAfterFirst:
        def on_epoch(self, record):
            if record.epoch == 1:
                raise Stop

    whole = train(_config("gaussian", out_dir=str(tmp_path / "whole")), x_train, y_train, x_val, y_val)
    with pytest.raises(Stop):
        train(_config("gaussian", out_dir=str(tmp_path / "cut")), x_train, y_train, x_val, y_val,
              progress=StopAfterFirst())
    with pytest.raises(GlorocertError, match="sigma"):
        train(_config("gaussian", sigma=0.5, out_dir=str(tmp_path / "cut"), resume=True),
              x_train, y_train, x_val, y_val)
    resumed = train(_config("gaussian", out_dir=str(tmp_path / "cut"), resume=True),
                    x_train, y_train, x_val, y_val)
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert [r.loss for r in whole.history] == [r.loss for r in resumed.history]
    card = (tmp_path / "whole" / "card.md").read_text()
    assert "smoothing base model" in card and "VRA at" not in card
    assert resumed.power is None and not (tmp_path / "cut" / "model.onnx.bound.json").exists()


def test_unknown_method_is_rejected_with_a_clear_error(tmp_path):
    with pytest.raises(GlorocertError, match=r"unknown method 'smooth'; valid: gloro, bcp, kw, gaussian, macer"):
        TrainConfig(method="smooth")
    with pytest.raises(GlorocertError, match="sigma"):
        TrainConfig(method="gaussian", smoothing=SmoothingSettings(sigma=0.0))
    with pytest.raises(GlorocertError, match="method macer takes smoothing settings, not RobustSettings"):
        TrainConfig(method="macer", robust=RobustSettings())
    result = CliRunner().invoke(app, ["train", "--data", "digits", "--method", "smooth", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert "unknown method 'smooth'" in str(result.exception) + result.output
    assert not (tmp_path / "x").exists()
    result = CliRunner().invoke(app, ["train", "--data", "digits", "--out", str(tmp_path / "y")])
    assert result.exit_code != 0
    assert "--eps is required" in str(result.exception) + result.output


def test_cli_gaussian_writes_onnx_and_a_smoothing_card(tmp_path):
    out = tmp_path / "base"
    args = ["train", "--data", "digits", "--method", "gaussian", "--sigma", "0.25", "--epochs", "1",
            "--batch-size", "64", "--limit", "256", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    for name in ("model.safetensors", "model.onnx", "model.ts.pt", "card.md", "log.csv"):
        assert (out / name).exists(), name
    card = (out / "card.md").read_text()
    assert "smoothing base model" in card
    assert "not a GloRo net" in card
    assert "glorocert train --method gaussian --sigma 0.25" in card
    assert "noisy inputs" in card and "VRA at" not in card
    with open(out / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    assert "vra" not in rows[0] and "bottom_rate" not in rows[0]
    assert 0.0 <= float(rows[0]["noisy_acc"]) <= 1.0

    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": np.zeros((2, 1, 8, 8), dtype=np.float32)})[0]
    assert logits.shape == (2, 10)
    # the final figures (card, checkpoint record) are the last epoch's: same weights, same noise
    meta = read_checkpoint_metadata(out / "model.safetensors")
    assert json.loads(meta["noisy_acc"]) == pytest.approx(float(rows[0]["noisy_acc"]), abs=1e-6)
    assert meta["model_kind"] == "randomized-smoothing base model"
    assert f"**{100 * float(rows[0]['noisy_acc']):.2f}%**" in card
    assert not (out / "model.onnx.bound.json").exists()
