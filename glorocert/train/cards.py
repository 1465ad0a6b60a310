"""The model card of a finished run (``card.md``) and the command line that reproduces the run.

Two kinds of card share their frame (title, results table, data and training
sections, the exact command, how to certify, the files): a net trained to be
certified (GloRo, BCP, KW: :func:`model_card`) and a randomized-smoothing base
model, which certifies nothing by itself (:func:`smoothing_card`).
"""

from __future__ import annotations

import datetime as _dt
import platform
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from glorocert._version import __version__
from glorocert.train.config import Provenance, TrainConfig
from glorocert.zoo import RESIDUAL_ARCHITECTURES

_LOCAL_NAMES = {"bcp": "BCP", "kw": "KW"}
_LOCAL_KINDS = {"bcp": "A BCP-trained net (Lee et al. 2020)", "kw": "A Wong–Kolter-trained net (2018)"}


def command_line(config: TrainConfig) -> str:
    """The ``glorocert train`` command that reproduces ``config`` (every setting spelled out)."""
    c, r, s = config, config.robust, config.smoothing
    residual = c.arch in RESIDUAL_ARCHITECTURES
    net = [
        ("--arch", c.arch), ("--depth", c.depth if residual else None), ("--width", c.width if residual else None),
        ("--activation", c.activation),
        ("--minmax-pairing", c.minmax_pairing if c.activation == "minmax" else None),
        ("--data", c.data or None), ("--limit", c.data_limit), ("--augment-shift", c.augment_shift or None),
    ]
    if s is not None:
        macer = c.method == "macer"
        method = [("--method", c.method), ("--sigma", s.sigma)] + [
            (flag, value if macer else None) for flag, value in (
                ("--macer-k", s.macer_k), ("--macer-beta", s.macer_beta),
                ("--macer-gamma", s.macer_gamma), ("--macer-lam", s.macer_lam))
        ]
        head, warmup, power = method + net, [], []
    else:
        ramps_lam = r.loss == "trades" or c.local
        head = net + [
            ("--method", c.method if c.local else None),
            ("--eps", r.eps), ("--train-eps", r.train_eps), ("--eps-schedule", r.eps_schedule),
            ("--loss", None if c.local else r.loss),
            ("--lam", r.lam if ramps_lam else None), ("--lam-schedule", r.lam_schedule if ramps_lam else None),
        ]
        warmup, power = [("--warmup-epochs", r.warmup_epochs or None)], [("--power-iterations", r.power_iterations)]
    options = [*head, ("--epochs", c.epochs), *warmup, ("--batch-size", c.batch_size), ("--lr", c.lr),
               ("--final-lr", c.final_lr), ("--lr-schedule", c.lr_schedule), *power,
               ("--eval-every", c.eval_every if c.eval_every != 1 else None), ("--seed", c.seed),
               ("--out", c.out_dir)]
    parts = ["glorocert", "train"]
    for flag, value in options:
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


@dataclass(frozen=True)
class _Parts:
    """What differs between the kinds of card, in the order the card shows it."""

    intro: list[str]
    results: list[str]              # rows of the results table
    note: list[str]                 # what the figures mean
    training: list[str]             # the data and training sections
    certify: tuple[str, str]        # (heading, command)
    onnx_suffix: str                # after "output `logits`" in the file list
    files: list[str]                # file list entries after model.ts.pt


def model_card(result, provenance: Provenance, n_val: int, name: str) -> str:
    """The Markdown card of a net trained to be certified (GloRo, BCP, KW)."""
    c, r = result.config, result.config.robust
    kind = _LOCAL_KINDS[c.method] if c.local else "A GloRo net"
    certify = (f"glorocert certify {Path(c.out_dir or name) / 'model.onnx'} --data {c.data or 'DATA'} --eps {r.eps}"
               + (f" --method {c.method}" if c.local else "")
               + (" --split test" if c.data in ('mnist-5k', 'fashion-mnist', 'digits') else ""))
    return _card(result, provenance, name, _Parts(
        intro=[f"{kind} ({_short_architecture(c)}, {_activation(c)}) trained by `glorocert train` to be certifiably",
               f"robust in l2 at ε = {r.eps} in [0, 1] pixel space."],
        results=_robust_results(result),
        note=["VRA = fraction of held-out samples that are predicted correctly *and* certified",
              "(GloRo: ⊥ logit below the top logit; BCP / KW: every worst-case margin above the same rounding budget; "
              "ties count as not certified)."],
        training=_robust_training(c, provenance, result.spec, n_val),
        certify=("## Certify it", certify),
        onnx_suffix="",
        files=["- `model.onnx.bound.json` — frozen sound Lipschitz bound of model.onnx (used by `glorocert certify`)"
               + ("" if result.vra_sound is not None else " (missing, see above)"),
               "- `log.csv` — per-epoch loss, clean accuracy, VRA (estimate), ε, λ, LR, seconds, Lipschitz estimate"],
    ))


