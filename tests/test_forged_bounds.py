"""A bound file is checked, not trusted (issue 15): forged, zero, non-finite and corrupt bounds are refused.

``content_sha256`` is an unkeyed checksum: anyone who edits a number can recompute it (``reseal`` below
does exactly what an attacker would). What stands between a forged file and a false certificate:

* on load, the relations every honestly computed file satisfies (upper ≥ estimate for every block, the
  global bound and every K[j][i]; K symmetric with a zero diagonal; K ≤ √2·L; with the √2·L margin
  rule, K = √2·L) — tested on every shipped bound and on bounds computed here, and against forgeries;
* during certification, every K[j][i] ≥ the difference quotients of y_j − y_i observed on the batch;
* ``--verify-bound``: the bound recomputed from the model.

Every refusal of a bound file ends with the command that recomputes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from glorocert.api import (
    Bound, Normalization, certify, certify_locally_at, compute_bound, default_path, from_arrays, load, resolve_bound,
    verify_bound,
)
from glorocert.errors import GlorocertError
from helpers import SUPPORTED_KINDS, make_model, run_main, save_as, save_onnx

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "models").glob("*/model.onnx.bound.json"))
GOLDEN = sorted((ROOT / "tests" / "golden").rglob("*.bound.json"))
MNIST_MODEL = ROOT / "models" / "mnist-5k-eps0.3" / "model.onnx"


def reseal(body: dict) -> dict:
    """What a forger does after editing: recompute the (unkeyed) checksum. Written out, not the code under test."""
    rest = {k: v for k, v in body.items() if k != "content_sha256"}
    body["content_sha256"] = hashlib.sha256(json.dumps(rest, sort_keys=True, default=float).encode()).hexdigest()
    return body


def forge(source: Path, target: Path, edit) -> Path:
    body = json.loads(Path(source).read_text())
    edit(body)
    target.write_text(json.dumps(reseal(body)))
    return target


def scaled(body: dict, factor: float, keys=("global_upper", "margin_upper")) -> None:
    for key in keys:
        if key == "blocks":
            for block in body["blocks"]:
                block["estimate"] *= factor
                block["upper"] *= factor
        elif isinstance(body[key], list):
            body[key] = [[v * factor for v in row] for row in body[key]]
        else:
            body[key] *= factor


EVERYTHING = ("blocks", "global_estimate", "global_upper", "margin_estimate", "margin_upper")


def command(model_path, *extra) -> str:
    return "`" + " ".join(["glorocert", "bound", str(model_path), *map(str, extra)]) + "`"


def recompute_hint(model_path, *extra) -> str:
    return "recompute it with " + command(model_path, *extra)


# --------------------------------------------------------------------------- 1a: checks on load


def test_the_forgery_of_the_issue_is_refused_on_load(tmp_path):
    """global_upper and margin_upper ÷ 10, checksum recomputed: the upper bound falls below the file's own estimate."""
    path = forge(default_path(MNIST_MODEL), tmp_path / "forged.json", lambda b: scaled(b, 0.1))
    with pytest.raises(GlorocertError, match="below its own power-iteration estimate") as refused:
        Bound.load(path)
    assert "recompute it with `glorocert bound" in str(refused.value)


@pytest.mark.parametrize("edit", ["block_upper", "one_margin_entry", "global_upper_alone"])
def test_an_upper_bound_below_its_own_estimate_is_refused(tmp_path, edit):
    def apply(body):
        if edit == "block_upper":
            body["blocks"][1]["upper"] = body["blocks"][1]["estimate"] * 0.9
        elif edit == "one_margin_entry":
            body["margin_upper"][2][7] = body["margin_estimate"][2][7] * 0.9
            body["margin_upper"][7][2] = body["margin_upper"][2][7]
        else:
            body["global_upper"] = body["global_estimate"] * 0.9

    path = forge(default_path(MNIST_MODEL), tmp_path / "forged.json", apply)
    with pytest.raises(GlorocertError, match="below its own power-iteration estimate"):
        Bound.load(path)


def test_a_margin_matrix_above_sqrt2_times_the_global_bound_is_refused(tmp_path):
    """K[j][i] ≤ ‖W_j − W_i‖·L' ≤ √2‖W‖·L' = √2·L: a global bound lowered (with its estimate) contradicts the margins."""
    path = forge(default_path(MNIST_MODEL), tmp_path / "forged.json",
                 lambda b: scaled(b, 0.1, ("global_upper", "global_estimate")))
    with pytest.raises(GlorocertError, match="√2"):
        Bound.load(path)


