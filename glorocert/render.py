"""What the `glorocert` command shows: rich tables, one-line reports, progress bars and the two consoles.

Every builder takes the result of a library call (a Bound, a certify summary,
a studies report) and returns something to print — a :class:`rich.table.Table`
or a line of rich markup — so that the CLI prints and a test can read the
same text. Nothing here computes a certificate; an estimate-mode bound is
flagged wherever it appears, never hidden.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from glorocert.results import eps_key

if TYPE_CHECKING:  # annotations only: rendering a certify run imports neither torch nor training
    from glorocert.api import Bound
    from glorocert.train import EpochRecord, TrainResult

out = Console()
err = Console(stderr=True)

__all__ = [
    "audit_table", "bound_lines", "bound_progress", "bound_table", "cascade_line", "certify_line", "compare_local_line",
    "compare_local_table", "compare_rs_line", "compare_rs_table", "err", "export_line", "looseness_line", "method_finished",
    "method_started", "note", "out", "progress_bar", "summary_table", "violation_line",
    "TrainDisplay", "epoch_line", "train_lines", "train_table",
]


def progress_bar(transient: bool = True) -> Progress:
    """A progress bar on stderr with a count, the elapsed time and an ETA."""
    return Progress(
        SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=transient,
    )


def note(message: str) -> str:
    return f"[yellow]note:[/] {message}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _metric_table(title: str, **options: Any) -> Table:
    table = Table(title=title, **options)
    table.add_column("metric")
    table.add_column("value", justify="right")
    return table


# --------------------------------------------------------------------------- bound


def bound_progress(progress: Progress, task: TaskID, graph) -> Callable[[str], None]:
    """The callback compute_bound reports each node to: the bar moves to that node's position in the graph."""
    position: dict[str, int] = {}
    for k, node in enumerate(graph.nodes):
        position.setdefault(node.name, k)
    return lambda name: progress.update(task, completed=position.get(name, 0), description=f"bounding {name}")


def bound_table(model_name: str, bound: Bound) -> Table:
    """One row per linear operator: its power-iteration estimate, guaranteed upper bound, slack and convergence."""
    table = Table(title=f"Lipschitz bounds of {model_name} ({bound.mode})", title_justify="left")
    for col in ("#", "operator", "output", "estimate", "upper bound", "slack", "iters", "method"):
        table.add_column(col, justify="left" if col in ("operator", "method") else "right", overflow="fold")
    for k, b in enumerate(bound.blocks, 1):
        slack = f"{(b['upper'] / b['estimate'] - 1) * 100:.4f}%" if b["estimate"] > 0 else "—"
        its = f"{b['iterations']}" + ("" if b["converged"] else " [red]not converged[/]")
        table.add_row(str(k), b["op"], "×".join(map(str, b["out_shape"])), f"{b['estimate']:.6g}", f"{b['upper']:.6g}", slack, its, b["method"])
    return table


def bound_lines(bound: Bound, path: Path) -> str:
    """The global constant (labelled sound or ESTIMATE), the margin matrix's method, the time and the file."""
    label = "guaranteed upper bound" if bound.mode == "sound" else "[red]ESTIMATE (power iteration; not a certificate)[/]"
    return (f"global Lipschitz constant: [bold]{bound.lipschitz:.6g}[/] ({label}); power-iteration estimate {bound.global_estimate:.6g}\n"
            f"margin matrix: {bound.margin_method}; computed in {bound.seconds:.2f} s; written to {path}")


def looseness_line(found: Mapping[str, float]) -> str:
    """`bound --lower`: the empirical lower bound and upper ÷ lower (studies.lower_bound.looseness)."""
    return (f"empirical lower bound {found['global_lower']:.6g} → upper ÷ lower = {found['global_ratio']:.3f} (global); "
            f"margin K ÷ lower: median {found['margin_ratio_median']:.3f}, min {found['margin_ratio_min']:.3f}")


# --------------------------------------------------------------------------- certify


