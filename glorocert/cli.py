"""The `glorocert` command: parsing and rendering only.

Every command checks its output paths, loads the model, calls one function of
the public API (glorocert.api) or of a study (glorocert.studies), and prints
what glorocert.render builds from the result.

Exit codes: 0 success · 1 a check failed (VRA below --fail-under, audit
violation) · 2 bad input or usage (one-line message, no traceback) ·
130 interrupted (no partial output is left behind).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from glorocert import api, distributed, files, render, results
from glorocert.errors import GlorocertError, InputShapeNeeded, Terminated, caused_by_interrupt, interrupt_on_sigterm
from glorocert.render import err, out

app = typer.Typer(
    help="Certify the l2 robustness of neural-network classifiers with a frozen global Lipschitz bound (GloRo), "
    "and compare with randomized smoothing, BCP and Wong–Kolter.\n\n"
    "Typical use: `glorocert bound model.onnx` once, then `glorocert certify model.onnx --data mnist-5k --eps 0.3`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
DEBUG = {"on": False}
_RUN: dict[str, files.Outputs | None] = {"outputs": None}  # the running command's outputs, for the interrupt message

# options shared by every command that loads a model
ModelArg = Annotated[Path, typer.Argument(help="Model file: .onnx, TorchScript (.pt), torch.export (.pt2) or a glorocert checkpoint (.safetensors).", show_default=False)]
InputShape = Annotated[Optional[str], typer.Option("--input-shape", help="Per-sample input shape C,H,W when the model does not record it (TorchScript), e.g. 1,28,28; commands that read --data take it from the data.")]
OutputOpt = Annotated[Optional[str], typer.Option("--output", help="The logits tensor to certify, for a model with several outputs (or any tensor of the graph). A final Softmax/LogSoftmax is recognised without it.")]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="Allow loading a pickled nn.Module (torch.save(model)); pickles can run arbitrary code.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (falls back to the CPU with a message).")]
BoundOpt = Annotated[Optional[Path], typer.Option("--bound", help="Bound JSON (default: MODEL.bound.json next to the model, computed and cached if absent).")]
VerifyBoundOpt = Annotated[bool, typer.Option("--verify-bound", help="Recompute the bound from the model first (about as long as `glorocert bound`) and refuse the bound file if any of its constants is below the recomputed one.")]
# normalisation applied outside the model (bound, and every command that reads a dataset)
MeanOpt = Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean of a normalisation (x − mean) / std applied OUTSIDE the model, e.g. 0.1307 or 0.485,0.456,0.406; folded into the bound.")]
StdOpt = Annotated[Optional[str], typer.Option("--std", help="Its per-channel std, e.g. 0.3081.")]
# certification options
EpsList = Annotated[str, typer.Option("--eps", help="l2 radius/radii in [0,1] pixel space, comma-separated: 0.3 or 0.1,0.3,1.58.")]
FallbackOpt = Annotated[str, typer.Option("--fallback", help="Local method the cascade uses: bcp or kw.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Samples per forward pass / local-bound pass (KW's memory grows with it).")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    DEBUG["on"] = debug


def _load(model: Path, input_shape: str | None, trust_pickle: bool, device: str, output: str | None = None,
          data: "DataOptions | None" = None) -> api.Model:
    """Load ``model``; the per-sample shape of ``data`` stands in for an input shape the file does not record."""
    shape = api.parse_shape(input_shape)
    options = dict(trust_pickle=trust_pickle, device=device, output=output)
    with err.status(f"loading {model} and checking the converted graph against it…"):
        try:
            loaded = api.load(model, input_shape=shape, **options)
        except InputShapeNeeded:
            if data is None:
                raise
            loaded = api.load(model, data_shape=data.sample_shape(), **options)
    for message in loaded.notes:
        err.print(render.note(message))
    return loaded


def _frozen(model: Path, bound_path: Path | None, data: "DataOptions", device: str, output: str | None,
            input_shape: str | None) -> api.Model | None:
    """The model as its bound file recorded it (certify/frozen.py: no IR, no torch), or None for the full load."""
    options = data.parsed()
    return api.frozen_model(model, bound_path, api.Normalization.of(options["mean"], options["std"]), device=device,
                            output=output, input_shape=api.parse_shape(input_shape))


_FLOAT_EXAMPLES = {  # what a wrong value is told, per option
    "--eps": "e.g. 0.3 or 0.1,0.3",
    "--mean": "one value or per-channel values, e.g. 0.1307 or 0.485,0.456,0.406",
    "--std": "one value or per-channel values, e.g. 0.3081 or 0.229,0.224,0.225",
}


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise GlorocertError(f"{option} {text!r}: expected comma-separated numbers, {_FLOAT_EXAMPLES[option]}") from None


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """Which samples a command reads: the data options, declared once here for every command that reads a dataset."""

    data: Annotated[str, typer.Option("--data", help="mnist-5k, fashion-mnist, digits, or a file: .npz, .npy (+ --labels), .csv, image folder, Parquet shards (directory or glob, from `glorocert data export`).")] = "mnist-5k"
    split: Annotated[str, typer.Option("--split", help="train or test (built-in datasets).")] = "test"
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Labels .npy for a .npy input file.")] = None
    start: Annotated[int, typer.Option("--start", help="First sample.")] = 0
    limit: Annotated[Optional[int], typer.Option("--limit", help="Number of samples, from --start.")] = None
    layout: Annotated[str, typer.Option("--layout", help="auto, nchw or nhwc.")] = "auto"
    scale: Annotated[str, typer.Option("--scale", help="auto (divide by 255 when some pixel exceeds 1, and say so; integer pixels that are all 0 or 1 stay as they are), none or 255.")] = "auto"
    mean: MeanOpt = None
    std: StdOpt = None

    def parsed(self) -> dict:
        """The options as glorocert.api.open_dataset and compare_local.Source take them (numbers parsed)."""
        return dict(data=self.data, split=self.split, labels=str(self.labels) if self.labels else None, start=self.start,
                    limit=self.limit, layout=self.layout, scale=self.scale, mean=_floats(self.mean, "--mean"),
                    std=_floats(self.std, "--std"))

    def inputs(self) -> list[Path]:
        """The files the data options name (a built-in dataset's name is no file), so that no output overwrites them."""
        return [Path(p) for p in (self.data, self.labels) if p is not None and str(p) not in api.BUILTINS]

    def sample_shape(self) -> tuple[int, ...]:
        """The data's per-sample shape, read without a model (for a model file that does not record its own)."""
        options = self.parsed()
        return tuple(api.open_dataset(options.pop("data"), **options).shape)

    def open(self, model: api.Model | None) -> api.Dataset:
        """The dataset, for ``model``'s input shape (any shape without a model); prints its notes (scaling, labels)."""
        options = self.parsed()
        dataset = api.open_dataset(options.pop("data"), **options, input_shape=model.input_shape if model else None)
        for message in dataset.notes:
            err.print(render.note(escape(message)), highlight=False, soft_wrap=True)
        return dataset


def _option_group(group: type, parameter: str, **defaults):
    """Give a command a group of options: its ``parameter`` (a ``group`` dataclass) becomes the group's fields.

    Typer builds a command's options from its signature, so the signature shown to typer lists each field (an
    Annotated option; ``defaults`` overrides a field's default for this command) in place of ``parameter``,
    and the call packs the parsed values back into one ``group`` (the way click shares a group of options).
    """
    hints = typing.get_type_hints(group, include_extras=True)
    fields = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[f.name],
                                default=defaults.get(f.name, f.default)) for f in dataclasses.fields(group)]

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != parameter]
        at = list(signature.parameters).index(parameter)

        @functools.wraps(command)
        def with_group(**options):
            return command(**{parameter: group(**{f.name: options.pop(f.name) for f in fields})}, **options)

        with_group.__signature__ = signature.replace(parameters=own[:at] + fields + own[at:])
        with_group.__annotations__ = {p.name: p.annotation for p in with_group.__signature__.parameters.values()}
        return with_group

    return decorate


