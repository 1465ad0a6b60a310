"""``glorocert train``: the command function, ready to be registered on the Typer app.

``glorocert/cli.py`` registers it with ``app.command("train")(train_command)``;
it parses and renders only — the work is :func:`glorocert.train.loop.train`.
Errors are :class:`GlorocertError` for the app's one error handler.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer


def _canonical_command(**options) -> str:
    """The full command line that reproduces this run (every option spelled out)."""
    parts = ["glorocert", "train"]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if value:
                parts.append(flag)
        elif value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def train_command(
    data: Annotated[str, typer.Option(help="Training data: mnist-5k, fashion-mnist, digits, or a labelled file (20 % per class held out).")],
    eps: Annotated[float, typer.Option(help="Test radius ε (l2, [0,1] pixels): the VRA is measured and the model certified at it.")],
    out: Annotated[Path, typer.Option(help="Output directory: checkpoint, model.onnx, model.ts.pt, bound, card.md, log.csv.")],
    arch: Annotated[str, typer.Option(help="Architecture: 2c2f, 4c3f, 6c2f or 8c2f (GloRo paper).")] = "2c2f",
    activation: Annotated[str, typer.Option(help="Activation: relu or minmax.")] = "relu",
    minmax_pairing: Annotated[str, typer.Option(help="MinMax pairing: halves (channel c with c+C/2) or adjacent.")] = "halves",
    loss: Annotated[str, typer.Option(help="ce (standard training), gloro (GloRo cross-entropy) or trades (GloRo-TRADES).")] = "gloro",
    train_eps: Annotated[Optional[float], typer.Option(help="ε used by the loss (default: --eps); the paper trains at 1.1–1.5× the test ε.")] = None,
    eps_schedule: Annotated[str, typer.Option(help="Training-ε schedule: fixed, linear, linear_half, logarithmic, logarithmic_half.")] = "fixed",
    lam: Annotated[float, typer.Option(help="Final TRADES λ (with --loss trades).")] = 1.0,
    lam_schedule: Annotated[str, typer.Option(help="λ schedule: fixed, linear, linear_half.")] = "linear",
    epochs: Annotated[int, typer.Option(help="Number of epochs.")] = 10,
    warmup_epochs: Annotated[int, typer.Option(help="Epochs of plain cross-entropy before the GloRo loss starts.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 256,
    lr: Annotated[float, typer.Option(help="Initial Adam learning rate.")] = 1e-3,
    final_lr: Annotated[float, typer.Option(help="Learning rate at the end of the decay.")] = 1e-6,
    lr_schedule: Annotated[str, typer.Option(help="LR schedule: fixed, decay, decay_after_half.")] = "decay_after_half",
    power_iterations: Annotated[int, typer.Option(help="Power-iteration steps per batch (iterates persist across steps).")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed (initialisation, shuffling, iterates).")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="Train on the first N training samples only (quick runs).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda (falls back to cpu with a message).")] = "cpu",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out from its last epoch.")] = False,
) -> None:
    """Train a GloRo net that is certifiably robust at --eps, and write it with its card to --out.

    Example:

        glorocert train --arch 2c2f --data mnist-5k --eps 0.3 --train-eps 0.45 \\
            --loss trades --lam 2 --epochs 100 --out models/mnist-5k-eps0.3
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from glorocert.train.datasets import load_training_data
    from glorocert.train.loop import TrainConfig, TrainProgress, train

    command = _canonical_command(
        arch=arch, activation=activation,
        minmax_pairing=minmax_pairing if activation == "minmax" else None,
        data=data, eps=eps, train_eps=train_eps, eps_schedule=eps_schedule, loss=loss,
        lam=lam if loss == "trades" else None, lam_schedule=lam_schedule if loss == "trades" else None,
        epochs=epochs, warmup_epochs=warmup_epochs or None, batch_size=batch_size, lr=lr,
        final_lr=final_lr, lr_schedule=lr_schedule, power_iterations=power_iterations, seed=seed,
        limit=limit, out=str(out),
    )
    config = TrainConfig(
        arch=arch, activation=activation, minmax_pairing=minmax_pairing, loss=loss, eps=eps,
        train_eps=train_eps, eps_schedule=eps_schedule, lam=lam, lam_schedule=lam_schedule,
        epochs=epochs, warmup_epochs=warmup_epochs, batch_size=batch_size, lr=lr, final_lr=final_lr,
        lr_schedule=lr_schedule, power_iterations=power_iterations, seed=seed, device=device,
        out_dir=str(out), resume=resume, command=command,
    )
    console = Console(stderr=True)
    training = load_training_data(data, limit=limit)
    config.data = training.description

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
        console=console, transient=False,
    ) as bar:

        class _Rich(TrainProgress):
            def on_start(self, epochs: int, steps_per_epoch: int, start_epoch: int) -> None:
                self.epochs_task = bar.add_task("epochs", total=epochs, completed=start_epoch, metrics="")
                self.steps_task = bar.add_task("  batches", total=steps_per_epoch, metrics="")

            def on_step(self, epoch: int, step: int, loss_value: float) -> None:
                bar.update(self.steps_task, completed=step + 1, metrics=f"loss {loss_value:.4f}")

            def on_epoch(self, record) -> None:
                bar.update(self.steps_task, completed=0)
                bar.update(self.epochs_task, completed=record.epoch, metrics=(
                    f"loss {record.loss:.4f}  clean {100 * record.clean_acc:.1f}%  "
                    f"VRA {100 * record.vra:.1f}% (est.)  ε {record.train_eps:.3g}  L≈{record.lipschitz_estimate:.3g}"
                ))

            def on_message(self, message: str) -> None:
                bar.console.print(f"[yellow]{message}")

        result = train(config, training.x_train, training.y_train, training.x_val, training.y_val, progress=_Rich())

    from rich.table import Table

    table = Table(title=f"glorocert train → {out}")
    table.add_column("held-out metric")
    table.add_column("value", justify="right")
    table.add_row("clean accuracy", f"{100 * result.clean_acc:.2f}%")
    if result.vra_sound is not None:
        table.add_row(f"VRA at ε={eps} (sound bound)", f"{100 * result.vra_sound:.2f}%")
        table.add_row("global Lipschitz upper bound", f"{result.bound_global_upper:.4g}")
    table.add_row(f"VRA at ε={eps} (estimate)", f"{100 * result.vra_estimate:.2f}%")
    table.add_row("training time", f"{result.seconds:.0f} s")
    Console().print(table)