def summary_table(summary: Mapping[str, Any], title: str) -> Table:
    """The headline numbers of a certify summary: bound mode, samples, clean accuracy, VRA and ⊥ rate per ε, ACR.

    For unlabelled data (``vra`` None, see :func:`glorocert.results.summarize`) the rows say "certified
    (unlabelled)" and "average radius (unlabelled)": the fraction of predictions certified, right or wrong."""
    table = _metric_table(title)
    mode = summary.get("bound_mode")
    if mode is not None:
        table.add_row("bound", "[bold red]ESTIMATE (not a sound bound)[/]" if mode == "estimate" else str(mode))
    table.add_row("samples", str(summary.get("num_samples", "n/a")))
    unlabelled = summary.get("vra") is None and "certified_rate" in summary  # no labels: no accuracy, only rates
    table.add_row("clean accuracy", "n/a (no labels)" if unlabelled else _percent(summary.get("clean_accuracy")))
    for key, value in (summary.get("certified_rate") if unlabelled else summary.get("vra") or {}).items():
        table.add_row(f"certified (unlabelled) @ ε={key}" if unlabelled else f"VRA @ ε={key}", _percent(value))
    for key, value in summary.get("bottom_rate", {}).items():
        table.add_row(f"⊥ rate @ ε={key}", _percent(value))
    acr = summary.get("average_radius" if unlabelled else "average_certified_radius")
    table.add_row("average radius (unlabelled)" if unlabelled else "average certified radius", "n/a" if acr is None else f"{acr:.4f}")
    return table


def certify_line(s: Mapping[str, Any]) -> str:
    """`200 samples in 0.05 s (4000/s, onnxruntime cpu); Lipschitz 12.3 (sound, model.onnx.bound.json)`."""
    return (f"{s['num_samples']} samples in {s['seconds']:.2f} s ({s['samples_per_second']:.0f}/s, {s['runner']}); "
            f"Lipschitz {s['lipschitz']:.4g} ({s['bound_mode']}, {s['bound_file']})")


def cascade_line(s: Mapping[str, Any]) -> str:
    """`cascade: bcp ran on 153 ⊥ samples (160 sample·ε passes) in 2.31 s and rescued 12 at ε=0.3 (VRA +1.2 pp)`."""
    n = s["num_samples"]
    rescued = ", ".join(f"{count} at ε={key} (VRA {100 * count / n:+.1f} pp)" for key, count in s["rescued"].items())
    return (f"cascade: {s['local_method']} ran on {s['local_samples']} ⊥ samples ({s['local_passes']} sample·ε passes) "
            f"in {s['local_seconds']:.2f} s and rescued {rescued}")


# --------------------------------------------------------------------------- compare-rs


def compare_rs_table(result) -> Table:
    """GloRo and smoothing side by side (a studies.compare_rs.Comparison): certified accuracy per radius, ACR, time, guarantee."""
    table = Table(title=f"GloRo vs randomized smoothing on {result.summary['dataset']} ({result.summary['num_samples']} samples)", title_justify="left")
    table.add_column("")
    for row in result.table:
        table.add_column(row["method"], justify="right")
    for r in result.grid:
        table.add_row(f"certified accuracy at r={r:g}", *(f"{100 * row['certified_accuracy'][f'{r:g}']:.1f}%" for row in result.table))
    table.add_row("average certified radius", *(f"{row['acr']:.3f}" for row in result.table))
    table.add_row("seconds per sample", *(f"{row['seconds_per_sample']:.2e}" for row in result.table))
    table.add_row("guarantee", *(row["guarantee"] for row in result.table))
    return table


def compare_rs_line(summary: Mapping[str, Any]) -> str:
    return f"smoothing costs {summary['speed_ratio_smoothing_over_gloro']:.3g}× GloRo's time per sample"


# --------------------------------------------------------------------------- compare-local


def method_started(method: str, samples: int) -> str:
    return f"{method}: certifying {samples} samples in a fresh process…"


def method_finished(row: Mapping[str, Any]) -> str:
    if row["status"] == "ok":
        return f"{row['method']}: {row['samples']} samples in {row['seconds']:.2f} s"
    return f"[yellow]{row['method']}: {row['status']}:[/] {row['error']}"


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:.0f} MiB"