def reads_data(**defaults):
    """Give a command the data options (:class:`DataOptions`) as its ``data_options`` parameter."""
    return _option_group(DataOptions, "data_options", **defaults)


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """Where a command runs: in process (the default), or with --ray on a Ray cluster (glorocert/distributed.py)."""

    ray: Annotated[Optional[str], typer.Option("--ray", help="Run on a Ray cluster: --ray alone (or auto) joins RAY_ADDRESS, else starts a local one; --ray ray://HOST:PORT or HOST:PORT joins that cluster. Rows go to --out DIR as Parquet parts as they finish (pip install 'glorocert[ray]').", show_default=False)] = None
    ray_workers: Annotated[Optional[int], typer.Option("--ray-workers", help="With --ray: actors in the pool (default: one per CPU of the cluster).")] = None
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out without redoing finished samples (with --ray: the parts whose rows are complete); refused if it was made with another model, bound, data or settings.")] = False

    def check(self, out_dir: Path | None, *, resumes_in_process: bool = False) -> None:
        """Refuse, before any work, options that do not go together (and --ray without Ray installed)."""
        if self.ray is None:
            if self.ray_workers is not None:
                raise GlorocertError("--ray-workers sets the size of the --ray actor pool; add --ray")
            if self.resume and not resumes_in_process:
                raise GlorocertError("--resume continues an interrupted --ray run; add --ray and give its --out DIR")
            return
        distributed.require()
        if out_dir is None:
            raise GlorocertError("--ray writes the rows into --out DIR as they finish (Parquet parts, resumable); give --out DIR")
        if out_dir.suffix.lower() in results.ROW_FORMATS or (out_dir.exists() and not out_dir.is_dir()):
            raise GlorocertError(f"--out {out_dir}: with --ray, --out names a directory (rows/part-NNNNN.parquet, "
                                 f"{distributed.RUN_MANIFEST}, the summary)")
        if self.ray_workers is not None and self.ray_workers < 1:
            raise GlorocertError(f"--ray-workers {self.ray_workers}: expected at least 1")

    def kept(self, out_dir: Path) -> str:
        return f"the finished row parts in {out_dir / distributed.ROWS_DIR}: rerun with --resume to continue"

    def run(self) -> dict:
        """The keyword arguments of the library's ``*_on_ray`` functions."""
        return dict(address=self.ray, workers=self.ray_workers, resume=self.resume)


def runs_on_ray(command):
    """Give a command the Ray options (:class:`RayOptions`) as its ``ray_options`` parameter."""
    return _option_group(RayOptions, "ray_options")(command)


def _recipe(model: Path, input_shape: str | None, trust_pickle: bool, device: str, output: str | None,
            dataset: api.Dataset, fast_bound: Path | None = None) -> api.ModelRecipe:
    """How each Ray worker loads ``model``, as this process did: the fast path from ``fast_bound`` when it was taken."""
    return api.ModelRecipe(str(model), api.parse_shape(input_shape), tuple(dataset.shape), output, trust_pickle, device,
                           None if fast_bound is None else str(fast_bound), dataset.normalization)


