"""What a finished training run leaves in its output directory.

``model.safetensors``  glorocert checkpoint (weights + spec, :func:`load_checkpoint`)
``model.onnx``         ONNX opset 17, input ``input``, output ``logits``, dynamic batch
``model.ts.pt``        TorchScript (traced)
``model.bound.json``   the frozen *sound* bound, from :mod:`glorocert.api` (when available)
``log.csv``            one row per epoch (written during training)
``card.md``            the model card
"""

from __future__ import annotations

import datetime as _dt
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

import glorocert
from glorocert.errors import GlorocertError
from glorocert.train.architectures import save_checkpoint
from glorocert.train.export import export_onnx, export_torchscript


def _compute_sound_bound(onnx_path: Path, bound_path: Path):
    """Frozen bound through the public API; returns the Bound or raises with the reason."""
    import glorocert.api as api  # noqa: PLC0415 - optional until the API lands

    bound = api.compute_bound(api.load(str(onnx_path)))
    bound.save(str(bound_path))
    return bound


def write_outputs(result, out: Path, x_val: torch.Tensor, y_val: torch.Tensor, progress: Any = None) -> None:
    """Write checkpoint, exports, bound and card of ``result`` into ``out`` (atomically, file by file)."""
    from glorocert.train.loop import _atomic_write_text, _call, evaluate

    config, spec, model = result.config, result.spec, result.model.cpu().eval()
    files: dict[str, str] = {}
    extra = {
        "glorocert_version": glorocert.__version__,
        "eps": config.eps,
        "train_eps": config.train_eps,
        "loss": config.loss,
        "data": config.data,
        "clean_acc": result.clean_acc,
        "vra_estimate": result.vra_estimate,
        "lipschitz_estimate": result.lipschitz_estimate,
        "margin_lipschitz_estimate": np.round(result.margin_lipschitz_estimate, 8).tolist(),
        "train_config": config.to_dict(),
    }
    files["checkpoint"] = str(save_checkpoint(out / "model.safetensors", model, spec, extra))
    files["onnx"] = str(export_onnx(model, spec["input_shape"], out / "model.onnx"))
    files["torchscript"] = str(export_torchscript(model, spec["input_shape"], out / "model.ts.pt"))

    bound_path = out / "model.bound.json"
    try:
        bound = _compute_sound_bound(out / "model.onnx", bound_path)
    except ImportError as exc:
        result.bound_error = f"glorocert.api is not available yet ({exc})"
    except AttributeError as exc:
        result.bound_error = f"glorocert.api lacks load/compute_bound ({exc})"
    except GlorocertError as exc:
        result.bound_error = f"the bound could not be computed: {exc}"
    else:
        files["bound"] = str(bound_path)
        margin = torch.as_tensor(np.asarray(bound.margin_matrix, dtype=np.float64))
        sound = evaluate(model, margin, x_val, y_val, config.eps, config.eval_batch_size)
        result.vra_sound = sound["vra"]
        result.bound_global_upper = float(bound.global_upper)
    if result.bound_error:
        _call(progress, "on_message", f"no frozen bound written: {result.bound_error}")
    files["log"] = str(out / "log.csv")
    files["card"] = str(out / "card.md")
    result.files = files
    _atomic_write_text(out / "card.md", model_card(result, len(y_val), out.name))


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
    activation = c.activation if c.activation == "relu" else f"MinMax (pairing: {c.minmax_pairing})"
    lines = [
        f"# {name}",
        "",
        f"A GloRo net ({c.arch.upper()}, {activation}) trained by `glorocert train` to be certifiably",
        f"robust in l2 at ε = {c.eps} in [0, 1] pixel space.",
        "",
        "## Results (held-out split)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| Clean accuracy | {_pct(result.clean_acc)} |",
        vra_line,
        f"| VRA at ε = {c.eps} (power-iteration estimate of K, not a guarantee) | {_pct(result.vra_estimate)} |",
        bound_line,
        f"| Global Lipschitz estimate (power iteration) | {result.lipschitz_estimate:.6g} |",
        f"| Training time | {duration} ({result.seconds:.0f} s, {len(result.history)} epochs, "
        f"{platform.machine()} CPU, torch {torch.__version__}) |",
        "",
        "VRA = fraction of held-out samples that are predicted correctly *and* certified",
        "(GloRo ⊥ logit below the top logit; ties count as not certified).",
        "",
        "## Data",
        "",
        f"- Data: `{c.data or 'in-memory tensors'}`",
        f"- Input shape: {spec['input_shape']}, {spec['num_classes']} classes, pixels in [0, 1]",
        f"- Held-out evaluation split: {n_val} samples (never used for training)",
        "",
        "## Training",
        "",
        f"- Architecture: {c.arch.upper()}, activation {activation}, orthogonal init",
        f"- Loss: {loss}",
        f"- ε: test {c.eps}, training {c.train_eps} (schedule `{c.eps_schedule}`)"
        + (f", {c.warmup_epochs} warm-up epochs of plain CE" if c.warmup_epochs else ""),
        f"- Optimiser: Adam, batch {c.batch_size}, {c.epochs} epochs, LR {c.lr} → {c.final_lr} "
        f"(`{c.lr_schedule}`)",
        f"- Power iteration: {c.power_iterations} step(s) per batch, persistent iterates, "
        f"converged (rel. change < {c.converge_tol}) before every evaluation",
        f"- Seed {c.seed}, deterministic mode {'on' if c.deterministic else 'off'}",
        "",
        "Exact command:",
        "",
        "```",
        c.command or "(trained through the Python API: glorocert.train.loop.train)",
        "```",
        "",
        "## Files",
        "",
        "- `model.safetensors` — glorocert checkpoint (weights + architecture spec in the header)",
        "- `model.onnx` — ONNX opset 17, input `input` (N×C×H×W), output `logits`",
        "- `model.ts.pt` — TorchScript",
        "- `model.bound.json` — frozen sound Lipschitz bound" + ("" if result.vra_sound is not None else " (missing, see above)"),
        "- `log.csv` — per-epoch loss, clean accuracy, VRA (estimate), ε, λ, LR, seconds, Lipschitz estimate",
        "",
        f"_Generated {_dt.date.today().isoformat()} by glorocert {glorocert.__version__}._",
        "",
    ]
    return "\n".join(lines)