def test_a_sqrt2_margin_matrix_below_sqrt2_times_the_global_bound_is_refused(tmp_path):
    """With the √2·L rule the margins are tied to the global bound from below too."""
    bound = compute_bound(load(save_as(make_model("ends_with_relu"), "onnx", tmp_path)))
    assert bound.margin_method == "sqrt2-global"
    path = forge(bound.save(tmp_path / "honest.json"), tmp_path / "forged.json",
                 lambda b: scaled(b, 0.5, ("margin_upper", "margin_estimate")))
    with pytest.raises(GlorocertError, match="√2"):
        Bound.load(path)


def test_an_asymmetric_margin_matrix_is_refused(tmp_path):
    def apply(body):
        body["margin_upper"][2][7] *= 0.5
        body["margin_estimate"][2][7] *= 0.5

    path = forge(default_path(MNIST_MODEL), tmp_path / "forged.json", apply)
    with pytest.raises(GlorocertError, match="symmetric"):
        Bound.load(path)


@pytest.mark.parametrize("path", SHIPPED + GOLDEN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_bound_passes_the_checks(path):
    Bound.load(path)


@pytest.mark.parametrize("kind", SUPPORTED_KINDS)
def test_every_honestly_computed_bound_passes_the_checks(tmp_path, kind):
    model = load(save_as(make_model(kind, seed=3), "onnx", tmp_path, kind))
    variants = [dict(), dict(mode="estimate"), dict(exact_side=0), dict(mode="estimate", tol=1e-2, max_iter=3),
                dict(normalization=Normalization.of(0.3, 0.25))]
    for k, options in enumerate(variants):
        bound = compute_bound(model, **options)
        assert Bound.load(bound.save(tmp_path / f"{k}.json")) == bound


# --------------------------------------------------------------------------- 1b: observed slopes during certification


def test_a_consistently_forged_bound_passes_the_file_checks_but_certify_refuses_it(monkeypatch, capsys, tmp_path):
    """Every number ÷ 10 (estimates too): consistent, so the file alone cannot tell; the observed slopes can."""
    path = forge(default_path(MNIST_MODEL), tmp_path / "forged.json", lambda b: scaled(b, 0.1, EVERYTHING))
    Bound.load(path)
    rows, summary = tmp_path / "rows.csv", tmp_path / "summary.json"
    code, _, err = run_main(monkeypatch, capsys, "certify", MNIST_MODEL, "--bound", path, "--data", "mnist-5k",
                            "--limit", "256", "--out", rows, "--summary", summary)
    assert code == 2, err
    assert "provably too low" in err and "rows " in err and "K[" in err
    assert recompute_hint(MNIST_MODEL, "--out", path) in err
    assert not rows.exists() and not summary.exists()


def linear_classifier(tmp_path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    return save_onnx(module, tmp_path / f"linear-{seed}.onnx")


def slope_attaining_pairs(model, count: int = 40, step: float = 0.35) -> np.ndarray:
    """Pairs (x, x + step·u) with u the unit direction of W_j − W_i: y_j − y_i changes by exactly ‖W_j − W_i‖·step."""
    weight = next(n.op.weight for n in model.graph.nodes if hasattr(n.op, "weight")).double().numpy()
    rng = np.random.default_rng(0)
    xs = []
    for k in range(count):
        j, i = rng.choice(10, size=2, replace=False)
        u = (weight[j] - weight[i]) / np.linalg.norm(weight[j] - weight[i])
        x = 0.5 + rng.uniform(-0.1, 0.1, 64)
        xs += [x, x + step * u]
    return np.clip(np.asarray(xs), 0, 1).astype(np.float32).reshape(-1, 1, 8, 8)


def test_the_slope_check_never_refuses_an_exact_bound_where_the_slope_is_attained(tmp_path):
    model = load(linear_classifier(tmp_path))
    bound = compute_bound(model)  # K[j][i] = ‖W_j − W_i‖·(1 + 1e-6): exact, attained by the pairs below
    data = from_arrays(slope_attaining_pairs(model))
    for batch_size in (2, 3, 80):
        certify(model, data, [0.1], bound=bound, batch_size=batch_size)


def test_the_slope_check_refuses_a_bound_one_percent_below_an_observed_slope(tmp_path):
    model = load(linear_classifier(tmp_path))
    bound = compute_bound(model)
    low = dataclasses.replace(bound, margin_upper=(np.asarray(bound.margin_upper) * 0.99).tolist())
    data = from_arrays(slope_attaining_pairs(model))
    with pytest.raises(GlorocertError, match=r"rows \d+ and \d+: y_\d − y_\d changes by .* K\[\d\]\[\d\] = .*glorocert bound"):
        certify(model, data, [0.1], bound=low, batch_size=2)  # each batch one pair; the check draws its pairs at random


def test_an_estimate_below_an_observed_slope_is_labelled_not_refused(tmp_path):
    """Power iteration approaches the norms from below: an estimate may honestly be too low; audit measures that."""
    model = load(linear_classifier(tmp_path))
    bound = compute_bound(model, mode="estimate")
    low = dataclasses.replace(bound, margin_estimate=(np.asarray(bound.margin_estimate) * 0.5).tolist())
    result = certify(model, from_arrays(slope_attaining_pairs(model)), [0.1], bound=low, batch_size=2)
    assert result.summary["bound_mode"] == "estimate"


def test_the_slope_check_also_guards_certify_locally_at(tmp_path):
    model = load(linear_classifier(tmp_path))
    bound = compute_bound(model)
    low = dataclasses.replace(bound, margin_upper=(np.asarray(bound.margin_upper) * 0.5).tolist())
    with pytest.raises(GlorocertError, match="provably too low"):
        certify_locally_at(model, from_arrays(slope_attaining_pairs(model)), [0.1], "bcp", bound=low, batch_size=2)


# --------------------------------------------------------------------------- 1c: --verify-bound


def test_verify_bound_accepts_honest_bounds_and_refuses_a_consistently_forged_one(tmp_path):
    model = load(save_as(make_model("residual"), "onnx", tmp_path))
    for options in (dict(), dict(exact_side=0), dict(mode="estimate")):
        verify_bound(model, compute_bound(model, **options))
    honest = compute_bound(model)
    body = honest.to_json()
    scaled(body, 0.5, EVERYTHING)
    body = {k: v for k, v in body.items() if k not in ("format", "format_version", "content_sha256")}
    with pytest.raises(GlorocertError, match="below the value recomputed from the model"):
        verify_bound(model, Bound(**body))


def test_verify_bound_with_input_normalisation(tmp_path):
    model = load(save_as(make_model("chain"), "onnx", tmp_path))
    normalization = Normalization.of(0.1307, 0.3081)
    verify_bound(model, compute_bound(model, normalization=normalization), normalization)


def test_certify_and_audit_verify_bound_refuse_a_consistently_forged_file(monkeypatch, capsys, tmp_path):
    path = forge(default_path(MNIST_MODEL), tmp_path / "forged.json", lambda b: scaled(b, 0.5, EVERYTHING))
    rows = tmp_path / "rows.csv"
    for command in (["certify", "--out", rows], ["audit", "--out", tmp_path / "audit"]):
        code, _, err = run_main(monkeypatch, capsys, command[0], MNIST_MODEL, "--bound", path, "--verify-bound",
                                "--data", "mnist-5k", "--limit", "20", *command[1:])
        assert code == 2, err
        assert "below the value recomputed from the model" in err and recompute_hint(MNIST_MODEL, "--out", path) in err
    assert not rows.exists() and not (tmp_path / "audit").exists()


def test_certify_verify_bound_accepts_the_shipped_bound(monkeypatch, capsys, tmp_path):
    code, out, err = run_main(monkeypatch, capsys, "certify", MNIST_MODEL, "--verify-bound", "--data", "mnist-5k",
                              "--limit", "50", "--out", tmp_path / "rows.csv")
    assert code == 0, err
    assert (tmp_path / "rows.csv").exists()


# --------------------------------------------------------------------------- 2: zero and non-finite bounds


@pytest.mark.parametrize("options, option", [(dict(mode="estimate", max_iter=0), "--max-iter"),
                                             (dict(max_iter=-3), "--max-iter"), (dict(tol=0.0), "--tol"),
                                             (dict(tol=-1e-4), "--tol"), (dict(tol=math.nan), "--tol")])
def test_bound_settings_that_cannot_converge_are_refused_up_front(tmp_path, options, option):
    model = load(save_as(make_model("chain"), "onnx", tmp_path))
    with pytest.raises(GlorocertError, match=option):
        compute_bound(model, **options)


def test_cli_bound_with_max_iter_0_writes_nothing(monkeypatch, capsys, tmp_path):
    model = save_as(make_model("chain"), "onnx", tmp_path)
    code, out, err = run_main(monkeypatch, capsys, "bound", model, "--mode", "estimate", "--max-iter", "0")
    assert code == 2 and "--max-iter" in err and len(err.strip().splitlines()) == 1
    assert not default_path(model).exists()
    code, _, err = run_main(monkeypatch, capsys, "bound", tmp_path / "absent.onnx", "--tol", "0")
    assert code == 2 and "--tol" in err  # checked before the model is even looked for


def test_a_zero_bound_is_refused_when_computed(monkeypatch, capsys, tmp_path):
    module = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        module[1].weight.zero_()
    path = save_onnx(module, tmp_path / "constant.onnx")
    with pytest.raises(GlorocertError, match="Lipschitz bound is 0"):
        compute_bound(load(path))
    code, _, err = run_main(monkeypatch, capsys, "bound", path, "--mode", "estimate")
    assert code == 2 and "Lipschitz bound is 0" in err and not default_path(path).exists()


@pytest.mark.parametrize("value", [0.0, math.inf, math.nan])
def test_a_zero_or_non_finite_bound_file_is_refused(tmp_path, value):
    model = load(save_as(make_model("chain"), "onnx", tmp_path))
    honest = compute_bound(model, mode="estimate").save(tmp_path / "honest.json")

    def apply(body):
        body["global_estimate"] = value
        body["margin_estimate"] = [[0.0 if i == j else value for i in range(10)] for j in range(10)]
        for block in body["blocks"]:
            block["estimate"] = value

    path = forge(honest, tmp_path / "forged.json", apply)
    with pytest.raises(GlorocertError, match="finite positive|not finite|finite non-negative"):
        Bound.load(path)


# --------------------------------------------------------------------------- 3: every refusal says how to recompute


DAMAGE = {
    "not_json": lambda text: "this is not json",
    "truncated": lambda text: text[: len(text) // 2],
    "wrong_format": lambda text: json.dumps({**json.loads(text), "format": "something-else"}),
    "old_version": lambda text: json.dumps({**json.loads(text), "format_version": 0}),
    "checksum": lambda text: json.dumps({**json.loads(text), "global_upper": 1.0}),
    "malformed": lambda text: json.dumps(reseal({k: v for k, v in json.loads(text).items() if k != "blocks"})),
    "ragged_margins": lambda text: json.dumps(reseal({**json.loads(text), "margin_upper": [[0.0, 1.0], [1.0]]})),
    "forged": lambda text: json.dumps(reseal({**json.loads(text), "global_upper": 1e-3})),
    "not_utf8": lambda text: "\udcff",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_every_refused_bound_file_next_to_the_model_ends_with_the_command_that_recomputes_it(tmp_path, damage):
    model = load(save_as(make_model("chain"), "onnx", tmp_path))
    path = compute_bound(model).save(default_path(model.path))
    text = DAMAGE[damage](path.read_text())
    path.write_bytes(b"\xff\xfe" if damage == "not_utf8" else text.encode())
    with pytest.raises(GlorocertError) as refused:
        resolve_bound(model, None, None)
    assert str(refused.value).endswith(recompute_hint(model.path)), str(refused.value)


def test_an_explicit_bound_that_is_missing_unreadable_or_for_another_model_names_the_command(tmp_path):
    model = load(save_as(make_model("chain"), "onnx", tmp_path))
    other = load(save_as(make_model("chain", seed=1), "onnx", tmp_path, "other"))
    (tmp_path / "a-directory.json").mkdir()
    for path in (tmp_path / "absent.json", tmp_path / "a-directory.json",
                 compute_bound(other).save(tmp_path / "other.json")):
        with pytest.raises(GlorocertError) as refused:
            resolve_bound(model, path, None)
        assert str(refused.value).endswith(command(model.path, "--out", path)), str(refused.value)  # "(re)compute it with"
    normalization = Normalization.of(0.5, 0.25)
    compute_bound(model).save(default_path(model.path))
    with pytest.raises(GlorocertError) as refused:
        resolve_bound(model, None, normalization)
    assert str(refused.value).endswith(recompute_hint(model.path, "--mean", 0.5, "--std", 0.25)), str(refused.value)


def test_certify_with_a_corrupt_bound_next_to_the_model_says_to_rerun_glorocert_bound(monkeypatch, capsys, tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copyfile(MNIST_MODEL, model)
    default_path(model).write_text(default_path(MNIST_MODEL).read_text()[:1000])
    code, _, err = run_main(monkeypatch, capsys, "certify", model, "--data", "mnist-5k", "--limit", "10")
    assert code == 2 and recompute_hint(model) in err, err