@app.command("bound")
def bound_command(
    model: ModelArg,
    input_shape: InputShape = None,
    output: OutputOpt = None,
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Where to write the bound JSON (default: MODEL.bound.json next to the model).")] = None,
    mode: Annotated[str, typer.Option("--mode", help="sound: guaranteed upper bounds (default). estimate: power iteration only, as in the GloRo paper — NOT a certificate.")] = "sound",
    tol: Annotated[float, typer.Option("--tol", help="Power-iteration convergence: relative eigen-residual ‖AᵀAx − λx‖/λ.")] = 1e-4,
    max_iter: Annotated[int, typer.Option("--max-iter", help="Power-iteration cap per operator.")] = 5000,
    lower: Annotated[bool, typer.Option("--lower", help="Also search for an empirical LOWER bound (largest local Jacobian norm found on mnist-style random inputs) and report upper ÷ lower.")] = False,
    exact_side: Annotated[int, typer.Option("--exact-side", help="Bound a linear block exactly when its smaller side has at most this many units (cost grows as its cube); larger convolutions get the smaller of the circulant and circulant-box bounds.")] = 2048,
    mean: MeanOpt = None,
    std: StdOpt = None,
    trust_pickle: TrustPickle = False,
    device: Device = "cpu",
) -> None:
    """Compute the model's global l2 Lipschitz bound and margin matrix once, and freeze them to JSON.

    Example: glorocert bound models/mnist-5k-eps0.3/model.onnx
    """
    from glorocert.studies import lower_bound  # each command imports what it runs (certify: neither torch nor onnx)

    api.check_bound_settings(mode, tol, max_iter)  # before any work
    outputs = _outputs(model)
    target = outputs.add(out_path or api.default_path(model), "--out", (".json",))
    loaded = _load(model, input_shape, trust_pickle, device, output)
    normalization = api.Normalization.of(_floats(mean, "--mean"), _floats(std, "--std"))
    with render.progress_bar() as progress:
        task = progress.add_task("bounding", total=len(loaded.graph.nodes))
        bound = api.compute_bound(loaded, mode=mode, tol=tol, max_iter=max_iter, exact_side=exact_side, normalization=normalization,
                                  progress=render.bound_progress(progress, task, loaded.graph))
    with outputs.publishing():
        path = bound.save(target)
    out.print(render.bound_table(model.name, bound))
    out.print(render.bound_lines(bound, path))
    if lower:
        with err.status("searching for a lower bound…"):
            found = lower_bound.looseness(loaded, bound, normalization)
        out.print(render.looseness_line(found))
    if not bound.all_converged:
        err.print("[yellow]warning:[/] power iteration did not converge on every block (raise --max-iter); the guaranteed bound is unaffected")


