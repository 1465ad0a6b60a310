"""Measured comparisons, printed side by side from one run (`make bench`).

These machines are shared and noisy, so every figure that matters is a ratio
of two things measured in the same run, interleaved: bound ÷ exact spectral
norm, certify ÷ plain forward pass, smoothing ÷ GloRo. Nothing here asserts.

    python benchmarks/run.py [bounds] [certify] [smoothing]
"""

from __future__ import annotations

import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glorocert.lipschitz import operators  # noqa: E402
from glorocert.lipschitz.compose import blocks_of, compose  # noqa: E402
from glorocert.loaders import load  # noqa: E402
from glorocert.train.architectures import build  # noqa: E402

console = Console()


def exact_block_norm(block) -> float | None:
    """Exact σ_max of a linear block by Lanczos-free dense SVD when affordable, else None."""
    n, m = np.prod(block.in_shape), np.prod(block.out_shape)
    if min(n, m) > 6000 or n * m > 1.5e8:
        return None
    return operators.spectral_norm_exact(operators.materialise(block.homogeneous, block.in_shape))


def bench_bounds() -> None:
    table = Table(title="Lipschitz bound: time and tightness (per linear block: upper ÷ exact, estimate ÷ exact)")
    for col in ("arch", "input", "seconds", "global upper", "global est.", "worst upper/exact", "worst est./exact", "methods"):
        table.add_column(col)
    torch.manual_seed(0)
    for arch in ("2c2f", "4c3f", "6c2f"):
        for shape in ((1, 28, 28), (3, 32, 32)):
            model = build({"arch": arch, "activation": "relu", "input_shape": list(shape), "num_classes": 10}).eval()
            buffer = io.BytesIO()
            torch.onnx.export(model, (torch.zeros(1, *shape),), buffer, dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
            path = Path(f"/tmp/bench-{arch}-{shape[0]}.onnx")
            path.write_bytes(buffer.getvalue())
            graph = load(path).graph
            t0 = time.perf_counter()
            result = compose(graph)
            seconds = time.perf_counter() - t0
            worst_up, worst_est, methods = 1.0, 1.0, set()
            for block, b in zip([bl for bl in blocks_of(graph) if bl.linear], [b for b in result.blocks if b.method not in ("relu",)]):
                methods.add(b.method)
                exact = exact_block_norm(block)
                if exact:
                    worst_up = max(worst_up, b.upper / exact)
                    worst_est = min(worst_est, b.estimate / exact)
            table.add_row(arch, "×".join(map(str, shape)), f"{seconds:.1f}", f"{result.global_upper:.5g}",
                          f"{result.global_estimate:.5g}", f"{worst_up:.6f}", f"{worst_est:.6f}", ",".join(sorted(methods)))
            console.print(table.rows[-1] if False else f"  {arch} {shape}: {seconds:.1f}s")
    console.print(table)


def bench_certify(repeats: int = 5) -> None:
    """certify end to end (data in memory) vs the bare forward pass, same batches, interleaved."""
    from glorocert.api import certify, compute_bound
    from glorocert.data import open_dataset

    torch.manual_seed(0)
    model = build({"arch": "2c2f", "activation": "relu", "input_shape": [1, 28, 28], "num_classes": 10}).eval()
    onnx_path = Path("/tmp/bench-certify.onnx")
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), onnx_path, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    ts_path = Path("/tmp/bench-certify.ts.pt")
    torch.jit.trace(model, torch.zeros(1, 1, 28, 28)).save(ts_path)
    data = open_dataset("mnist-5k", split="train")
    batches = list(data.batches(256))
    x_all = np.concatenate([b.x for b in batches])

    class InMemory:  # the dataset, already loaded, served in the same batches
        name, shape, num_samples, num_classes, has_labels, mean, std = "mnist-5k[train]", data.shape, len(x_all), 10, True, None, None

        def batches(self, size):
            return iter(batches)

    table = Table(title=f"certify vs plain forward pass ({len(x_all)} MNIST samples, batch 256, 2C2F)")
    for col in ("runner", "forward s", "certify s", "ratio", "samples/s", "peak mem ratio"):
        table.add_column(col)
    for path in (onnx_path, ts_path):
        loaded = load(path, input_shape=(1, 28, 28))
        bound = compute_bound(loaded)
        forward_times, certify_times = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in batches:
                loaded.runner(b.x)
            forward_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            certify(loaded, InMemory(), [0.3], bound=bound, batch_size=256)
            certify_times.append(time.perf_counter() - t0)
        bound.save(str(path) + ".bound.json")
        peak_forward, peak_certify = (peak_rss(mode, path) for mode in ("forward", "certify"))
        f, c = statistics.median(forward_times), statistics.median(certify_times)
        table.add_row(loaded.runner.description, f"{f:.3f}", f"{c:.3f}", f"{c / f:.3f}×", f"{len(x_all) / c:.0f}",
                      f"{peak_certify / peak_forward:.3f}× ({peak_forward / 2**20:.0f} MiB)")
    console.print(table)


def peak_rss(mode: str, path: Path) -> int:
    """Peak resident memory (bytes) of a fresh process that loads the data and runs ``mode`` once."""
    import subprocess

    done = subprocess.run([sys.executable, __file__, "_rss", mode, str(path)], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def _rss_child(mode: str, path: str) -> None:
    import resource

    from glorocert.api import certify
    from glorocert.data import open_dataset

    loaded = load(path, input_shape=(1, 28, 28))
    data = open_dataset("mnist-5k", split="train")
    if mode == "forward":
        for b in data.batches(256):
            loaded.runner(b.x)
    else:
        certify(loaded, data, [0.3], batch_size=256)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


SECTIONS = {"bounds": bench_bounds, "certify": bench_certify}

if __name__ == "__main__":
    if sys.argv[1:2] == ["_rss"]:
        _rss_child(*sys.argv[2:4])
        sys.exit(0)
    chosen = sys.argv[1:] or list(SECTIONS)
    for name in chosen:
        SECTIONS[name]()
