"""What a finished training run leaves in its output directory.

``model.safetensors``  glorocert checkpoint (weights + spec, :func:`load_checkpoint`)
``model.onnx``         ONNX opset 17, input ``input``, output ``logits``, dynamic batch
``model.ts.pt``        TorchScript (traced)
``model.onnx.bound.json``  the frozen *sound* bound of model.onnx, from :mod:`glorocert.api`
                       (where ``glorocert certify model.onnx`` finds it; GloRo nets only —
                       smoothing base models, ``--method gaussian|macer``, get none)
``log.csv``            one row per epoch (written during training)
``card.md``            the model card
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

import glorocert
from glorocert.errors import GlorocertError
from glorocert.zoo import save_checkpoint
from glorocert.train.export import export_onnx, export_torchscript


def bound_path_for(onnx_path: Path) -> Path:
    """Where ``glorocert certify`` looks for the frozen bound of ``onnx_path`` (``model.onnx.bound.json``)."""
    from glorocert.lipschitz.boundfile import default_path

    return default_path(onnx_path)


def _sound_bound_and_vra(onnx_path: Path, eps: float, x_val: torch.Tensor, y_val: torch.Tensor):
    """Freeze the sound bound through the public API and measure the held-out VRA exactly as
    ``glorocert certify`` does (same native runner, same rounding slack, same ⊥ rule)."""
    import glorocert.api as api  # noqa: PLC0415 - optional until the API lands
    from glorocert.certify import gloro

    loaded = api.load(str(onnx_path))
    bound = api.compute_bound(loaded)
    bound.save(str(bound_path_for(onnx_path)))
    logits = np.concatenate([loaded.runner(x_val[i:i + 1000].numpy()) for i in range(0, len(x_val), 1000)])
    rtol = max(gloro.ROUNDING_RTOL, 4 * loaded.equivalence_gap)
    predicted, _, _, radius = gloro.radii(logits, bound.margin_matrix, rtol)
    certified = (predicted == y_val.numpy()) & ~gloro.bottom_flags(radius, eps)
    return bound, float(certified.mean())


def _sound_local_vra(onnx_path: Path, method: str, eps: float, x_val: torch.Tensor, y_val: torch.Tensor) -> float:
    """Held-out VRA by the local certifier itself on the exported model, as ``glorocert certify --method
    bcp|kw`` counts it at ``eps``: guaranteed bounds (BCP's norms from the frozen bound), float64, and
    GloRo's rounding budget on the native logits."""
    import glorocert.api as api
    from glorocert.certify import bcp, gloro, kw

    loaded = api.load(str(onnx_path))
    bound, _ = api.resolve_bound(loaded, None, None)
    module = {"bcp": bcp, "kw": kw}[method]
    options = api.local_options(module, loaded.graph, bound, None)
    rtol = max(gloro.ROUNDING_RTOL, 4 * loaded.equivalence_gap)
    certified = 0
    for start in range(0, len(x_val), 250):
        xb, yb = x_val[start:start + 250], y_val[start:start + 250]
        logits = loaded.runner(xb.numpy())
        predicted = torch.from_numpy(logits.argmax(1))
        ok = module.certify(loaded.graph, xb, predicted, eps, slack=api.local_slack(logits, rtol), **options)
        certified += int((ok & (predicted == yb)).sum())
    return certified / len(x_val)


def write_outputs(result, out: Path, x_val: torch.Tensor, y_val: torch.Tensor, progress: Any = None) -> None:
    """Write checkpoint, exports, bound and card of ``result`` into ``out`` (atomically, file by file)."""
    config, spec, model = result.config, result.spec, result.model.cpu().eval()
    extra = {
        "glorocert_version": glorocert.__version__,
        "eps": config.eps,
        "train_eps": config.train_eps,
        "loss": config.loss,
        "data": config.data,
        "data_description": config.data_description,
        "clean_acc": result.clean_acc,
        "vra_estimate": result.vra_estimate,
        "lipschitz_estimate": result.lipschitz_estimate,
        "margin_lipschitz_estimate": (None if result.margin_lipschitz_estimate is None
                                      else np.round(result.margin_lipschitz_estimate, 8).tolist()),
        "seconds": result.seconds,
        "epochs_done": len(result.history),
        "train_config": config.to_dict(),
    }
    extra["method"] = config.method
    if config.smoothing:
        extra.update({"sigma": config.sigma, "noisy_acc": result.noisy_acc,
                      "model_kind": "randomized-smoothing base model"})
    result.files["checkpoint"] = str(save_checkpoint(out / "model.safetensors", model, spec, extra))
    result.files["onnx"] = str(export_onnx(model, spec["input_shape"], out / "model.onnx"))
    result.files["torchscript"] = str(export_torchscript(model, spec["input_shape"], out / "model.ts.pt"))
    result.files["log"] = str(out / "log.csv")
    bound_and_card(result, out, x_val, y_val, progress)


def bound_and_card(result, out: Path, x_val: torch.Tensor, y_val: torch.Tensor, progress: Any = None) -> None:
    """Freeze the sound bound of ``out/model.onnx`` (via glorocert.api), measure the sound VRA, write the card."""
    from glorocert.train.loop import _atomic_write_text, _call

    config = result.config
    result.bound_error = None
    if config.smoothing:  # a smoothing base model: no GloRo bound, no VRA claimed
        result.files["card"] = str(out / "card.md")
        _atomic_write_text(out / "card.md", smoothing_card(result, len(y_val), out.name))
        return
    try:
        bound, vra_sound = _sound_bound_and_vra(out / "model.onnx", config.eps, x_val, y_val)
    except ImportError as exc:
        result.bound_error = f"glorocert.api is not available yet ({exc})"
    except AttributeError as exc:
        result.bound_error = f"glorocert.api lacks load/compute_bound ({exc})"
    except GlorocertError as exc:
        result.bound_error = f"the bound could not be computed: {exc}"
    else:
        result.files["bound"] = str(bound_path_for(out / "model.onnx"))
        result.vra_sound = vra_sound
        result.bound_global_upper = float(bound.global_upper)
    if config.local:
        _call(progress, "on_message", f"certifying the held-out split with {config.method.upper()} (sound bounds)…")
        result.vra_local_sound = _sound_local_vra(out / "model.onnx", config.method, config.eps, x_val, y_val)
    if result.bound_error:
        _call(progress, "on_message", f"no frozen bound written: {result.bound_error}")
    result.files["card"] = str(out / "card.md")
    _atomic_write_text(out / "card.md", model_card(result, len(y_val), out.name))


def finalize(out_dir: str | Path, progress: Any = None):
    """Recompute the frozen bound, the sound VRA and the card of a finished run in ``out_dir``.

    Uses only ``model.safetensors`` (weights, spec and the training record in
    its header) and ``model.onnx``; the held-out data is reloaded from the
    recorded data spec. For runs finished before :mod:`glorocert.api` existed.
    """
    from glorocert.zoo import load_checkpoint, read_checkpoint_metadata
    from glorocert.train.datasets import load_training_data
    from glorocert.train.loop import TrainConfig, TrainResult

    out = Path(out_dir)
    model, spec = load_checkpoint(out / "model.safetensors")
    meta = read_checkpoint_metadata(out / "model.safetensors")
    try:
        config = TrainConfig(**json.loads(meta["train_config"]))
        record = {k: json.loads(meta[k]) for k in
                  ("clean_acc", "vra_estimate", "lipschitz_estimate", "margin_lipschitz_estimate", "seconds")}
        noisy_acc = json.loads(meta["noisy_acc"]) if "noisy_acc" in meta else None
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise GlorocertError(f"{out / 'model.safetensors'} has no training record ({exc}); was it written by glorocert train?") from None
    if not config.data:
        raise GlorocertError(f"{out}: the run was trained on in-memory tensors; its held-out data cannot be reloaded")
    data = load_training_data(config.data, config.data_limit)
    result = TrainResult(
        model=model, spec=spec, config=config,
        history=[],
        clean_acc=record["clean_acc"], vra_estimate=record["vra_estimate"],
        margin_lipschitz_estimate=(None if record["margin_lipschitz_estimate"] is None
                                   else np.asarray(record["margin_lipschitz_estimate"])),
        lipschitz_estimate=record["lipschitz_estimate"], seconds=record["seconds"], power=None,
        noisy_acc=noisy_acc,
        files={"checkpoint": str(out / "model.safetensors"), "onnx": str(out / "model.onnx"),
               "torchscript": str(out / "model.ts.pt"), "log": str(out / "log.csv")},
    )
    bound_and_card(result, out, data.x_val, data.y_val, progress)
    return result


def command_line(config) -> str:
    """The ``glorocert train`` command that reproduces ``config`` (every setting spelled out)."""
    import shlex

    c = config
    if c.smoothing:
        macer = c.method == "macer"
        options: list[tuple[str, object]] = [
            ("--method", c.method), ("--sigma", c.sigma),
            ("--macer-k", c.macer_k if macer else None), ("--macer-beta", c.macer_beta if macer else None),
            ("--macer-gamma", c.macer_gamma if macer else None), ("--macer-lam", c.macer_lam if macer else None),
            ("--arch", c.arch), ("--activation", c.activation),
            ("--minmax-pairing", c.minmax_pairing if c.activation == "minmax" else None),
            ("--data", c.data or None), ("--limit", c.data_limit),
            ("--epochs", c.epochs), ("--batch-size", c.batch_size), ("--lr", c.lr), ("--final-lr", c.final_lr),
            ("--lr-schedule", c.lr_schedule), ("--seed", c.seed), ("--out", c.out_dir),
        ]
        parts = ["glorocert", "train"]
        for flag, value in options:
            if value is not None:
                parts += [flag, str(value)]
        return shlex.join(parts)
    options = [
        ("--arch", c.arch), ("--activation", c.activation),
        ("--minmax-pairing", c.minmax_pairing if c.activation == "minmax" else None),
        ("--data", c.data or None), ("--limit", c.data_limit),
        ("--method", c.method if c.local else None),
        ("--eps", c.eps), ("--train-eps", c.train_eps), ("--eps-schedule", c.eps_schedule),
        ("--loss", None if c.local else c.loss),
        ("--lam", c.lam if c.loss == "trades" or c.local else None),
        ("--lam-schedule", c.lam_schedule if c.loss == "trades" or c.local else None),
        ("--epochs", c.epochs), ("--warmup-epochs", c.warmup_epochs or None),
        ("--batch-size", c.batch_size), ("--lr", c.lr), ("--final-lr", c.final_lr),
        ("--lr-schedule", c.lr_schedule), ("--power-iterations", c.power_iterations),
        ("--seed", c.seed), ("--out", c.out_dir),
    ]
    parts = ["glorocert", "train"]
    for flag, value in options:
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def model_card(result, n_val: int, name: str) -> str:
    """The Markdown model card of a finished run."""
    c, spec = result.config, result.spec
    hours, rest = divmod(result.seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    duration = f"{int(hours)}h {int(minutes)}m {seconds:.0f}s" if hours else f"{int(minutes)}m {seconds:.0f}s"
    if result.vra_sound is not None:
        vra_line = f"| **VRA at ε = {c.eps} (sound frozen bound)** | **{_pct(result.vra_sound)}** |"
        bound_line = f"| Global Lipschitz upper bound (sound) | {result.bound_global_upper:.6g} |"
    else:
        vra_line = f"| VRA at ε = {c.eps} (sound frozen bound) | not computed: {result.bound_error} |"
        bound_line = "| Global Lipschitz upper bound (sound) | — (run `glorocert bound` on model.onnx) |"
    loss = {"ce": "plain cross-entropy (standard training, no robustness)",
            "gloro": "GloRo cross-entropy (⊥ class)",
            "trades": f"GloRo-TRADES, λ → {c.lam} ({c.lam_schedule})"}[c.loss]
    kind = "A GloRo net"
    estimate_label = "power-iteration estimate of K, not a guarantee"
    local_lines = []
    if c.local:
        name_of = {"bcp": "BCP", "kw": "KW"}[c.method]
        kind = {"bcp": "A BCP-trained net (Lee et al. 2020)", "kw": "A Wong–Kolter-trained net (2018)"}[c.method]
        loss = (f"(1 − κ)·CE(z, y) + κ·CE(worst-translated logits from {name_of} bounds), κ → {c.lam} "
                f"(`{c.lam_schedule}`)")
        estimate_label = ("BCP bounds with power-iteration layer norms, not a guarantee" if c.method == "bcp"
                          else "KW bounds in float32")
        vra_line = vra_line.replace("**", "").replace("(sound frozen bound)", "(GloRo rule, sound frozen global bound)")
        local_lines = [f"| **VRA at ε = {c.eps} ({name_of}, sound local bounds)** | **{_pct(result.vra_local_sound)}** |"]
    activation = c.activation if c.activation == "relu" else f"MinMax (pairing: {c.minmax_pairing})"
    lines = [
        f"# {name}",
        "",
        f"{kind} ({c.arch.upper()}, {activation}) trained by `glorocert train` to be certifiably",
        f"robust in l2 at ε = {c.eps} in [0, 1] pixel space.",
        "",
        "## Results (held-out split)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| Clean accuracy | {_pct(result.clean_acc)} |",
        *local_lines,
        vra_line,
        f"| VRA at ε = {c.eps} ({estimate_label}) | {_pct(result.vra_estimate)} |",
        bound_line,
        f"| Global Lipschitz estimate (power iteration) | {result.lipschitz_estimate:.6g} |",
        f"| Training time | {duration} ({result.seconds:.0f} s, {c.epochs} epochs, "
        f"{platform.machine()} CPU, torch {torch.__version__}) |",
        "",
        "VRA = fraction of held-out samples that are predicted correctly *and* certified",
        "(GloRo: ⊥ logit below the top logit; BCP / KW: every worst-case margin above the same rounding budget; ties count as not certified).",
        "",
        *_data_and_architecture(c, spec, n_val, activation),
        f"- Loss: {loss}",
        f"- ε: test {c.eps}, training {c.train_eps} (schedule `{c.eps_schedule}`)"
        + (f", {c.warmup_epochs} warm-up epochs of plain CE" if c.warmup_epochs else ""),
        f"- Optimiser: Adam, batch {c.batch_size}, {c.epochs} epochs, LR {c.lr} → {c.final_lr} "
        f"(`{c.lr_schedule}`)",
        f"- Power iteration: {c.power_iterations} step(s) per batch, persistent iterates, "
        f"converged (rel. change < {c.converge_tol}) before every evaluation",
        f"- Seed {c.seed}, deterministic mode {'on' if c.deterministic else 'off'} "
        f"(bit-for-bit reproducible on CPU with the same torch version and thread count; "
        f"this run: {torch.get_num_threads()} thread(s), e.g. `OMP_NUM_THREADS={torch.get_num_threads()}`)",
        "",
        "Exact command:",
        "",
        "```",
        c.command or command_line(c) + "   # equivalent; trained through glorocert.train.train()",
        "```",
        "",
        "## Certify it",
        "",
        "```",
        f"glorocert certify {Path(c.out_dir or name) / 'model.onnx'} --data {c.data or 'DATA'} --eps {c.eps}"
        + (f" --method {c.method}" if c.local else "")
        + (" --split test" if c.data in ('mnist-5k', 'fashion-mnist', 'digits') else ""),
        "```",
        "",
        "## Files",
        "",
        "- `model.safetensors` — glorocert checkpoint (weights + architecture spec in the header)",
        "- `model.onnx` — ONNX opset 17, input `input` (N×C×H×W), output `logits`",
        "- `model.ts.pt` — TorchScript",
        "- `model.onnx.bound.json` — frozen sound Lipschitz bound of model.onnx (used by `glorocert certify`)" + ("" if result.vra_sound is not None else " (missing, see above)"),
        "- `log.csv` — per-epoch loss, clean accuracy, VRA (estimate), ε, λ, LR, seconds, Lipschitz estimate",
        "",
        f"_Generated {_dt.date.today().isoformat()} by glorocert {glorocert.__version__}._",
        "",
    ]
    return "\n".join(lines)


def smoothing_card(result, n_val: int, name: str) -> str:
    """The Markdown card of a randomized-smoothing base model (``--method gaussian|macer``)."""
    c, spec = result.config, result.spec
    hours, rest = divmod(result.seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    duration = f"{int(hours)}h {int(minutes)}m {seconds:.0f}s" if hours else f"{int(minutes)}m {seconds:.0f}s"
    activation = c.activation if c.activation == "relu" else f"MinMax (pairing: {c.minmax_pairing})"
    if c.method == "gaussian":
        method = (f"Gaussian noise augmentation (Cohen et al. 2019): cross-entropy on x + N(0, σ²I), "
                  f"σ = {c.sigma}, one noise draw per sample per step")
    else:
        method = (f"MACER (Zhai et al. 2020): k = {c.macer_k} noisy copies per input, β = {c.macer_beta}, "
                  f"γ = {c.macer_gamma}, λ = {c.macer_lam}, σ = {c.sigma}")
    out_dir = Path(c.out_dir or name)
    lines = [
        f"# {name}",
        "",
        f"A randomized-smoothing base model ({c.arch.upper()}, {activation}) trained by `glorocert train "
        f"--method {c.method}` at noise level σ = {c.sigma} (l2, [0, 1] pixel space).",
        "",
        "This is a **smoothing base model, not a GloRo net**: it certifies nothing by itself and has",
        "no ⊥ logit and no frozen Lipschitz bound. Its robustness guarantee comes only from",
        "randomized smoothing (Cohen et al. CERTIFY at the same σ), which is probabilistic.",
        "",
        "## Results (held-out split)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| **Accuracy of the base model on noisy inputs x + N(0, σ²I), σ = {c.sigma}** "
        f"(one draw per sample) | **{_pct(result.noisy_acc)}** |",
        f"| Accuracy of the base model on noise-free inputs | {_pct(result.clean_acc)} |",
        f"| Training time | {duration} ({result.seconds:.0f} s, {c.epochs} epochs, "
        f"{platform.machine()} CPU, torch {torch.__version__}) |",
        "",
        "No VRA is reported: these are accuracies of the base classifier, not certified accuracies.",
        "",
        *_data_and_architecture(c, spec, n_val, activation),
        f"- Method: {method}",
        f"- Optimiser: Adam, batch {c.batch_size}, {c.epochs} epochs, LR {c.lr} → {c.final_lr} "
        f"(`{c.lr_schedule}`)",
        f"- Seed {c.seed} (noise of each epoch drawn from a generator seeded by seed and epoch), "
        f"deterministic mode {'on' if c.deterministic else 'off'}; this run: {torch.get_num_threads()} thread(s)",
        "",
        "Exact command:",
        "",
        "```",
        c.command or command_line(c) + "   # equivalent; trained through glorocert.train.train()",
        "```",
        "",
        "## Certify the smoothed classifier",
        "",
        "```",
        f"glorocert compare-rs GLORO_MODEL.onnx --base {out_dir / 'model.onnx'} --data {c.data or 'DATA'} "
        f"--sigma {c.sigma} --n0 100 --n 100000 --alpha 0.001",
        "```",
        "",
        "## Files",
        "",
        "- `model.safetensors` — glorocert checkpoint (weights + architecture spec in the header)",
        "- `model.onnx` — ONNX opset 17, input `input` (N×C×H×W), output `logits` (base classifier)",
        "- `model.ts.pt` — TorchScript",
        "- `log.csv` — per-epoch loss, accuracy on noisy and on noise-free held-out inputs, LR, seconds",
        "",
        f"_Generated {_dt.date.today().isoformat()} by glorocert {glorocert.__version__}._",
        "",
    ]
    return "\n".join(lines)


def _data_and_architecture(c, spec: dict, n_val: int, activation: str) -> list[str]:
    """The card's data section and the first line of its training section (shared by every method)."""
    return [
        "## Data",
        "",
        f"- Data: `{c.data or 'in-memory tensors'}`" + (f" — {c.data_description}" if c.data_description else ""),
        f"- Input shape: {spec['input_shape']}, {spec['num_classes']} classes, pixels in [0, 1]",
        f"- Held-out evaluation split: {n_val} samples (never used for training)",
        "",
        "## Training",
        "",
        f"- Architecture: {c.arch.upper()}, activation {activation}, orthogonal init",
    ]
