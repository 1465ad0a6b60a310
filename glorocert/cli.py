"""The `glorocert` command: parsing and rendering only; the work happens in glorocert.api.

Exit codes: 0 success · 1 a check failed (VRA below --fail-under, audit
violation) · 2 bad input or usage (one-line message, no traceback) ·
130 interrupted (no partial output is left behind).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from glorocert.errors import GlorocertError

app = typer.Typer(
    help="Certify the l2 robustness of neural-network classifiers with a frozen global Lipschitz bound (GloRo), "
    "and compare with randomized smoothing, BCP and Wong–Kolter.\n\n"
    "Typical use: `glorocert bound model.onnx` once, then `glorocert certify model.onnx --data mnist-5k --eps 0.3`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
DEBUG = {"on": False}

ModelArg = Annotated[Path, typer.Argument(help="Model file: .onnx, TorchScript (.pt), torch.export (.pt2) or a glorocert checkpoint (.safetensors).", show_default=False)]
InputShape = Annotated[Optional[str], typer.Option("--input-shape", help="Per-sample input shape C,H,W when the model does not record it (TorchScript), e.g. 1,28,28.")]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="Allow loading a pickled nn.Module (torch.save(model)); pickles can run arbitrary code.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (falls back to the CPU with a message).")]
# options shared by the commands that read a dataset (certify, compare-rs, compare-local, audit)
DataOpt = Annotated[str, typer.Option("--data", help="mnist-5k, fashion-mnist, digits, or a file: .npz, .npy (+ --labels), .csv, image folder.")]
EpsList = Annotated[str, typer.Option("--eps", help="l2 radius/radii in [0,1] pixel space, comma-separated: 0.3 or 0.1,0.3,1.58.")]
BoundOpt = Annotated[Optional[Path], typer.Option("--bound", help="Bound JSON (default: MODEL.bound.json next to the model, computed and cached if absent).")]
LabelsOpt = Annotated[Optional[Path], typer.Option("--labels", help="Labels .npy for a .npy input file.")]
StartOpt = Annotated[int, typer.Option("--start", help="First sample.")]
LayoutOpt = Annotated[str, typer.Option("--layout", help="auto, nchw or nhwc.")]
ScaleOpt = Annotated[str, typer.Option("--scale", help="auto (divide by 255 when needed), none or 255.")]
FallbackOpt = Annotated[str, typer.Option("--fallback", help="Local method the cascade uses: bcp or kw.")]
SplitOpt = Annotated[str, typer.Option("--split", help="train or test (built-in datasets).")]
StdOpt = Annotated[Optional[str], typer.Option("--std", help="Its per-channel std.")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    DEBUG["on"] = debug


def progress_bar(transient: bool = True) -> Progress:
    return Progress(
        SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=transient,
    )


def _load(model: Path, input_shape: str | None, trust_pickle: bool, device: str = "cpu"):
    from glorocert.loaders import load, parse_shape

    with err.status(f"loading {model} and checking the converted graph against it…"):
        loaded = load(model, input_shape=parse_shape(input_shape), trust_pickle=trust_pickle, device=device)
    for note in loaded.notes:
        err.print(f"[yellow]note:[/] {note}")
    return loaded


@app.command()
def bound(
    model: ModelArg,
    input_shape: InputShape = None,
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Where to write the bound JSON (default: MODEL.bound.json next to the model).")] = None,
    mode: Annotated[str, typer.Option("--mode", help="sound: guaranteed upper bounds (default). estimate: power iteration only, as in the GloRo paper — NOT a certificate.")] = "sound",
    tol: Annotated[float, typer.Option("--tol", help="Power-iteration convergence: relative eigen-residual ‖AᵀAx − λx‖/λ.")] = 1e-4,
    max_iter: Annotated[int, typer.Option("--max-iter", help="Power-iteration cap per operator.")] = 5000,
    lower: Annotated[bool, typer.Option("--lower", help="Also search for an empirical LOWER bound (largest local Jacobian norm found on mnist-style random inputs) and report upper ÷ lower.")] = False,
    exact_side: Annotated[int, typer.Option("--exact-side", help="Bound a linear block exactly when its smaller side has at most this many units (cost grows as its cube); larger convolutions get the circulant bound.")] = 2048,
    mean: Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean of a normalisation applied OUTSIDE the model, e.g. 0.1307; folded into the bound.")] = None,
    std: Annotated[Optional[str], typer.Option("--std", help="Per-channel std of that normalisation, e.g. 0.3081.")] = None,
    trust_pickle: TrustPickle = False,
    device: Device = "cpu",
) -> None:
    """Compute the model's global l2 Lipschitz bound and margin matrix once, and freeze them to JSON.

    Example: glorocert bound models/mnist-5k-eps0.3/model.onnx
    """
    from glorocert.api import compute_bound, normalization_of
    from glorocert.lipschitz.boundfile import default_path

    _check_outputs(json_=out_path)
    loaded = _load(model, input_shape, trust_pickle, device)
    normalization = normalization_of(_floats(mean, "--mean"), _floats(std, "--std"))
    with progress_bar() as progress:
        task = progress.add_task("bounding", total=len(loaded.graph.nodes))
        result = compute_bound(
            loaded, mode=mode, tol=tol, max_iter=max_iter, exact_side=exact_side, normalization=normalization,
            progress=lambda name: progress.update(task, completed=_position(loaded.graph, name), description=f"bounding {name}"),
        )
    path = result.save(out_path or default_path(model))  # atomic: Ctrl-C leaves no half-written bound
    table = Table(title=f"Lipschitz bounds of {model.name} ({result.mode})", title_justify="left")
    for col in ("#", "operator", "output", "estimate", "upper bound", "slack", "iters", "method"):
        table.add_column(col, justify="left" if col in ("operator", "method") else "right", overflow="fold")
    for k, b in enumerate(result.blocks, 1):
        slack = f"{(b['upper'] / b['estimate'] - 1) * 100:.4f}%" if b["estimate"] > 0 else "—"
        its = f"{b['iterations']}" + ("" if b["converged"] else " [red]not converged[/]")
        table.add_row(str(k), b["op"], "×".join(map(str, b["out_shape"])), f"{b['estimate']:.6g}", f"{b['upper']:.6g}", slack, its, b["method"])
    out.print(table)
    label = "guaranteed upper bound" if result.mode == "sound" else "[red]ESTIMATE (power iteration; not a certificate)[/]"
    out.print(f"global Lipschitz constant: [bold]{result.lipschitz:.6g}[/] ({label}); power-iteration estimate {result.global_estimate:.6g}")
    out.print(f"margin matrix: {result.margin_method}; computed in {result.seconds:.2f} s; written to {path}")
    if lower:
        import torch

        from glorocert.audit import lipschitz_lower_bounds

        with err.status("searching for a lower bound…"):
            found = lipschitz_lower_bounds(loaded.graph, torch.rand(64, *loaded.input_shape, generator=torch.Generator().manual_seed(0)), normalization=normalization)
        k = result.margin_matrix
        off = ~np.eye(len(k), dtype=bool)
        ratios = k[off] / np.maximum(np.asarray(found["margin_lower"])[off], 1e-300)
        out.print(f"empirical lower bound {found['global_lower']:.6g} → upper ÷ lower = {result.lipschitz / found['global_lower']:.3f} (global); "
                  f"margin K ÷ lower: median {np.median(ratios):.3f}, min {ratios.min():.3f}")
    if not result.all_converged:
        err.print("[yellow]warning:[/] power iteration did not converge on every block (raise --max-iter); the guaranteed bound is unaffected")


def _check_outputs(rows: Path | None = None, json_: Path | None = None, plot: Path | None = None) -> None:
    """Refuse unknown output formats before any work is done (nothing is written on a usage error)."""
    from glorocert.results import PLOT_FORMATS, ROW_FORMATS

    for path, formats in ((rows, ROW_FORMATS), (json_, (".json",)), (plot, PLOT_FORMATS)):
        if path is None:
            continue
        if path.suffix.lower() not in formats:
            raise GlorocertError(f"{path}: unknown format {path.suffix or '(no extension)'}; use one of {', '.join(formats)}")
        parent = next(p for p in path.absolute().parents if p.exists())  # missing directories are created later
        try:  # a real probe: permission bits say little to root or on special file systems
            with tempfile.TemporaryFile(dir=parent):
                pass
        except OSError as e:
            raise GlorocertError(f"{path}: cannot write to {parent} ({e.strerror}); choose a writable location") from None


def _position(graph, name: str) -> int:
    return next((k for k, n in enumerate(graph.nodes) if n.name == name), 0)


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise GlorocertError(f"{option} {text!r}: expected comma-separated numbers, e.g. 0.485,0.456,0.406") from None


@app.command()
def certify(
    model: ModelArg,
    data: DataOpt = "mnist-5k",
    eps: EpsList = "0.3",
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Per-sample rows: .csv, .jsonl or .parquet.")] = None,
    summary_path: Annotated[Optional[Path], typer.Option("--summary", help="Summary JSON.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Certified accuracy vs radius: .png, .svg or .pdf.")] = None,
    bound_path: BoundOpt = None,
    split: SplitOpt = "test",
    labels: LabelsOpt = None,
    start: StartOpt = 0,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Number of samples.")] = None,
    layout: LayoutOpt = "auto",
    scale: ScaleOpt = "auto",
    mean: Annotated[Optional[str], typer.Option("--mean", help="Normalisation applied outside the model (folded into the bound).")] = None,
    std: StdOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per forward pass.")] = 256,
    device: Device = "cpu",
    method: Annotated[str, typer.Option("--method", help="gloro (global bound, one forward pass), bcp or kw (local bounds on every sample; full radius by bisection), or cascade (gloro, then --fallback once per requested ε on the samples gloro leaves ⊥ there; a rescued sample's radius is the largest requested ε the fallback certified, so cascade radii lie on the --eps grid).")] = "gloro",
    fallback: FallbackOpt = "bcp",
    fail_under: Annotated[Optional[float], typer.Option("--fail-under", help="Exit 1 when the VRA at the largest ε is below this fraction (e.g. 0.9).")] = None,
    input_shape: InputShape = None,
    trust_pickle: TrustPickle = False,
) -> None:
    """Certify a whole dataset in one forward pass per batch: prediction, ⊥ flag and certified l2 radius per sample.

    Example: glorocert certify models/mnist-5k-eps0.3/model.onnx --data mnist-5k --eps 0.3,1.0 --out rows.csv --plot curve.png
    """
    from glorocert.api import certify as run
    from glorocert.data import open_dataset
    from glorocert.results import summary_table, write_json, write_rows

    eps_values = _floats(eps, "--eps")
    _check_outputs(rows=out_path, json_=summary_path, plot=plot)
    loaded = _load(model, input_shape, trust_pickle, device)
    dataset = open_dataset(
        data, split=split, labels=str(labels) if labels else None, layout=layout, scale=scale,
        mean=_floats(mean, "--mean"), std=_floats(std, "--std"), start=start, limit=limit,
        input_shape=loaded.input_shape,
    )
    with progress_bar() as progress:
        task = progress.add_task("certifying", total=dataset.num_samples)
        result = run(loaded, dataset, eps_values, bound=bound_path, batch_size=batch_size, method=method, fallback=fallback,
                     progress=lambda n: progress.advance(task, n))
    if out_path:
        from glorocert.api import ROWS_SCHEMA_VERSION

        write_rows(out_path, result.rows, ROWS_SCHEMA_VERSION)
    if summary_path:
        write_json(summary_path, result.summary)
    if plot:
        result.plot(plot)
    s = result.summary
    out.print(summary_table(s, f"{model.name} on {s['dataset']}"))
    out.print(
        f"{s['num_samples']} samples in {s['seconds']:.2f} s ({s['samples_per_second']:.0f}/s, {s['runner']}); "
        f"Lipschitz {s['lipschitz']:.4g} ({s['bound_mode']}, {s['bound_file']})"
    )
    if method == "cascade":
        out.print(cascade_line(s))
    if fail_under is not None:
        vra = s["vra"][max(s["vra"], key=float)]
        if vra < fail_under:
            err.print(f"VRA {vra:.4f} at ε={max(eps_values):g} is below --fail-under {fail_under}")
            raise typer.Exit(1)


def cascade_line(s: dict) -> str:
    """`cascade: bcp ran on 153 ⊥ samples (160 sample·ε passes) in 2.31 s and rescued 12 at ε=0.3 (VRA +1.2 pp)`."""
    n = s["num_samples"]
    rescued = ", ".join(f"{count} at ε={key} (VRA {100 * count / n:+.1f} pp)" for key, count in s["rescued"].items())
    return (f"cascade: {s['local_method']} ran on {s['local_samples']} ⊥ samples ({s['local_passes']} sample·ε passes) "
            f"in {s['local_seconds']:.2f} s and rescued {rescued}")


@app.command("compare-rs")
def compare_rs(
    gloro_model: ModelArg,
    data: Annotated[str, typer.Option("--data", help="Dataset, as for certify.")] = "mnist-5k",
    base: Annotated[Optional[Path], typer.Option("--base", help="Smoothing base model (default: the GloRo model itself). Noise-trained models smooth far better.")] = None,
    sigma: Annotated[float, typer.Option("--sigma", help="Noise level σ in [0,1] pixel space.")] = 0.25,
    n0: Annotated[int, typer.Option("--n0", help="Noisy samples to select the top class.")] = 100,
    n: Annotated[int, typer.Option("--n", help="Noisy samples to estimate its probability (Cohen: 100000).")] = 100_000,
    alpha: Annotated[float, typer.Option("--alpha", help="Failure probability of each smoothing certificate.")] = 0.001,
    batch: Annotated[int, typer.Option("--batch", help="Noisy copies per forward pass.")] = 1000,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Samples (before --skip).")] = None,
    skip: Annotated[int, typer.Option("--skip", help="Keep every k-th sample (Cohen used 20 on the test set).")] = 1,
    split: SplitOpt = "test",
    seed: Annotated[int, typer.Option("--seed", help="Noise seed (per sample: seed and index).")] = 0,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Directory for rows (both methods), summary.json and the appended smoothing log.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out without redoing finished samples.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Both certified-accuracy curves on one figure.")] = None,
    input_shape: InputShape = None,
    device: Device = "cpu",
    trust_pickle: TrustPickle = False,
) -> None:
    """GloRo certify and randomized smoothing (Cohen et al.) on the same samples, side by side.

    Example: glorocert compare-rs models/mnist-5k-eps0.3/model.onnx --data mnist-5k --sigma 0.25 --n 10000 --skip 20 --out out/rs --plot out/rs.png
    """
    from glorocert.compare import compare_rs as run
    from glorocert.compare import plot_comparison
    from glorocert.data import open_dataset

    if resume and out_dir is None:
        raise GlorocertError("--resume needs --out DIR (where the interrupted run wrote its rows)")
    _check_outputs(plot=plot)
    gloro_loaded = _load(gloro_model, input_shape, trust_pickle, device)
    base_loaded = _load(base, input_shape, trust_pickle, device) if base else gloro_loaded
    dataset = open_dataset(data, split=split, limit=limit, input_shape=gloro_loaded.input_shape)
    with progress_bar(transient=False) as progress:
        total = -(-dataset.num_samples // skip)
        tasks = {"gloro": progress.add_task("GloRo certify", total=total), "smoothing": progress.add_task(f"smoothing n={n}", total=total)}
        result = run(gloro_loaded, base_loaded, dataset, sigma=sigma, n0=n0, n=n, alpha=alpha, batch=batch, skip=skip,
                     seed=seed, out_dir=out_dir, resume=resume, progress=lambda what, k: progress.advance(tasks[what], k))
    if plot:
        plot_comparison(result, plot)
    table = Table(title=f"GloRo vs randomized smoothing on {result.summary['dataset']} ({result.summary['num_samples']} samples)", title_justify="left")
    table.add_column("")
    for row in result.table:
        table.add_column(row["method"], justify="right")
    for r in result.grid:
        table.add_row(f"certified accuracy at r={r:g}", *(f"{100 * row['certified_accuracy'][f'{r:g}']:.1f}%" for row in result.table))
    table.add_row("average certified radius", *(f"{row['acr']:.3f}" for row in result.table))
    table.add_row("seconds per sample", *(f"{row['seconds_per_sample']:.2e}" for row in result.table))
    table.add_row("guarantee", *(row["guarantee"] for row in result.table))
    out.print(table)
    out.print(f"smoothing costs {result.summary['speed_ratio_smoothing_over_gloro']:.3g}× GloRo's time per sample")


@app.command("compare-local")
def compare_local(
    model: ModelArg,
    data: DataOpt = "mnist-5k",
    eps: EpsList = "0.3",
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated: gloro (global bound), bcp, kw (local bounds, one pass per ε on every sample), cascade (gloro, then --fallback on its ⊥ samples).")] = "gloro,bcp,kw,cascade",
    kw_limit: Annotated[int, typer.Option("--kw-limit", help="KW certifies only the first N samples (it is ~1000× slower than gloro); 0: all.")] = 100,
    fallback: FallbackOpt = "bcp",
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the report (every row, versions) as JSON.")] = None,
    bound_path: BoundOpt = None,
    split: SplitOpt = "test",
    labels: LabelsOpt = None,
    start: StartOpt = 0,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Number of samples.")] = None,
    layout: LayoutOpt = "auto",
    scale: ScaleOpt = "auto",
    mean: Annotated[Optional[str], typer.Option("--mean", help="Normalisation applied outside the model (folded into the bound and the local methods' graph).")] = None,
    std: StdOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per forward pass / local-bound pass (KW's memory grows with it).")] = 256,
    device: Device = "cpu",
    input_shape: InputShape = None,
    trust_pickle: TrustPickle = False,
) -> None:
    """Compare certifiers on your model and data (the GloRo paper's Fig. 4b): VRA per ε, time and peak memory of gloro, BCP, KW and the cascade.

    Each method certifies the same samples (KW only the first --kw-limit) at every ε in a fresh process, so that
    its peak memory is its own. A method that cannot run on the model (e.g. BCP/KW on a MinMax network) gets a
    row saying why; the exit code is 0 as long as gloro ran.

    Example: glorocert compare-local model.onnx --data mnist-5k --limit 1000 --eps 0.3 --kw-limit 100 --json out/local.json
    """
    from glorocert.compare_local import Source, report_table, succeeded
    from glorocert.compare_local import compare_local as run
    from glorocert.loaders import parse_shape
    from glorocert.results import write_json

    _check_outputs(json_=json_path)
    source = Source(
        model=str(model), data=data, split=split, labels=str(labels) if labels else None, layout=layout, scale=scale,
        mean=_tuple(_floats(mean, "--mean")), std=_tuple(_floats(std, "--std")), start=start, limit=limit,
        input_shape=parse_shape(input_shape), trust_pickle=trust_pickle, device=device,
    )
    with err.status(f"loading {model} and {data}, checking the converted graph, resolving the bound…") as status:
        def started(method: str, n: int) -> None:
            status.update(f"{method}: certifying {n} samples in a fresh process…")

        def finished(row: dict) -> None:
            if row["status"] == "ok":
                err.print(f"{row['method']}: {row['samples']} samples in {row['seconds']:.2f} s", highlight=False)
            else:
                err.print(f"[yellow]{row['method']}: {row['status']}:[/] {row['error']}", highlight=False)

        report = run(source, _floats(eps, "--eps"), methods=methods, kw_limit=kw_limit, batch_size=batch_size,
                     fallback=fallback, bound=bound_path, progress=started, done=finished)
    for note in report["notes"]:
        err.print(f"[yellow]note:[/] {note}")
    if json_path:
        write_json(json_path, report)  # atomic: Ctrl-C leaves no half-written report
    out.print(report_table(report))
    out.print(f"Lipschitz {report['lipschitz']:.4g} ({report['bound_mode']}, {report['bound_file']})"
              + (f"; written to {json_path}" if json_path else ""))
    if not succeeded(report):
        err.print("gloro did not run (see its row)" if any(r["method"] == "gloro" for r in report["methods"]) else "no method ran (see the rows)")
        raise typer.Exit(1)


def _tuple(values: list[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(values)


@app.command()
def audit(
    model: ModelArg,
    data: Annotated[str, typer.Option("--data", help="Dataset, as for certify.")] = "mnist-5k",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Samples to certify and attack.")] = 200,
    split: SplitOpt = "test",
    bound_path: Annotated[Optional[Path], typer.Option("--bound", help="Bound JSON (default: next to the model).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Steps per attack.")] = 100,
    restarts: Annotated[int, typer.Option("--restarts", help="Random restarts of the fixed-budget PGD attack.")] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Attack seed.")] = 0,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Directory for audit.json and one .npz per violation.")] = None,
    mean: Annotated[Optional[str], typer.Option("--mean", help="Normalisation applied outside the model.")] = None,
    std: StdOpt = None,
    input_shape: InputShape = None,
    trust_pickle: TrustPickle = False,
) -> None:
    """Attack every certified sample inside its certified radius; exit 1 if any attack succeeds (a violation).

    Minimum-norm (FMN, DDN) and fixed-budget PGD attacks from foolbox, seeded, run on the IR; every
    adversarial example is re-checked on the native model. Also reports how far the nearest adversarial
    example lies beyond the certified radius.

    Example: glorocert audit models/mnist-5k-eps0.3/model.onnx --data mnist-5k --limit 200 --out out/audit
    """
    from glorocert.audit import audit as run
    from glorocert.data import open_dataset

    loaded = _load(model, input_shape, trust_pickle)
    dataset = open_dataset(data, split=split, limit=limit, mean=_floats(mean, "--mean"), std=_floats(std, "--std"), input_shape=loaded.input_shape)
    with progress_bar() as progress:
        task = progress.add_task("attacking certified samples", total=dataset.num_samples)
        result = run(loaded, dataset, bound=bound_path, steps=steps, restarts=restarts, seed=seed, out_dir=out_dir,
                     progress=lambda k: progress.advance(task, k))
    s = result.summary
    table = Table(title=f"audit of {model.name} on {dataset.name}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("samples", str(s["samples"]))
    table.add_row("certified samples audited", str(s["audited"]))
    table.add_row("violations", f"[{'red' if s['violations'] else 'green'}]{s['violations']}[/]")
    table.add_row("adversarial example found", str(s.get("adversarial_found", 0)))
    if s.get("median_gap_ratio") is not None:
        table.add_row("median (nearest adversarial ÷ radius)", f"{s['median_gap_ratio']:.3f}")
        table.add_row("median (nearest adversarial − radius)", f"{s['median_gap']:.4f}")
    out.print(table)
    for v in result.violations:
        err.print(f"[red]VIOLATION[/] sample {v['index']}: adversarial at distance {v['distance']:.6g} < certified radius {v['radius']:.6g}")
    if result.violations:
        raise typer.Exit(1)


def main() -> None:
    """Entry point: one handler turns user errors into a one-line message and exit code 2."""
    try:
        code = app(standalone_mode=False)  # click returns typer.Exit's code instead of raising it here
    except GlorocertError as e:
        if DEBUG["on"]:
            raise
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted; no partial output was written")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except Exception as e:  # usage errors (typer's own click) arrive here in standalone_mode=False
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        raise
    if code == 130:  # typer turns Ctrl-C into Exit(130) inside app()
        err.print("interrupted; no partial output was written")
    sys.exit(code if isinstance(code, int) else 0)


@app.command()
def export(
    model: Annotated[Path, typer.Argument(help="ONNX model to wrap (its frozen bound is found next to it, or given with --bound).", show_default=False)],
    out_path: Annotated[Path, typer.Argument(help="Where to write the GloRo ONNX model.", show_default=False)],
    eps: Annotated[float, typer.Option("--eps", help="l2 radius (in [0,1] pixel space) the ⊥ logit certifies.")] = 0.3,
    gloro: Annotated[bool, typer.Option("--gloro/--no-gloro", help="Append the ⊥ logit (the only export there is so far).")] = True,
    bound_path: Annotated[Optional[Path], typer.Option("--bound", help="Bound JSON (default: MODEL.bound.json, computed if absent).")] = None,
) -> None:
    """Write an ONNX model that outputs the C logits plus the GloRo ⊥ logit, with the frozen margin matrix baked in.

    Any ONNX runtime then certifies by argmax: a class other than the last (⊥) is certified at ε.

    Example: glorocert export models/mnist-5k-eps0.3/model.onnx out/gloro.onnx --eps 0.3
    """
    from glorocert.api import resolve_bound
    from glorocert.certify.gloro import ROUNDING_RTOL
    from glorocert.train.export import export_gloro_onnx

    if not gloro:
        raise GlorocertError("only --gloro export is supported")
    if model.suffix.lower() != ".onnx" or out_path.suffix.lower() != ".onnx":
        raise GlorocertError("export reads and writes .onnx files")
    loaded = _load(model, None, False)
    bound, source = resolve_bound(loaded, bound_path, None)
    if bound.mode != "sound":
        err.print("[yellow]warning:[/] the bound is an ESTIMATE; the exported ⊥ logit certifies nothing")
    path = export_gloro_onnx(model, bound.margin_matrix, eps, out_path, rounding_rtol=max(ROUNDING_RTOL, 4 * loaded.equivalence_gap))
    out.print(f"wrote {path}: {loaded.num_classes} logits + ⊥ at ε={eps:g} (bound: {source}, {bound.mode})")


@app.command()
def train(
    data: Annotated[str, typer.Option("--data", help="Training data: mnist-5k, fashion-mnist, digits (built-in train split; their test split is held out), or a labelled file (20 % per class held out).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory: model.safetensors, model.onnx, model.ts.pt, model.bound.json, card.md, log.csv (+ resume state).")],
    eps: Annotated[Optional[float], typer.Option("--eps", help="Test radius ε (l2, [0,1] pixels): the held-out VRA is measured and the model certified at it (required with --method gloro, bcp, kw).")] = None,
    method: Annotated[str, typer.Option("--method", help="gloro (a GloRo net, default); bcp (BCP's objective, Lee et al. 2020) or kw (Wong–Kolter robust loss, exact dual bounds: O(units²) per sample, for small nets) — ReLU nets to certify with certify --method bcp|kw; gaussian or macer (randomized-smoothing base models).")] = "gloro",
    sigma: Annotated[float, typer.Option("--sigma", help="Noise std σ in [0,1] pixel space (--method gaussian / macer).")] = 0.25,
    macer_k: Annotated[int, typer.Option("--macer-k", help="MACER: noisy copies per input.")] = 16,
    macer_beta: Annotated[float, typer.Option("--macer-beta", help="MACER: inverse softmax temperature β.")] = 16.0,
    macer_gamma: Annotated[float, typer.Option("--macer-gamma", help="MACER: hinge γ on Φ⁻¹(p_y) − Φ⁻¹(p_runner-up).")] = 8.0,
    macer_lam: Annotated[float, typer.Option("--macer-lam", help="MACER: weight λ of the robustness term (paper: 12 at σ=0.25, 4 at σ=0.5).")] = 12.0,
    arch: Annotated[str, typer.Option("--arch", help="2c2f, 4c3f, 6c2f or 8c2f (the GloRo paper's architectures).")] = "2c2f",
    activation: Annotated[str, typer.Option("--activation", help="relu or minmax.")] = "relu",
    minmax_pairing: Annotated[str, typer.Option("--minmax-pairing", help="halves (channel c with c+C/2, LiResNet) or adjacent (elements 2k, 2k+1, TF gloro).")] = "halves",
    loss: Annotated[str, typer.Option("--loss", help="ce (standard training baseline), gloro (GloRo cross-entropy with a ⊥ class) or trades (GloRo-TRADES).")] = "gloro",
    train_eps: Annotated[Optional[float], typer.Option("--train-eps", help="ε the loss uses (default: --eps); the paper trains at 1.1–1.5× the test ε.")] = None,
    eps_schedule: Annotated[Optional[str], typer.Option("--eps-schedule", help="Training-ε schedule: fixed, linear, linear_half, logarithmic, logarithmic_half (default: fixed for gloro; linear_half — 0 → ε over the first half — for bcp and kw, as in their papers).")] = None,
    lam: Annotated[float, typer.Option("--lam", help="Final TRADES λ (gloro with --loss trades), or the weight κ ∈ [0, 1] of the robust loss in (1 − κ)·CE + κ·robust (bcp, kw).")] = 1.0,
    lam_schedule: Annotated[Optional[str], typer.Option("--lam-schedule", help="λ / κ schedule: fixed, linear, linear_half (default: linear for gloro, linear_half for bcp, fixed for kw).")] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Number of epochs.")] = 10,
    warmup_epochs: Annotated[int, typer.Option("--warmup-epochs", help="Epochs of plain cross-entropy before the GloRo loss starts.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size.")] = 256,
    lr: Annotated[float, typer.Option("--lr", help="Initial Adam learning rate.")] = 1e-3,
    final_lr: Annotated[float, typer.Option("--final-lr", help="Learning rate at the end of the decay.")] = 1e-6,
    lr_schedule: Annotated[str, typer.Option("--lr-schedule", help="fixed, decay (exponential, whole run) or decay_after_half (constant, then exponential decay).")] = "decay_after_half",
    power_iterations: Annotated[int, typer.Option("--power-iterations", help="Power-iteration steps per batch; the iterates persist across steps.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed of initialisation, shuffling and iterates (runs are deterministic on CPU).")] = 0,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Train on the first N training samples only (quick runs).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out from its last finished epoch (same result as an uninterrupted run).")] = False,
    device: Device = "cpu",
) -> None:
    """Train a net that is certifiably robust at --eps — a GloRo net, or with --method bcp|kw a net trained for those local certifiers (or, with --method gaussian|macer, a randomized-smoothing base model) — and write it, its frozen bound and its model card to --out.

    Example: glorocert train --arch 2c2f --activation minmax --data mnist-5k --eps 0.3 --train-eps 0.45 --loss trades --lam 2 --epochs 200 --out models/mnist-5k-eps0.3

    Example: glorocert train --method bcp --data mnist-5k --eps 1.58 --epochs 60 --batch-size 50 --lr 3e-4 --out models/mnist-5k-bcp1.58

    Example: glorocert train --method macer --sigma 0.25 --data mnist-5k --epochs 50 --out models/mnist-5k-macer0.25
    """
    from glorocert.train import TrainConfig, TrainProgress
    from glorocert.train import train as run
    from glorocert.train.datasets import load_training_data
    from glorocert.train.losses import SMOOTHING_METHODS, parse_method
    from glorocert.train.outputs import command_line

    parse_method(method)
    smoothing = method in SMOOTHING_METHODS
    if eps is None:
        if not smoothing:
            raise GlorocertError(f"--eps is required with --method {method}")
        eps = TrainConfig.eps
    config = TrainConfig(
        arch=arch, activation=activation, minmax_pairing=minmax_pairing, loss=loss, eps=eps, train_eps=train_eps,
        eps_schedule=eps_schedule, lam=lam, lam_schedule=lam_schedule, epochs=epochs, warmup_epochs=warmup_epochs,
        batch_size=batch_size, lr=lr, final_lr=final_lr, lr_schedule=lr_schedule, power_iterations=power_iterations,
        seed=seed, device=device, out_dir=str(out_dir), resume=resume, data=data, data_limit=limit,
        method=method, sigma=sigma, macer_k=macer_k, macer_beta=macer_beta, macer_gamma=macer_gamma,
        macer_lam=macer_lam,
    )
    config.command = command_line(config)
    with err.status(f"loading {data}…"):
        training = load_training_data(data, limit=limit)
    config.data_description = training.description

    progress = Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"), console=err, transient=False,
    )

    class Show(TrainProgress):
        def on_start(self, total_epochs: int, steps_per_epoch: int, start_epoch: int) -> None:
            self.epochs = progress.add_task("epochs", total=total_epochs, completed=start_epoch, metrics="")
            self.steps = progress.add_task("batches", total=steps_per_epoch, metrics="")

        def on_step(self, epoch: int, step: int, loss_value: float) -> None:
            progress.update(self.steps, completed=step + 1, metrics=f"loss {loss_value:.4f}")

        def on_epoch(self, r) -> None:
            progress.update(self.steps, completed=0)
            if r.noisy_acc is not None:
                progress.update(self.epochs, completed=r.epoch, metrics=(
                    f"loss {r.loss:.4f} · noisy {100 * r.noisy_acc:.1f}% · clean {100 * r.clean_acc:.1f}%"))
                return
            progress.update(self.epochs, completed=r.epoch, metrics=(
                f"loss {r.loss:.4f} · clean {100 * r.clean_acc:.1f}% · VRA {100 * r.vra:.1f}% (estimate) · ε {r.train_eps:.3g} · L≈{r.lipschitz_estimate:.3g}"))

        def on_message(self, message: str) -> None:
            progress.console.print(f"[yellow]note:[/] {message}")

    with progress:
        result = run(config, training.x_train, training.y_train, training.x_val, training.y_val, progress=Show())
    if smoothing:
        table = Table(title=f"{out_dir} (smoothing base model, {method}, σ={sigma:g}, {arch.upper()}, {activation}) on {data}: held-out split", title_justify="left")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row(f"accuracy on noisy inputs (σ={sigma:g})", f"[bold]{100 * result.noisy_acc:.2f}%[/]")
        table.add_row("accuracy on noise-free inputs", f"{100 * result.clean_acc:.2f}%")
        table.add_row("training time", f"{result.seconds:.0f} s")
        out.print(table)
        out.print("a smoothing base model certifies nothing by itself: certify it with `glorocert compare-rs --base`")
        out.print(f"written to {out_dir}: " + ", ".join(Path(p).name for p in result.files.values()))
        return
    local = method in ("bcp", "kw")
    table = Table(title=f"{out_dir} ({arch.upper()}, {activation}, {method if local else loss}) on {data}: held-out split", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("clean accuracy", f"{100 * result.clean_acc:.2f}%")
    if local:
        table.add_row(f"VRA at ε={eps:g} ({method.upper()}, sound local bounds)", f"[bold]{100 * result.vra_local_sound:.2f}%[/]")
    if result.vra_sound is not None:
        table.add_row(f"VRA at ε={eps:g} (GloRo, frozen sound bound)", f"{100 * result.vra_sound:.2f}%" if local else f"[bold]{100 * result.vra_sound:.2f}%[/]")
        table.add_row("global Lipschitz upper bound", f"{result.bound_global_upper:.6g}")
    table.add_row(f"VRA at ε={eps:g} ({method.upper() + ' training bounds' if local else 'power-iteration'} estimate)", f"{100 * result.vra_estimate:.2f}%")
    table.add_row("training time", f"{result.seconds:.0f} s")
    out.print(table)
    out.print(f"written to {out_dir}: " + ", ".join(Path(p).name for p in result.files.values()))


if __name__ == "__main__":
    main()