@app.command("certify")
@reads_data()
@runs_on_ray
def certify_command(
    model: ModelArg,
    data_options: DataOptions,
    eps: EpsList = "0.3",
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Per-sample rows: .csv, .jsonl or .parquet; with --ray, a directory.")] = None,
    summary_path: Annotated[Optional[Path], typer.Option("--summary", help="Summary JSON (with --ray, default: OUT/summary.json).")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Certified accuracy vs radius: .png, .svg or .pdf.")] = None,
    bound_path: BoundOpt = None,
    verify_bound: VerifyBoundOpt = False,
    batch_size: BatchSizeOpt = 256,
    device: Device = "cpu",
    method: Annotated[str, typer.Option("--method", help="gloro (global bound, one forward pass), bcp or kw (local bounds on every sample; full radius by bisection), or cascade (gloro, then --fallback once per requested ε on the samples gloro leaves ⊥ there; a rescued sample's radius is the largest requested ε the fallback certified, so cascade radii lie on the --eps grid).")] = "gloro",
    fallback: FallbackOpt = "bcp",
    fail_under: Annotated[Optional[float], typer.Option("--fail-under", help="Exit 1 when the VRA at the largest ε is below this fraction (e.g. 0.9).")] = None,
    input_shape: InputShape = None,
    output: OutputOpt = None,
    trust_pickle: TrustPickle = False,
    ray_options: RayOptions = RayOptions(),
) -> None:
    """Certify a whole dataset in one forward pass per batch: prediction, ⊥ flag and certified l2 radius per sample.

    Example: glorocert certify models/mnist-5k-eps0.3/model.onnx --data mnist-5k --eps 0.3,1.0 --out rows.csv --plot curve.png
    """
    eps_values = _floats(eps, "--eps")
    if fail_under is not None and not 0 <= fail_under <= 1:
        raise GlorocertError(f"--fail-under {fail_under}: expected a fraction in [0, 1], e.g. 0.9 (VRA at least 90 %)")
    outputs, summary_path = _certify_outputs(model, bound_path, data_options, ray_options, out_path, summary_path, plot)
    frozen = method == "gloro" and not verify_bound  # gloro needs only the bound: the fast path, when it vouches
    loaded = (frozen and _frozen(model, bound_path, data_options, device, output, input_shape)) or _load(
        model, input_shape, trust_pickle, device, output, data_options)
    dataset = data_options.open(loaded)
    if fail_under is not None and not dataset.has_labels:
        raise GlorocertError(f"--fail-under checks the VRA, which needs labels, and {dataset.name} has none (only the "
                             "fraction of certified predictions is reported); give labelled data or drop --fail-under")
    if verify_bound:
        with err.status("recomputing the bound from the model (--verify-bound)…"):
            api.resolve_bound(loaded, bound_path, dataset.normalization, verify=True)
    fast_bound = (bound_path or api.default_path(model)) if loaded.graph is None else None  # the fast path, for --ray
    result = _certify(loaded, dataset, eps_values, dict(bound=bound_path, batch_size=batch_size, method=method,
                      fallback=fallback), ray_options, outputs, out_path,
                      lambda: _recipe(model, input_shape, trust_pickle, device, output, dataset, fast_bound))
    with outputs.publishing():  # all or nothing
        if out_path and ray_options.ray is None:
            results.write_rows(out_path, result.rows, api.ROWS_SCHEMA_VERSION)
        if summary_path:
            files.write_json(summary_path, result.summary)
        if plot:
            result.plot(plot)
    s = result.summary
    out.print(render.summary_table(s, f"{model.name} on {s['dataset']}"))
    out.print(render.certify_line(s))
    if method == "cascade":
        out.print(render.cascade_line(s))
    if fail_under is not None:
        vra = s["vra"][max(s["vra"], key=float)]
        if vra < fail_under:
            err.print(f"VRA {vra:.4f} at ε={max(eps_values):g} is below --fail-under {fail_under}")
            raise typer.Exit(1)


def _certify_outputs(model: Path, bound_path: Path | None, data_options: DataOptions, ray_options: RayOptions,
                     out_path: Path | None, summary_path: Path | None, plot: Path | None) -> tuple[files.Outputs, Path | None]:
    """certify's outputs, checked before any work, and its summary's path (with --ray, by default OUT/summary.json;
    the row parts are written as they finish, not staged)."""
    ray_options.check(out_path)
    outputs = _outputs(model, api.default_path(model), bound_path, *data_options.inputs())
    if ray_options.ray is None:
        outputs.add(out_path, "--out", results.ROW_FORMATS)
    summary_path = summary_path or (out_path / "summary.json" if ray_options.ray else None)
    outputs.add(summary_path, "--summary", (".json",))
    outputs.add(plot, "--plot", results.PLOT_FORMATS)
    return outputs, summary_path


def _certify(loaded: api.Model, dataset: api.Dataset, eps: tuple[float, ...], options: dict, ray_options: RayOptions,
             outputs: files.Outputs, out_dir: Path | None, recipe) -> api.CertifyResult:
    """certify in process, or with --ray on the cluster (the rows then in --out DIR as they finish), with a progress bar."""
    with render.progress_bar() as progress:
        task = progress.add_task("certifying", total=dataset.num_samples)
        advance = lambda n: progress.advance(task, n)  # noqa: E731
        if ray_options.ray is None:
            return api.certify(loaded, dataset, eps, **options, progress=advance)
        outputs.kept.append(ray_options.kept(out_dir))
        return api.certify_on_ray(loaded, recipe(), dataset, eps, out_dir, **options, **ray_options.run(), progress=advance)


@app.command("compare-rs")
@reads_data()
@runs_on_ray
def compare_rs_command(
    gloro_model: ModelArg,
    data_options: DataOptions,
    base: Annotated[Optional[Path], typer.Option("--base", help="Smoothing base model (default: the GloRo model itself). Noise-trained models smooth far better.")] = None,
    sigma: Annotated[float, typer.Option("--sigma", help="Noise level σ in [0,1] pixel space.")] = 0.25,
    n0: Annotated[int, typer.Option("--n0", help="Noisy samples to select the top class.")] = 100,
    n: Annotated[int, typer.Option("--n", help="Noisy samples to estimate its probability (Cohen: 100000).")] = 100_000,
    alpha: Annotated[float, typer.Option("--alpha", help="Failure probability of each smoothing certificate.")] = 0.001,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Noisy copies per forward pass.")] = 1000,
    batch: Annotated[Optional[int], typer.Option("--batch", hidden=True, help="Old spelling of --batch-size.")] = None,
    skip: Annotated[int, typer.Option("--skip", help="Keep every k-th of the --limit samples (Cohen used 20 on the test set).")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Noise seed (per sample: seed and index).")] = 0,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Directory for rows (both methods), summary.json and the appended smoothing log (with --ray: the row parts).")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Both certified-accuracy curves on one figure.")] = None,
    verify_bound: VerifyBoundOpt = False,
    input_shape: InputShape = None,
    output: OutputOpt = None,
    device: Device = "cpu",
    trust_pickle: TrustPickle = False,
    ray_options: RayOptions = RayOptions(),
) -> None:
    """GloRo certify and randomized smoothing (Cohen et al.) on the same samples, side by side.

    With --mean/--std, both models see the normalised input, and smoothing adds its noise to the [0,1] pixels.

    Example: glorocert compare-rs models/mnist-5k-eps0.3/model.onnx --data mnist-5k --sigma 0.25 --n 10000 --skip 20 --out out/rs --plot out/rs.png
    """
    from glorocert.studies import compare_rs

    parameters = dict(sigma=sigma, n0=n0, n=n, alpha=alpha, skip=skip, seed=seed)
    batch_size = batch_size if batch is None else batch
    compare_rs.check_parameters(**{k: v for k, v in parameters.items() if k != "seed"}, batch=batch_size)
    outputs = _compare_rs_outputs(compare_rs, (gloro_model, base), data_options, out_dir, plot, ray_options)
    in_process = ray_options.ray is None
    gloro_loaded = _load(gloro_model, input_shape, trust_pickle, device, output, data_options)
    base_loaded = _load(base, input_shape, trust_pickle, device, output, data_options) if base else gloro_loaded
    dataset = data_options.open(gloro_loaded)
    if in_process:  # the manifest is resume state: written now, not staged with the results
        compare_rs.start_run(out_dir, ray_options.resume, compare_rs.run_manifest(gloro_loaded, base_loaded, dataset, **parameters))
    if verify_bound:
        with err.status("recomputing the bound from the model (--verify-bound)…"):
            api.resolve_bound(gloro_loaded, None, dataset.normalization, verify=True)
    if out_dir is not None:
        outputs.kept.append(ray_options.kept(out_dir) if not in_process else
                            f"the finished smoothing rows in {out_dir / compare_rs.SMOOTHING_ROWS}: rerun with --resume to continue")
    recipes = lambda: tuple(_recipe(m, input_shape, trust_pickle, device, output, dataset) for m in (gloro_model, base or gloro_model))  # noqa: E731
    with render.progress_bar(transient=False) as progress, outputs.publishing():
        total = compare_rs.EveryKth(dataset, skip).num_samples
        tasks = {"gloro": progress.add_task("GloRo certify", total=total), "smoothing": progress.add_task(f"smoothing n={n}", total=total)}
        result = _compare_rs(compare_rs, (gloro_loaded, base_loaded), recipes, dataset, dict(**parameters, batch=batch_size),
                             out_dir, ray_options, lambda what, k: progress.advance(tasks[what], k))
        if plot:
            compare_rs.plot_comparison(result, plot)
    out.print(render.compare_rs_table(result))
    out.print(render.compare_rs_line(result.summary))


def _compare_rs_outputs(compare_rs, models: tuple[Path, Path | None], data_options: DataOptions, out_dir: Path | None,
                        plot: Path | None, ray_options: RayOptions) -> files.Outputs:
    """compare-rs's outputs, checked before any work: in process, the --out directory's results and its resume log;
    with --ray only the summary is staged (the row parts are written as they finish)."""
    ray_options.check(out_dir, resumes_in_process=True)
    if ray_options.ray is None:
        compare_rs.check_out(out_dir, ray_options.resume)
    outputs = _outputs(models[0], models[1], api.default_path(models[0]), *data_options.inputs())
    if ray_options.ray is None:
        outputs.add_directory(out_dir, "--out", compare_rs.RESULT_FILES)
    else:
        outputs.add(out_dir / compare_rs.RESULT_FILES[-1], "--out", (".json",))
    outputs.add(plot, "--plot", results.PLOT_FORMATS)
    return outputs


def _compare_rs(compare_rs, models: tuple[api.Model, api.Model], recipes, dataset: api.Dataset, parameters: dict,
                out_dir: Path | None, ray_options: RayOptions, progress):
    """compare-rs in process, or with --ray on the cluster (``recipes()``: how each worker loads both models)."""
    if ray_options.ray is None:
        return compare_rs.compare_rs(*models, dataset, **parameters, out_dir=out_dir, resume=ray_options.resume,
                                     progress=progress)
    return compare_rs.compare_rs_on_ray(*models, recipes(), dataset, out_dir, **parameters, **ray_options.run(),
                                        progress=progress)


@app.command("compare-local")
@reads_data()
@runs_on_ray
def compare_local_command(
    model: ModelArg,
    data_options: DataOptions,
    eps: EpsList = "0.3",
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated: gloro (global bound), bcp, kw (local bounds, one pass per ε on every sample), cascade (gloro, then --fallback on its ⊥ samples).")] = "gloro,bcp,kw,cascade",
    kw_limit: Annotated[int, typer.Option("--kw-limit", help="KW certifies only the first N samples (it is ~1000× slower than gloro); 0: all.")] = 100,
    fallback: FallbackOpt = "bcp",
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the report (every row, versions) as JSON.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="With --ray: directory for each method's row parts (OUT/METHOD/rows/part-NNNNN.parquet).")] = None,
    bound_path: BoundOpt = None,
    batch_size: BatchSizeOpt = 256,
    device: Device = "cpu",
    input_shape: InputShape = None,
    output: OutputOpt = None,
    trust_pickle: TrustPickle = False,
    ray_options: RayOptions = RayOptions(),
) -> None:
    """Compare certifiers on your model and data (the GloRo paper's Fig. 4b): VRA per ε, time and peak memory of gloro, BCP, KW and the cascade.

    Each method certifies the same samples (KW only the first --kw-limit) at every ε in a fresh process, so that
    its peak memory is its own. A method that cannot run on the model (e.g. BCP/KW on a MinMax network) gets a
    row saying why; the exit code is 0 as long as gloro ran.

    Example: glorocert compare-local model.onnx --data mnist-5k --limit 1000 --eps 0.3 --kw-limit 100 --json out/local.json
    """
    from glorocert.studies import compare_local

    ray_options.check(out_dir)
    if out_dir is not None and ray_options.ray is None:
        raise GlorocertError("--out is where --ray writes each method's rows; in process, write the report with --json")
    outputs = _outputs(model, api.default_path(model), bound_path, *data_options.inputs())
    outputs.add(json_path, "--json", (".json",))
    dataset = data_options.open(None)  # opened once here (printing its notes) before any method's process starts
    if not dataset.has_labels:
        raise GlorocertError(f"compare-local compares VRA, which needs labels, and {data_options.data} has none; give labelled "
                             "data (--labels for a .npy, y in an .npz, a label column in a CSV) or use certify")
    source = compare_local.Source(model=str(model), **data_options.parsed(), input_shape=api.parse_shape(input_shape),
                                  data_shape=tuple(dataset.shape), output=output, trust_pickle=trust_pickle, device=device)
    options = dict(methods=methods, kw_limit=kw_limit, batch_size=batch_size, fallback=fallback, bound=bound_path)
    if out_dir is not None:
        outputs.kept.append(f"the finished row parts in {out_dir}/METHOD/{distributed.ROWS_DIR}: rerun with --resume to continue")
    report = _compare_local(compare_local, source, _floats(eps, "--eps"), options, ray_options, out_dir,
                            f"loading {model} and {data_options.data}, checking the converted graph, resolving the bound…")
    for message in report["notes"]:
        err.print(render.note(message))
    if json_path:
        with outputs.publishing():
            files.write_json(json_path, report)
    out.print(render.compare_local_table(report))
    out.print(render.compare_local_line(report, json_path))
    if not compare_local.succeeded(report):
        err.print("gloro did not run (see its row)" if any(r["method"] == "gloro" for r in report["methods"]) else "no method ran (see the rows)")
        raise typer.Exit(1)