def smoothing_card(result, provenance: Provenance, n_val: int, name: str) -> str:
    """The Markdown card of a randomized-smoothing base model (``--method gaussian|macer``)."""
    c, s = result.config, result.config.smoothing
    if c.method == "gaussian":
        method = (f"Gaussian noise augmentation (Cohen et al. 2019): cross-entropy on x + N(0, σ²I), "
                  f"σ = {s.sigma}, one noise draw per sample per step")
    else:
        method = (f"MACER (Zhai et al. 2020): k = {s.macer_k} noisy copies per input, β = {s.macer_beta}, "
                  f"γ = {s.macer_gamma}, λ = {s.macer_lam}, σ = {s.sigma}")
    return _card(result, provenance, name, _Parts(
        intro=[
            f"A randomized-smoothing base model ({_short_architecture(c)}, {_activation(c)}) trained by `glorocert train "
            f"--method {c.method}` at noise level σ = {s.sigma} (l2, [0, 1] pixel space).",
            "",
            "This is a **smoothing base model, not a GloRo net**: it certifies nothing by itself and has",
            "no ⊥ logit and no frozen Lipschitz bound. Its robustness guarantee comes only from",
            "randomized smoothing (Cohen et al. CERTIFY at the same σ), which is probabilistic.",
        ],
        results=[
            f"| **Accuracy of the base model on noisy inputs x + N(0, σ²I), σ = {s.sigma}** "
            f"(one draw per sample) | **{_pct(result.noisy_acc)}** |",
            f"| Accuracy of the base model on noise-free inputs | {_pct(result.clean_acc)} |",
            _training_time_row(result),
        ],
        note=["No VRA is reported: these are accuracies of the base classifier, not certified accuracies."],
        training=[
            *_data_and_architecture(c, provenance, result.spec, n_val),
            f"- Method: {method}",
            _optimiser_line(c),
            f"- Seed {c.seed} (noise of each epoch drawn from a generator seeded by seed and epoch), "
            f"deterministic mode {'on' if c.deterministic else 'off'}; this run: {torch.get_num_threads()} thread(s)",
        ],
        certify=("## Certify the smoothed classifier",
                 f"glorocert compare-rs GLORO_MODEL.onnx --base {Path(c.out_dir or name) / 'model.onnx'} "
                 f"--data {c.data or 'DATA'} --sigma {s.sigma} --n0 100 --n 100000 --alpha 0.001"),
        onnx_suffix=" (base classifier)",
        files=["- `log.csv` — per-epoch loss, accuracy on noisy and on noise-free held-out inputs, LR, seconds"],
    ))


def _card(result, provenance: Provenance, name: str, parts: _Parts) -> str:
    """The frame every card shares, filled with the method's parts."""
    command = provenance.command or command_line(result.config) + "   # equivalent; trained through glorocert.train.train()"
    heading, certify = parts.certify
    return "\n".join([
        f"# {name}", "", *parts.intro, "",
        "## Results (held-out split)", "", "| metric | value |", "|---|---|", *parts.results, "",
        *parts.note, "",
        *parts.training, "",
        "Exact command:", "", "```", command, "```", "",
        heading, "", "```", certify, "```", "",
        "## Files", "",
        "- `model.safetensors` — glorocert checkpoint (weights + architecture spec in the header)",
        f"- `model.onnx` — ONNX opset 17, input `input` (N×C×H×W), output `logits`{parts.onnx_suffix}",
        "- `model.ts.pt` — TorchScript",
        *parts.files, "",
        f"_Generated {_dt.date.today().isoformat()} by glorocert {__version__}._", "",
    ])


def _robust_results(result) -> list[str]:
    """The results rows of a GloRo / BCP / KW card: sound figures first, then the training-time estimates."""
    c, r = result.config, result.config.robust
    if result.vra_sound is not None:
        vra_line = f"| **VRA at ε = {r.eps} (sound frozen bound)** | **{_pct(result.vra_sound)}** |"
        bound_line = f"| Global Lipschitz upper bound (sound) | {result.bound_global_upper:.6g} |"
    else:
        vra_line = f"| VRA at ε = {r.eps} (sound frozen bound) | not computed: {result.bound_error} |"
        bound_line = "| Global Lipschitz upper bound (sound) | — (run `glorocert bound` on model.onnx) |"
    estimate_label = "power-iteration estimate of K, not a guarantee"
    local_lines = []
    if c.local:
        estimate_label = ("BCP bounds with power-iteration layer norms, not a guarantee" if c.method == "bcp"
                          else "KW bounds in float32")
        vra_line = vra_line.replace("**", "").replace("(sound frozen bound)", "(GloRo rule, sound frozen global bound)")
        local_lines = [f"| **VRA at ε = {r.eps} ({_LOCAL_NAMES[c.method]}, sound local bounds)** | "
                       f"**{_pct(result.vra_local_sound)}** |"]
    return [
        f"| Clean accuracy | {_pct(result.clean_acc)} |",
        *local_lines,
        vra_line,
        f"| VRA at ε = {r.eps} ({estimate_label}) | {_pct(result.vra_estimate)} |",
        bound_line,
        f"| Global Lipschitz estimate (power iteration) | {result.lipschitz_estimate:.6g} |",
        _training_time_row(result),
    ]