def compare_local_table(report: Mapping[str, Any], title: str | None = None) -> Table:
    """The comparison as a rich table: one row per method, one VRA column per ε; notes (why a method did not run) below."""
    eps_keys = [eps_key(e) for e in report["eps"]]
    table = Table(title=title or f"certifiers on {Path(report['model']).name}, {report['dataset']} (each method in a fresh process)",
                  title_justify="left", caption_justify="left")
    for col in ("method", "samples", "clean", *(f"VRA ε={k}" for k in eps_keys), "seconds", "s/sample", "× gloro /sample", "peak RSS"):
        table.add_column(col, justify="left" if col == "method" else "right")
    notes = []  # below the table, so that narrow terminals keep the numbers readable
    for row in report["methods"]:
        method = row["method"] + (f" ({report['fallback']})" if row["method"] == "cascade" else "")
        if row["status"] != "ok":
            table.add_row(method, str(row.get("samples", "")), *["—"] * (len(eps_keys) + 4), _mib(row.get("peak_rss_bytes")))
            notes.append(f"{method}: [red]{row['status']}:[/] {row.get('error', '')}")
            continue
        notes += _method_notes(report, row, method)
        table.add_row(method, *_method_cells(row, eps_keys))
    table.caption = "\n".join(notes) or None
    return table


def _method_notes(report: Mapping[str, Any], row: Mapping[str, Any], method: str) -> list[str]:
    notes = []
    if row["method"] == "kw" and report.get("kw_limit") and row["samples"] < report["samples"]:
        notes.append(f"kw: first {row['samples']} samples only (--kw-limit {report['kw_limit']})")
    if "local" in row:
        lo = row["local"]
        rescued = ", ".join(f"{v} at ε={k}" for k, v in lo["rescued"].items())
        notes.append(f"{method}: {lo['local_method']} ran on {lo['local_samples']} ⊥ samples ({lo['local_passes']} "
                     f"sample·ε passes, {lo['local_seconds']:.2f} s) and rescued {rescued}")
    return notes


def _method_cells(row: Mapping[str, Any], eps_keys: list[str]) -> list[str]:
    """samples, clean, VRA per ε, seconds, s/sample, × gloro, peak RSS (+ what certifying added to the loaded model)."""
    clean, ratio = row.get("clean_accuracy"), row.get("time_ratio_vs_gloro")
    peak = _mib(row["peak_rss_bytes"])
    if row.get("load_rss_bytes") and row["peak_rss_bytes"]:
        peak += f" (+{(row['peak_rss_bytes'] - row['load_rss_bytes']) / 2**20:.0f})"
    return [
        str(row["samples"]), "n/a" if clean is None else f"{100 * clean:.1f}%",
        *(f"{100 * row['vra'][k]:.1f}%" for k in eps_keys),
        f"{row['seconds']:.2f}", f"{row['seconds_per_sample']:.2e}",
        "—" if ratio is None else f"{ratio:,.0f}×" if ratio >= 10 else f"{ratio:.2f}×",
        peak,
    ]


def compare_local_line(report: Mapping[str, Any], json_path: Path | None) -> str:
    return (f"Lipschitz {report['lipschitz']:.4g} ({report['bound_mode']}, {report['bound_file']})"
            + (f"; written to {json_path}" if json_path else ""))


# --------------------------------------------------------------------------- audit


def audit_table(summary: Mapping[str, Any], title: str) -> Table:
    """Samples audited, violations (red unless none), adversarial examples found, and the median radius gap."""
    table = _metric_table(title, title_justify="left")
    table.add_row("samples", str(summary["samples"]))
    table.add_row("certified samples audited", str(summary["audited"]))
    table.add_row("violations", f"[{'red' if summary['violations'] else 'green'}]{summary['violations']}[/]")
    table.add_row("adversarial example found", str(summary.get("adversarial_found", 0)))
    if summary.get("median_gap_ratio") is not None:
        table.add_row("median (nearest adversarial ÷ radius)", f"{summary['median_gap_ratio']:.3f}")
        table.add_row("median (nearest adversarial − radius)", f"{summary['median_gap']:.4f}")
    return table


def violation_line(v: Mapping[str, Any]) -> str:
    return f"[red]VIOLATION[/] sample {v['index']}: adversarial at distance {v['distance']:.6g} < certified radius {v['radius']:.6g}"


# --------------------------------------------------------------------------- export


def export_line(path: Path, num_classes: int, eps: float, bound_source: str, bound_mode: str) -> str:
    return f"wrote {path}: {num_classes} logits + ⊥ at ε={eps:g} (bound: {bound_source}, {bound_mode})"


# --------------------------------------------------------------------------- train