def _compare_local(compare_local, source, eps: tuple[float, ...], options: dict, ray_options: RayOptions,
                   out_dir: Path | None, loading: str) -> dict:
    """compare-local in process (a status line per method), or with --ray on the cluster (a progress bar per method)."""
    done = lambda row: err.print(render.method_finished(row), highlight=False)  # noqa: E731
    if ray_options.ray is None:
        with err.status(loading) as status:
            return compare_local.compare_local(source, eps, **options, done=done,
                                               progress=lambda method, samples: status.update(render.method_started(method, samples)))
    with render.progress_bar(transient=False) as progress:
        task = {}
        started = lambda method, samples: task.update(now=progress.add_task(f"{method} on Ray", total=samples))  # noqa: E731
        return compare_local.compare_local_on_ray(source, eps, out_dir, **options, **ray_options.run(), progress=started,
                                                  done=done, advance=lambda k: progress.advance(task["now"], k))


@app.command("audit")
@reads_data(limit=200)
@runs_on_ray
def audit_command(
    model: ModelArg,
    data_options: DataOptions,
    bound_path: BoundOpt = None,
    verify_bound: VerifyBoundOpt = False,
    steps: Annotated[int, typer.Option("--steps", help="Steps per attack.")] = 100,
    restarts: Annotated[int, typer.Option("--restarts", help="Random restarts of the fixed-budget PGD attack.")] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Attack seed.")] = 0,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Directory for audit.json and one .npz per violation (with --ray: and the row parts).")] = None,
    device: Device = "cpu",
    input_shape: InputShape = None,
    output: OutputOpt = None,
    trust_pickle: TrustPickle = False,
    ray_options: RayOptions = RayOptions(),
) -> None:
    """Attack every certified sample inside its certified radius; exit 1 if any attack succeeds (a violation).

    Minimum-norm attacks (foolbox's FMN and DDN) and fixed-budget PGD inside each radius, seeded per sample, run
    on the IR; every adversarial example is re-checked on the native model (on --device). Also reports how far
    the nearest adversarial example lies beyond the certified radius.

    Example: glorocert audit models/mnist-5k-eps0.3/model.onnx --data mnist-5k --limit 200 --out out/audit
    """
    from glorocert.studies import audit

    audit.check_parameters(steps, restarts)
    ray_options.check(out_dir)
    outputs = _outputs(model, bound_path, api.default_path(model), *data_options.inputs())
    if ray_options.ray is None:
        outputs.add_directory(out_dir, "--out", ("audit.json",))
    else:  # the row parts (and any violation's .npz) are written as they finish: only audit.json is staged
        outputs.add(out_dir / "audit.json", "--out", (".json",))
    loaded = _load(model, input_shape, trust_pickle, device, output, data_options)
    dataset = data_options.open(loaded)
    if verify_bound:
        with err.status("recomputing the bound from the model (--verify-bound)…"):
            api.resolve_bound(loaded, bound_path, dataset.normalization, verify=True)
    with render.progress_bar() as progress, outputs.publishing():
        task = progress.add_task("attacking certified samples", total=dataset.num_samples)
        options = dict(bound=bound_path, steps=steps, restarts=restarts, seed=seed, progress=lambda k: progress.advance(task, k))
        if ray_options.ray is None:
            result = audit.audit(loaded, dataset, **options, out_dir=out_dir)
        else:
            outputs.kept.append(ray_options.kept(out_dir))
            recipe = _recipe(model, input_shape, trust_pickle, device, output, dataset)
            result = audit.audit_on_ray(loaded, recipe, dataset, out_dir, **options, **ray_options.run())
    out.print(render.audit_table(result.summary, f"audit of {model.name} on {dataset.name}"))
    for violation in result.violations:
        err.print(render.violation_line(violation))
    if result.violations:
        raise typer.Exit(1)


