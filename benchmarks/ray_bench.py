"""`make bench` section `ray`: what --ray costs against in process, and how smoothing scales with workers.

Every figure is a ratio of runs made side by side, alternating (these machines are shared and noisy); nothing
asserts. docs/SCALE.md builds its cost model on these per-sample costs.

    python benchmarks/run.py ray
"""

from __future__ import annotations

import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT / "models" / "fashion-mnist-eps0.3" / "model.onnx"
MNIST = ROOT / "models" / "mnist-5k-eps0.3" / "model.onnx"
console = Console(width=150)


def bench_ray_certify(repeats: int = 3, workers: int = 2) -> None:
    """certify of the 60,000 Fashion-MNIST training images, whole process: in process vs --ray (a local cluster
    started by the command, `workers` actors), the data handed to Ray from memory or read by Ray Data as shards."""
    from glorocert import api

    with tempfile.TemporaryDirectory() as tmp:
        api.export_shards(api.open_dataset("fashion-mnist", split="train"), f"{tmp}/shards", 10_000)
        certify = [sys.executable, "-m", "glorocert.launch", "certify", str(FASHION), "--eps", "0.3"]
        memory = ["--data", "fashion-mnist", "--split", "train"]
        runs = iter(range(10**6))  # every --ray run writes into a new --out
        commands = {
            "in process": lambda: [*certify, *memory, "--out", f"{tmp}/rows.parquet"],
            "--ray, data from memory": lambda: [*certify, *memory, "--ray", "--ray-workers", str(workers),
                                                "--out", f"{tmp}/ray-{next(runs)}"],
            "--ray, Parquet shards (6)": lambda: [*certify, "--data", f"{tmp}/shards", "--ray", "--ray-workers",
                                                  str(workers), "--out", f"{tmp}/ray-{next(runs)}"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(repeats):
            for name, command in commands.items():
                t0 = time.perf_counter()
                subprocess.run(command(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
                times[name].append(time.perf_counter() - t0)
    table = Table(title=f"certify, 60,000 Fashion-MNIST images, whole process (median of {repeats}, alternating; "
                        f"--ray starts a local cluster of {workers} workers)")
    for col in ("command", "seconds", "× in process", "runs"):
        table.add_column(col)
    base = statistics.median(times["in process"])
    for name, values in times.items():
        t = statistics.median(values)
        table.add_row(name, f"{t:.2f}", f"{t / base:.2f}×", " ".join(f"{v:.1f}" for v in values))
    console.print(table)


def bench_ray_warm(repeats: int = 3, workers: int = 2) -> None:
    """The same certify inside one process already connected to a running cluster: what a --ray run adds to the
    in-process run once Ray is up (the actor pool's start, the blocks through the object store, the parts written)."""
    import ray

    from glorocert import api

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        model = api.load(FASHION)
        data = api.open_dataset("fashion-mnist", split="train")
        recipe = api.ModelRecipe(str(FASHION), bound_path=str(api.default_path(FASHION)))
        fast = api.frozen_model(FASHION, None, None)
        times = {"in process (api.certify)": [], "on Ray (api.certify_on_ray)": []}
        first_rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for k in range(repeats):
                t0 = time.perf_counter()
                api.certify(fast, data, [0.3])
                times["in process (api.certify)"].append(time.perf_counter() - t0)
                t0, first = time.perf_counter(), []
                api.certify_on_ray(model, recipe, data, [0.3], f"{tmp}/{k}", workers=workers,
                                   progress=lambda n: first or first.append(time.perf_counter() - t0))
                times["on Ray (api.certify_on_ray)"].append(time.perf_counter() - t0)
                first_rows.append(first[0])
            aggregation = _driver_aggregation(Path(tmp) / "0", len(data.sample_indices()))
    finally:
        ray.shutdown()
    table = Table(title=f"certify of 60,000 images with Ray already running ({workers} workers; median of {repeats})")
    for col in ("run", "seconds", "× in process", "first rows after (s)"):
        table.add_column(col)
    base = statistics.median(times["in process (api.certify)"])
    for name, values in times.items():
        t = statistics.median(values)
        table.add_row(name, f"{t:.2f}", f"{t / base:.2f}×", f"{statistics.median(first_rows):.2f}" if "Ray" in name else "")
    console.print(table)
    console.print(f"driver, per row: writing a part {aggregation['write'] * 1e6:.2f} µs, reading the parts back and "
                  f"summarising {aggregation['read_and_summarise'] * 1e6:.2f} µs")


def _driver_aggregation(out_dir: Path, rows: int) -> dict[str, float]:
    """Seconds per row of what the driver alone does: write a part, read every part back and summarise."""
    from glorocert.api import ROWS_SCHEMA_VERSION
    from glorocert.results import read_rows, summarize, write_rows

    parts = sorted((out_dir / "rows").glob("part-*.parquet"))
    t0 = time.perf_counter()
    tables = [read_rows(p) for p in parts]
    columns = {name: np.concatenate([t[name] for t in tables]) for name in tables[0]}
    summarize(columns, [0.3])
    read = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_rows(out_dir / "again.parquet", columns, ROWS_SCHEMA_VERSION)
    return {"write": (time.perf_counter() - t0) / rows, "read_and_summarise": read / rows}


def bench_ray_smoothing(samples: int = 256, n: int = 2_000, repeats: int = 2) -> None:
    """Randomized smoothing (compare-rs) on `samples` mnist-5k test images at n = `n`: throughput in process and on
    Ray with 1 and 2 workers (one CPU each), alternating. Ray hands out parts of 32 samples (compare_rs.RAY_PART_SAMPLES),
    so `samples` is 8 parts: enough to keep two actors busy. Scaling efficiency = throughput(2) ÷ (2 × throughput(1))
    over whole runs, the cluster's and actors' start included; 'first part' is when the first 32 rows were written."""
    import ray

    from glorocert import api
    from glorocert.studies import compare_rs

    model = api.load(MNIST)
    data = api.open_dataset("mnist-5k", limit=samples)
    recipe = api.ModelRecipe(str(MNIST))
    parameters = dict(sigma=0.25, n0=100, n=n, alpha=0.001, batch=1000)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    walls: dict[str, list[float]] = {"in process": [], "Ray, 1 worker": [], "Ray, 2 workers": []}
    first: dict[str, list[float]] = {name: [] for name in walls}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for k in range(repeats):
                t0 = time.perf_counter()
                compare_rs.compare_rs(model, model, data, **parameters)
                walls["in process"].append(time.perf_counter() - t0)
                for workers in (1, 2):
                    name, marks = f"Ray, {workers} worker" + ("s" if workers > 1 else ""), []
                    t0 = time.perf_counter()
                    compare_rs.compare_rs_on_ray(model, model, (recipe, recipe), data, Path(tmp) / f"{k}-{workers}",
                                                 **parameters, workers=workers,
                                                 progress=lambda what, m: what == "smoothing" and marks.append(time.perf_counter()))
                    walls[name].append(time.perf_counter() - t0)
                    first[name].append(marks[0] - t0)
    finally:
        ray.shutdown()
    table = Table(title=f"smoothing, {samples} mnist-5k images at n={n:,} (median of {repeats}, alternating)")
    for col in ("run", "seconds", "samples/s", "first part after (s)", "scaling efficiency"):
        table.add_column(col)
    rate = {name: samples / statistics.median(v) for name, v in walls.items()}
    for name, values in walls.items():
        efficiency = f"{rate[name] / (2 * rate['Ray, 1 worker']):.2f}" if name == "Ray, 2 workers" else ""
        table.add_row(name, f"{statistics.median(values):.1f}", f"{rate[name]:.2f}",
                      f"{statistics.median(first[name]):.1f}" if first[name] else "", efficiency)
    console.print(table)


def bench_audit_cost(samples: int = 64, steps: int = 100) -> None:
    """audit's cost per sample in process (FMN, DDN, 2×PGD at `steps` steps): the cost model's audit figure."""
    from glorocert import api
    from glorocert.studies import audit

    model = api.load(MNIST)
    data = api.open_dataset("mnist-5k", limit=samples)
    t0 = time.perf_counter()
    result = audit.audit(model, data, steps=steps, restarts=2)
    seconds = time.perf_counter() - t0
    console.print(f"audit in process: {samples} mnist-5k samples ({result.audited} certified, attacked) at {steps} steps "
                  f"in {seconds:.1f} s: {seconds / samples:.3f} s/sample")


def bench_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        console.print("[yellow]skipping ray: Ray is not installed (pip install 'glorocert[ray]')[/]")
        return
    if not FASHION.exists():
        console.print(f"[yellow]skipping ray: {FASHION} is missing[/]")
        return
    bench_ray_certify()
    bench_ray_warm()
    bench_ray_smoothing()
    bench_audit_cost()