class TrainDisplay:
    """Progress bars for a training run on ``console`` (stderr by default); use it as a context manager.
    It has the callbacks of glorocert.train.TrainProgress that it shows (training calls any it finds)."""

    def __init__(self, console: Console | None = None):
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"), console=console or err, transient=False,
        )
        self.loading: TaskID | None = None
        self.epochs: TaskID | None = None
        self.steps: TaskID | None = None

    def __enter__(self) -> TrainDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.progress.stop()

    def on_loading(self, data: str) -> None:
        self.loading = self.progress.add_task(f"loading {data}…", total=None, metrics="")

    def on_start(self, epochs: int, steps_per_epoch: int, start_epoch: int) -> None:
        if self.loading is not None:
            self.progress.remove_task(self.loading)
            self.loading = None
        self.epochs = self.progress.add_task("epochs", total=epochs, completed=start_epoch, metrics="")
        self.steps = self.progress.add_task("batches", total=steps_per_epoch, metrics="")

    def on_step(self, epoch: int, step: int, loss: float) -> None:
        self.progress.update(self.steps, completed=step + 1, metrics=f"loss {loss:.4f}")

    def on_epoch(self, record: EpochRecord) -> None:
        self.progress.update(self.steps, completed=0)
        self.progress.update(self.epochs, completed=record.epoch, metrics=epoch_line(record))

    def on_message(self, message: str) -> None:
        self.progress.console.print(note(message))


def epoch_line(r: EpochRecord) -> str:
    """The figures of one epoch, as the progress display shows them."""
    if r.clean_acc is None:  # an epoch the --eval-every schedule does not evaluate
        return f"loss {r.loss:.4f} · not evaluated (--eval-every)"
    if r.noisy_acc is not None:
        return f"loss {r.loss:.4f} · noisy {100 * r.noisy_acc:.1f}% · clean {100 * r.clean_acc:.1f}%"
    return (f"loss {r.loss:.4f} · clean {100 * r.clean_acc:.1f}% · VRA {100 * r.vra:.1f}% (estimate) · "
            f"ε {r.train_eps:.3g} · L≈{r.lipschitz_estimate:.3g}")


def train_table(result: TrainResult) -> Table:
    """The held-out figures of a finished run: sound ones first (bold: the headline), then the estimates."""
    c = result.config
    if c.smoothing is not None:
        table = _metric_table(f"{c.out_dir} (smoothing base model, {c.method}, σ={c.smoothing.sigma:g}, {c.arch.upper()}, "
                       f"{c.activation}) on {c.data}: held-out split", title_justify="left")
        table.add_row(f"accuracy on noisy inputs (σ={c.smoothing.sigma:g})", f"[bold]{100 * result.noisy_acc:.2f}%[/]")
        table.add_row("accuracy on noise-free inputs", f"{100 * result.clean_acc:.2f}%")
        table.add_row("training time", f"{result.seconds:.0f} s")
        return table
    r, local = c.robust, c.local
    table = _metric_table(f"{c.out_dir} ({c.arch.upper()}, {c.activation}, {c.method if local else r.loss}) on {c.data}: "
                          "held-out split", title_justify="left")
    table.add_row("clean accuracy", f"{100 * result.clean_acc:.2f}%")
    if local:
        table.add_row(f"VRA at ε={r.eps:g} ({c.method.upper()}, sound local bounds)",
                      f"[bold]{100 * result.vra_local_sound:.2f}%[/]")
    if result.vra_sound is not None:
        figure = f"{100 * result.vra_sound:.2f}%"
        table.add_row(f"VRA at ε={r.eps:g} (GloRo, frozen sound bound)", figure if local else f"[bold]{figure}[/]")
        table.add_row("global Lipschitz upper bound", f"{result.bound_global_upper:.6g}")
    estimate = c.method.upper() + " training bounds" if local else "power-iteration"
    table.add_row(f"VRA at ε={r.eps:g} ({estimate} estimate)", f"{100 * result.vra_estimate:.2f}%")
    table.add_row("training time", f"{result.seconds:.0f} s")
    return table


def train_lines(result: TrainResult) -> list[str]:
    """What follows the table: how a smoothing base model is certified, and the files written."""
    lines = []
    if result.config.smoothing is not None:
        lines.append("a smoothing base model certifies nothing by itself: certify it with `glorocert compare-rs --base`")
    lines.append(f"written to {result.config.out_dir}: " + ", ".join(Path(p).name for p in result.files.values()))
    return lines