@app.command("export")
def export_command(
    model: Annotated[Path, typer.Argument(help="ONNX model to wrap (its frozen bound is found next to it, or given with --bound).", show_default=False)],
    out_path: Annotated[Path, typer.Argument(help="Where to write the GloRo ONNX model.", show_default=False)],
    eps: Annotated[float, typer.Option("--eps", help="l2 radius (in [0,1] pixel space) the ⊥ logit certifies.")] = 0.3,
    gloro: Annotated[bool, typer.Option("--gloro/--no-gloro", help="Append the ⊥ logit (the only export there is so far).")] = True,
    bound_path: BoundOpt = None,
    device: Device = "cpu",
) -> None:
    """Write an ONNX model that outputs the C logits plus the GloRo ⊥ logit, with the frozen margin matrix baked in.

    Any ONNX runtime then certifies by argmax: a class other than the last (⊥) is certified at ε.

    Example: glorocert export models/mnist-5k-eps0.3/model.onnx out/gloro.onnx --eps 0.3
    """
    if not gloro:
        raise GlorocertError("only --gloro export is supported")
    if model.suffix.lower() != ".onnx" or out_path.suffix.lower() != ".onnx":
        raise GlorocertError("export reads and writes .onnx files")
    outputs = _outputs(model, bound_path, api.default_path(model))
    outputs.add(out_path, "OUT_PATH", (".onnx",))
    loaded = _load(model, None, False, device)
    if loaded.output:
        raise GlorocertError(f"{model}: its certified logits ({loaded.output!r}) are not the file's output; export appends "
                             "the ⊥ logit to the file's own output, so re-export the model to output its logits first")
    bound, source = api.resolve_bound(loaded, bound_path, None)
    if bound.mode != "sound":
        err.print("[yellow]warning:[/] the bound is an ESTIMATE; the exported ⊥ logit certifies nothing")
    with outputs.publishing():
        path = api.export_gloro_onnx(model, bound.margin_matrix, eps, out_path, rounding_rtol=loaded.rounding_rtol)
    out.print(render.export_line(path, loaded.num_classes, eps, source, bound.mode))