def _robust_training(c: TrainConfig, provenance: Provenance, spec: dict, n_val: int) -> list[str]:
    r = c.robust
    if c.local:
        loss = (f"(1 − κ)·CE(z, y) + κ·CE(worst-translated logits from {_LOCAL_NAMES[c.method]} bounds), "
                f"κ → {r.lam} (`{r.lam_schedule}`)")
    else:
        loss = {"ce": "plain cross-entropy (standard training, no robustness)",
                "gloro": "GloRo cross-entropy (⊥ class)",
                "trades": f"GloRo-TRADES, λ → {r.lam} ({r.lam_schedule})",
                "emma": "EMMA, ε adapted per class pair (Hu et al., NeurIPS 2023, \"Unlocking Deterministic "
                        "Robustness Certification on ImageNet\")"}[r.loss]
    threads = torch.get_num_threads()
    return [
        *_data_and_architecture(c, provenance, spec, n_val),
        f"- Loss: {loss}",
        f"- ε: test {r.eps}, training {r.train_eps} (schedule `{r.eps_schedule}`)"
        + (f", {r.warmup_epochs} warm-up epochs of plain CE" if r.warmup_epochs else ""),
        _optimiser_line(c),
        f"- Power iteration: {r.power_iterations} step(s) per batch, persistent iterates, "
        f"converged (rel. change < {r.converge_tol}) before every evaluation"
        + (f" (every {c.eval_every} epochs and after the last)" if c.eval_every != 1 else ""),
        *([f"- Augmentation: random shifts of up to {c.augment_shift} pixels (zeros shifted in), as the random "
           "crops of the GloRo (Leino et al., ICML 2021) and LiResNet (Hu et al., NeurIPS 2023) scripts"]
          if c.augment_shift else []),
        f"- Seed {c.seed}, deterministic mode {'on' if c.deterministic else 'off'} "
        f"(bit-for-bit reproducible on CPU with the same glorocert code, torch version and thread count; "
        f"this run: {threads} thread(s), e.g. `OMP_NUM_THREADS={threads}`)",
    ]


def _data_and_architecture(c: TrainConfig, provenance: Provenance, spec: dict, n_val: int) -> list[str]:
    """The card's data section and the first line of its training section (shared by every method)."""
    description = provenance.data_description
    return [
        "## Data",
        "",
        f"- Data: `{c.data or 'in-memory tensors'}`" + (f" — {description}" if description else ""),
        f"- Input shape: {spec['input_shape']}, {spec['num_classes']} classes, pixels in [0, 1]",
        f"- Held-out evaluation split: {n_val} samples (never used for training)",
        "",
        "## Training",
        "",
        f"- Architecture: {_architecture(c)}, activation {_activation(c)}, orthogonal init",
    ]


def _short_architecture(c: TrainConfig) -> str:
    return f"LiResNet, {c.depth} blocks × {c.width} channels" if c.arch in RESIDUAL_ARCHITECTURES else c.arch.upper()


def _architecture(c: TrainConfig) -> str:
    if c.arch not in RESIDUAL_ARCHITECTURES:
        return c.arch.upper()
    return (f"LiResNet (Hu et al., NeurIPS 2023, \"Unlocking Deterministic Robustness Certification on ImageNet\"): "
            f"stem conv{c.width} k4 s2, {c.depth} residual blocks x + conv{c.width} k3 (x) each bounded as one "
            f"operator I + W, neck conv{c.width} k4 s2 → FC {8 * c.width}, head FC")


def _training_time_row(result) -> str:
    c = result.config
    return (f"| Training time | {_duration(result.seconds)} ({result.seconds:.0f} s, {c.epochs} epochs, "
            f"{platform.machine()} CPU, torch {torch.__version__}) |")


def _optimiser_line(c: TrainConfig) -> str:
    return f"- Optimiser: Adam, batch {c.batch_size}, {c.epochs} epochs, LR {c.lr} → {c.final_lr} (`{c.lr_schedule}`)"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def _activation(c: TrainConfig) -> str:
    return c.activation if c.activation == "relu" else f"MinMax (pairing: {c.minmax_pairing})"


def _duration(seconds: float) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{int(hours)}h {int(minutes)}m {seconds:.0f}s" if hours else f"{int(minutes)}m {seconds:.0f}s"