data_app = typer.Typer(help="Datasets: write any dataset as Parquet shards, which every command then reads with --data DIR.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("export")
@reads_data(data="")
def data_export_command(
    source: Annotated[str, typer.Argument(help="Dataset to export: mnist-5k, fashion-mnist, digits, .npz, .npy (+ --labels), .csv, an image folder or shards.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for part-00000.parquet, … and _manifest.json (new, empty, or a former export).")],
    data_options: DataOptions,
    shard_rows: Annotated[int, typer.Option("--shard-rows", help="Samples per shard.")] = 10_000,
) -> None:
    """Write a dataset as Parquet shards: sample index, x (fixed-shape float32 tensor in [0, 1]) and label, plus a manifest.

    Every command reads the result with --data DIR (or a glob such as 'DIR/part-*.parquet').

    Example: glorocert data export mnist-5k --split train --out out/mnist-train --shard-rows 1000
    """
    if data_options.data:
        raise GlorocertError(f"give the dataset to export as SOURCE ({source}), not --data {data_options.data}")
    if shard_rows < 1:
        raise GlorocertError(f"--shard-rows {shard_rows}: expected at least 1")
    data_options = dataclasses.replace(data_options, data=source)
    outputs = _outputs(*data_options.inputs())
    outputs.add_directory(out_dir, "--out", (api.SHARD_MANIFEST,))
    dataset = data_options.open(None)
    with render.progress_bar() as progress, outputs.publishing():
        task = progress.add_task("exporting", total=dataset.num_samples)
        paths = api.export_shards(dataset, out_dir, shard_rows, progress=lambda n: progress.advance(task, n))
    out.print(f"wrote {dataset.num_samples} samples of {dataset.name} as {len(paths)} shard(s) to {out_dir}")


@app.command()
def train(
    data: Annotated[str, typer.Option("--data", help="Training data: mnist-5k, fashion-mnist, digits (built-in train split; their test split is held out), or a labelled file (20 % per class held out).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory: model.safetensors, model.onnx, model.ts.pt, model.onnx.bound.json, card.md, log.csv (+ resume state); refused if it holds any of them, unless --resume continues the run there.")],
    eps: Annotated[Optional[float], typer.Option("--eps", help="Test radius ε (l2, [0,1] pixels): the held-out VRA is measured and the model certified at it (required with --method gloro, bcp, kw).")] = None,
    method: Annotated[str, typer.Option("--method", help="gloro (a GloRo net, default); bcp (BCP's objective, Lee et al. 2020) or kw (Wong–Kolter robust loss, exact dual bounds: O(units²) per sample, for small nets) — ReLU nets to certify with certify --method bcp|kw; gaussian or macer (randomized-smoothing base models).")] = "gloro",
    sigma: Annotated[float, typer.Option("--sigma", help="Noise std σ in [0,1] pixel space (--method gaussian / macer).")] = 0.25,
    macer_k: Annotated[int, typer.Option("--macer-k", help="MACER: noisy copies per input.")] = 16,
    macer_beta: Annotated[float, typer.Option("--macer-beta", help="MACER: inverse softmax temperature β.")] = 16.0,
    macer_gamma: Annotated[float, typer.Option("--macer-gamma", help="MACER: hinge γ on Φ⁻¹(p_y) − Φ⁻¹(p_runner-up).")] = 8.0,
    macer_lam: Annotated[float, typer.Option("--macer-lam", help="MACER: weight λ of the robustness term (paper: 12 at σ=0.25, 4 at σ=0.5).")] = 12.0,
    arch: Annotated[str, typer.Option("--arch", help="2c2f, 4c3f, 6c2f or 8c2f (the GloRo paper's architectures), or liresnet (residual blocks x + conv(x) bounded as one operator; Hu et al. 2023).")] = "2c2f",
    depth: Annotated[int, typer.Option("--depth", help="liresnet: number of residual blocks.")] = 4,
    width: Annotated[int, typer.Option("--width", help="liresnet: channels of the residual blocks (even; the dense layer has 8×).")] = 16,
    activation: Annotated[str, typer.Option("--activation", help="relu or minmax.")] = "relu",
    minmax_pairing: Annotated[str, typer.Option("--minmax-pairing", help="halves (channel c with c+C/2, LiResNet) or adjacent (elements 2k, 2k+1, TF gloro).")] = "halves",
    loss: Annotated[str, typer.Option("--loss", help="ce (standard training baseline), gloro (GloRo cross-entropy with a ⊥ class), trades (GloRo-TRADES) or emma (ε adapted per class pair; Hu et al. 2023).")] = "gloro",
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
    augment_shift: Annotated[int, typer.Option("--augment-shift", help="Shift each training image by up to N pixels at random (0: no augmentation).")] = 0,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate on the held-out split (power iterates converged) every N epochs and after the last.")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out from its last finished epoch (same result as an uninterrupted run).")] = False,
    device: Device = "cpu",
) -> None:
    """Train a net that is certifiably robust at --eps — a GloRo net, or with --method bcp|kw a net trained for those local certifiers (or, with --method gaussian|macer, a randomized-smoothing base model) — and write it, its frozen bound and its model card to --out.

    Example: glorocert train --arch 2c2f --activation minmax --data mnist-5k --eps 0.3 --train-eps 0.45 --loss trades --lam 2 --epochs 200 --out models/mnist-5k-eps0.3

    Example: glorocert train --method bcp --data mnist-5k --eps 1.58 --epochs 60 --batch-size 50 --lr 3e-4 --out models/mnist-5k-bcp1.58

    Example: glorocert train --method macer --sigma 0.25 --data mnist-5k --epochs 50 --out models/mnist-5k-macer0.25
    """
    from glorocert.train import (SMOOTHING_METHODS, TRAIN_FILES, RobustSettings, SmoothingSettings, TrainConfig,
                                 check_out_dir, parse_method, run_training)

    parse_method(method)
    smoothing = method in SMOOTHING_METHODS
    if eps is None and not smoothing:
        raise GlorocertError(f"--eps is required with --method {method}")
    config = TrainConfig(
        method=method, arch=arch, activation=activation, minmax_pairing=minmax_pairing, depth=depth, width=width,
        augment_shift=augment_shift, eval_every=eval_every, epochs=epochs,
        batch_size=batch_size, lr=lr, final_lr=final_lr, lr_schedule=lr_schedule, seed=seed, data=data,
        data_limit=limit, device=device, out_dir=str(out_dir), resume=resume,
        robust=None if smoothing else RobustSettings(
            eps=eps, train_eps=train_eps, eps_schedule=eps_schedule, loss=loss, lam=lam, lam_schedule=lam_schedule,
            warmup_epochs=warmup_epochs, power_iterations=power_iterations),
        smoothing=SmoothingSettings(sigma=sigma, macer_k=macer_k, macer_beta=macer_beta, macer_gamma=macer_gamma,
                                    macer_lam=macer_lam) if smoothing else None,
    )
    check_out_dir(out_dir, resume)
    outputs = _outputs(*([] if data in api.BUILTINS else [Path(data)]))
    outputs.add_directory(out_dir, "--out", TRAIN_FILES)
    with render.TrainDisplay() as display:
        result = run_training(config, _SaysWhatTrainingKept(display, outputs))
    out.print(render.train_table(result))
    for line in render.train_lines(result):
        out.print(line)


class _SaysWhatTrainingKept:
    """Training progress for the display, and for main(): outputs.kept names the epoch the resume state holds,
    outputs.published the results once they are in place, so that an interrupt says what it leaves."""

    def __init__(self, display: render.TrainDisplay, outputs: files.Outputs):
        self.display, self.outputs = display, outputs

    def __getattr__(self, name: str):
        return getattr(self.display, name)

    def on_saved(self, out_dir: Path, epochs_done: int) -> None:
        self.outputs.kept[:] = [f"the resume state in {out_dir} (train_state.*, log.csv) after epoch {epochs_done}: "
                                "rerun with --resume to continue"]

    def on_publishing(self, published: list[Path]) -> None:
        self.outputs.published = published  # filled as the results land, so an interrupt right after says so


def main() -> None:
    """Entry point: one handler turns user errors into a one-line message and exit code 2, and Ctrl-C or
    SIGTERM into 130 or 143 with a line that says exactly what the run kept."""
    interrupt_on_sigterm()
    Terminated.received = False  # this command's own signals only (tests run many commands in one process)
    try:
        code = app(args=_ray_address_given(sys.argv[1:]), standalone_mode=False)  # typer.Exit's code is returned here
    except GlorocertError as e:
        if DEBUG["on"]:
            raise
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort) as e:
        sys.exit(_interrupted(e))
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # usage errors (typer's own click) arrive here in standalone_mode=False
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        if caused_by_interrupt(e):  # e.g. onnxruntime's ImportError when Ctrl-C lands in its initialisation
            sys.exit(_interrupted(e))
        raise
    if code == 130:  # typer turns Ctrl-C into Exit(130) inside app()
        code = _interrupted(None)
    sys.exit(code if isinstance(code, int) else 0)


_RAY_ADDRESS = re.compile(r"auto|[a-z]+://\S+|[\w.-]+:\d+")


def _ray_address_given(args: list[str]) -> list[str]:
    """``--ray`` may stand alone (typer options always take a value): unless an address follows it (``auto``,
    ``ray://host:port``, ``host:port``), it means ``--ray=auto``."""
    return [f"{arg}=auto" if arg == "--ray" and (k + 1 == len(args) or not _RAY_ADDRESS.fullmatch(args[k + 1])) else arg
            for k, arg in enumerate(args)]


def _outputs(*inputs: Path | str | None) -> files.Outputs:
    """This command's outputs, to be checked against ``inputs``; main() says what an interrupted run kept."""
    _RUN["outputs"] = files.Outputs(inputs)
    return _RUN["outputs"]


def _interrupted(error: BaseException | None) -> int:
    """Say what an interrupted run left behind; the exit code (130 Ctrl-C, 143 SIGTERM)."""
    terminated = Terminated.received or isinstance(error, Terminated)  # typer turns both signals into Exit(130)
    outputs = _RUN["outputs"]
    written = [str(p) for p in outputs.published] if outputs else []
    kept = list(outputs.kept) if outputs else []
    what = "terminated (SIGTERM)" if terminated else "interrupted"
    said = [f"already complete: {', '.join(written)}"] if written else []
    said += [f"kept {k}" for k in kept]
    err.print(f"{what}; " + ("; ".join(said) if said else "no output was written"), highlight=False, soft_wrap=True)
    return Terminated.exit_code if terminated else 130


if __name__ == "__main__":
    main()
