"""The `glorocert` command line behaves exactly as it did before the package restructure.

Every case below is one `glorocert ...` command line. Its reference output lies in
tests/golden/, written by the pre-restructure code (see tests/golden/README.md for
the commit and how to regenerate). Only the command line is relied on: the
commands are run in this process through the console-script entry point named in
pyproject.toml (`[project.scripts] glorocert`), so the test survives modules
moving around and follows whichever `glorocert` package is imported (PYTHONPATH).

Comparisons are exact: per-sample rows cell by cell as written (the CSV text), the
summary and bound JSON value by value — except what the float32 forward pass sets
(margins, radii, the summary's floats), which differs between CPUs and is compared
to within FORWARD_TOL. Only wall-clock timings and environment facts are left out;
each exclusion is listed below with its reason.

Run against a reference checkout (e.g. a git worktree at /tmp/reference) with
`PYTHONPATH=/tmp/reference pytest tests/test_unchanged.py` — not `python -m pytest`
from the repository root, which puts the working tree's glorocert first on sys.path.
Regenerate the references (only from the reference code!) with
`PYTHONPATH=/tmp/reference python3 -P tests/test_unchanged.py --regenerate`.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
TMP = "{tmp}"  # stands for the per-test temporary directory in command lines and in stored outputs

MODELS = ("mnist-5k-eps0.3", "mnist-5k-eps1.58", "fashion-mnist-eps0.3", "mnist-5k-bcp1.58", "digits-kw0.3")

# Each model on the held-out split of the data it was trained for: (--data, --eps, --limit).
GLORO_RUNS = {
    "mnist-5k-eps0.3": ("mnist-5k", "0.3,1.0", 500),
    "mnist-5k-eps1.58": ("mnist-5k", "0.3,1.58", 500),
    "fashion-mnist-eps0.3": ("fashion-mnist", "0.3,1.0", 500),
    "mnist-5k-bcp1.58": ("mnist-5k", "0.3,1.58", 500),
    "digits-kw0.3": ("digits", "0.1,0.3", 359),  # the whole digits test split
}

# certify case name → command line after `glorocert certify` (the test adds --out and --summary).
CERTIFY_CASES: dict[str, list[str]] = {
    f"{model}-gloro": [f"models/{model}/model.onnx", "--data", data, "--eps", eps, "--limit", str(limit)]
    for model, (data, eps, limit) in GLORO_RUNS.items()
}
CERTIFY_CASES |= {
    # local certifiers, on the models trained for them; small limits because every sample is a local search
    "mnist-5k-bcp1.58-bcp": ["models/mnist-5k-bcp1.58/model.onnx", "--data", "mnist-5k", "--eps", "1.0,1.58",
                             "--method", "bcp", "--limit", "40"],
    "mnist-5k-bcp1.58-cascade-bcp": ["models/mnist-5k-bcp1.58/model.onnx", "--data", "mnist-5k", "--eps", "1.0,1.58",
                                     "--method", "cascade", "--fallback", "bcp", "--limit", "40"],
    "digits-kw0.3-kw": ["models/digits-kw0.3/model.onnx", "--data", "digits", "--eps", "0.1,0.3",
                        "--method", "kw", "--limit", "20"],
    "digits-kw0.3-cascade-kw": ["models/digits-kw0.3/model.onnx", "--data", "digits", "--eps", "0.1,0.3",
                                "--method", "cascade", "--fallback", "kw", "--limit", "20"],
    # TorchScript: no bound is shipped for it; BOUND_FIRST computes one into the temporary directory
    "mnist-5k-eps0.3-torchscript": ["models/mnist-5k-eps0.3/model.ts.pt", "--input-shape", "1,28,28",
                                    "--data", "mnist-5k", "--eps", "0.3,1.0", "--limit", "500",
                                    "--bound", f"{TMP}/model.ts.pt.bound.json"],
}
# certify case → the `glorocert bound` command line run before it; its output is compared too.
BOUND_FIRST = {
    "mnist-5k-eps0.3-torchscript": ["models/mnist-5k-eps0.3/model.ts.pt", "--input-shape", "1,28,28",
                                    "--out", f"{TMP}/model.ts.pt.bound.json"],
}

# Left out of the row comparison: per-sample wall-clock time of the local certifiers (0.0 for gloro rows).
ROW_TIMING_COLUMNS = {"seconds"}
# The native forward pass runs in float32, and onnxruntime picks its kernels by CPU (AVX2, AVX-512): the same
# logits differ by a few ulps between machines, and so does the IR/native gap that sets a model's rounding
# budget (4 × the gap where that exceeds ROUNDING_RTOL), which every radius subtracts. Measured: the goldens,
# written on one machine, and an AMD EPYC differ by up to 3.3e-4 relative in radii, 1.1e-4 absolute. So
# margins and radii (and the summary's floats) are compared to within FORWARD_TOL, absolute and relative;
# the bounds (float64, deterministic) and every discrete column (prediction, ⊥ and certified flags, the
# local methods' ε) stay exact.
FORWARD_TOL = 1e-3
FORWARD_COLUMNS = {"margin", "radius", "gloro_radius"}

# Left out of the summary comparison.
SUMMARY_TIMING_KEYS = {
    "seconds",             # wall-clock time of the whole run
    "forward_seconds",     # wall-clock time of the forward passes
    "samples_per_second",  # derived from the two above
    "local_seconds",       # wall-clock time of the local certifier (bcp, kw, cascade)
    "versions",            # versions of python, torch, onnx, … installed here: the environment, not the behaviour
    # the certified-accuracy curve, sampled at radii on a grid: a sample whose radius lies within the float32
    # noise between CPUs (FORWARD_TOL) of a grid radius moves one step; the radii themselves are compared
    "certified_accuracy",
}
# (A `bound_file` under the temporary directory is compared with that directory written as {tmp}.)

# Left out of the bound comparison.
BOUND_VOLATILE_KEYS = {
    "created",         # timestamp of the run
    "seconds",         # wall-clock time of the computation
    "tool_version",    # glorocert's version string, not the computed bound
    "content_sha256",  # checksum over the other fields, including `created` and `seconds`
    # added after the goldens: what loading measured (the float32 runner's rounding on this CPU, and the
    # onnxruntime version that ran the file), for certify's fast path; tests/test_frozen.py checks them
    "equivalence_gap",
    "checked_runner",
    "check_logits",
}
BOUND_BLOCK_VOLATILE_KEYS = {"seconds"}  # per-block timing, should blocks ever record one

# Bounds are computed on ONE torch thread: the power iterations reduce in an order that depends on the
# thread count, so the last bits of the floats differ between 1 and 2 threads (run-to-run they are
# identical). The references were written with one thread too (OMP_NUM_THREADS=1).
TORCH_THREADS = 1


# --------------------------------------------------------------------------- running the command


def _entry_point():
    """The `glorocert` console script's function, as pyproject.toml names it (glorocert.launch:main today)."""
    target = "glorocert.cli:main"
    pyproject = REPO / "pyproject.toml"
    if pyproject.is_file():
        target = tomllib.loads(pyproject.read_text())["project"]["scripts"].get("glorocert", target)
    module, _, attribute = target.partition(":")
    module = importlib.import_module(module)
    # glorocert.launch.main leaves the process when the command is done (os._exit); run() is the same command
    # without that last step, so that it can run inside this one
    return getattr(module, "run", None) or getattr(module, attribute)


def _imported_from() -> str:
    import glorocert

    return str(Path(glorocert.__file__).parent)


def glorocert(*args: str) -> None:
    """Run `glorocert ARGS` in this process from the repository root; fail unless it exits 0."""
    import torch

    main = _entry_point()
    saved_argv, saved_cwd, saved_threads = sys.argv, os.getcwd(), torch.get_num_threads()
    sys.argv = ["glorocert", *args]
    os.chdir(REPO)
    torch.set_num_threads(TORCH_THREADS)
    try:
        code = main() or 0  # run() returns the code; a plain main() returns None or raises SystemExit
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        torch.set_num_threads(saved_threads)
    assert code == 0, f"`glorocert {' '.join(args)}` exited {code} (glorocert imported from {_imported_from()})"


def _with_tmp(args: list[str], tmp: Path) -> list[str]:
    return [a.replace(TMP, str(tmp)) for a in args]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- comparing outputs


def _comparable(value, tmp: Path | None = None):
    """JSON value → a value that compares by ==: NaN becomes a marker (NaN ≠ NaN), {tmp} replaces tmp."""
    if isinstance(value, dict):
        return {k: _comparable(v, tmp) for k, v in value.items()}
    if isinstance(value, list):
        return [_comparable(v, tmp) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "<NaN>"
    if isinstance(value, str) and tmp is not None:
        return value.replace(str(tmp), TMP)
    return value


def _close(expected, actual, rtol: float) -> bool:
    """Equal, or (rtol > 0) two floats within rtol of each other, relative to max(1, |expected|)."""
    if expected == actual and type(expected) is type(actual):
        return True
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (expected, actual))
    return rtol > 0 and numbers and math.isfinite(expected) and abs(actual - expected) <= rtol * max(1.0, abs(expected))


def _differences(expected, actual, path: str = "", rtol: float = 0.0) -> list[str]:
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for key in sorted(set(expected) | set(actual)):
            if key not in actual:
                out.append(f"{path}/{key}: missing (expected {expected[key]!r:.80})")
            elif key not in expected:
                out.append(f"{path}/{key}: unexpected {actual[key]!r:.80}")
            else:
                out += _differences(expected[key], actual[key], f"{path}/{key}", rtol)
        return out
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in _differences(e, a, f"{path}[{i}]", rtol)]
    return [] if _close(expected, actual, rtol) else [f"{path}: expected {expected!r:.80}, got {actual!r:.80}"]


def _assert_same(expected, actual, what: str, rtol: float = 0.0) -> None:
    differences = _differences(expected, actual, rtol=rtol)
    assert not differences, f"{what} differs in {len(differences)} place(s):\n  " + "\n  ".join(differences[:25])


def _summary_view(summary: dict, tmp: Path | None = None) -> dict:
    view = {k: v for k, v in summary.items() if k not in SUMMARY_TIMING_KEYS}
    if "certified_output" in view and view["certified_output"] is None:  # added after the goldens; None: as before
        del view["certified_output"]
    if isinstance(view.get("runner"), str):  # "onnxruntime 1.32.0 (CPUExecutionProvider)": the runtime, not its version
        view["runner"] = re.sub(r"\d+(\.\d+)+\S*", "{version}", view["runner"])
    return _comparable(view, tmp)


def _bound_view(bound: dict) -> dict:
    view = {k: v for k, v in bound.items() if k not in BOUND_VOLATILE_KEYS}
    if view.get("output") == "":  # added after the goldens; empty: the file's one declared output, as before
        del view["output"]
    view["blocks"] = [{k: v for k, v in b.items() if k not in BOUND_BLOCK_VOLATILE_KEYS} for b in view.get("blocks", [])]
    return _comparable(view)


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    return table[0], table[1:]


def _assert_same_rows(expected_path: Path, actual_path: Path) -> None:
    header, expected = _read_rows(expected_path)
    actual_header, actual = _read_rows(actual_path)
    assert actual_header == header, f"columns differ: expected {header}, got {actual_header}"
    assert len(actual) == len(expected), f"expected {len(expected)} rows, got {len(actual)}"
    for j, column in enumerate(header):
        if column in ROW_TIMING_COLUMNS:
            continue
        same = (lambda e, a: _close(float(e), float(a), FORWARD_TOL)) if column in FORWARD_COLUMNS else str.__eq__
        mismatches = [i for i, (e, a) in enumerate(zip(expected, actual)) if not same(e[j], a[j])]
        assert not mismatches, (
            f"column {column!r} differs in {len(mismatches)} of {len(expected)} rows; first at row {mismatches[0]}: "
            f"expected {expected[mismatches[0]][j]!r}, got {actual[mismatches[0]][j]!r}"
        )


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("model", MODELS)
def test_bound_of_every_shipped_model_is_unchanged(model, tmp_path):
    out = tmp_path / "model.onnx.bound.json"
    glorocert("bound", f"models/{model}/model.onnx", "--out", str(out))
    expected = json.loads((GOLDEN / "bound" / f"{model}.bound.json").read_text())
    _assert_same(_bound_view(expected), _bound_view(json.loads(out.read_text())), f"bound of {model}")


@pytest.mark.parametrize("case", [c for c in CERTIFY_CASES if c.endswith("-gloro")])
def test_certify_rows_and_summary_of_every_shipped_model_are_unchanged(case, tmp_path):
    _check_certify_case(case, tmp_path)


@pytest.mark.parametrize("case", ["mnist-5k-bcp1.58-bcp", "mnist-5k-bcp1.58-cascade-bcp",
                                  "digits-kw0.3-kw", "digits-kw0.3-cascade-kw"])
def test_local_and_cascade_certify_rows_and_summary_are_unchanged(case, tmp_path):
    _check_certify_case(case, tmp_path)


def test_torchscript_bound_and_certify_rows_and_summary_are_unchanged(tmp_path):
    _check_certify_case("mnist-5k-eps0.3-torchscript", tmp_path)


def _check_certify_case(case: str, tmp_path: Path) -> None:
    if case in BOUND_FIRST:
        bound_args = _with_tmp(BOUND_FIRST[case], tmp_path)
        glorocert("bound", *bound_args)
        out = Path(bound_args[bound_args.index("--out") + 1])
        expected = json.loads((GOLDEN / "certify" / f"{case}.bound.json").read_text())
        _assert_same(_bound_view(expected), _bound_view(json.loads(out.read_text())), f"bound of {case}")

    args = _with_tmp(CERTIFY_CASES[case], tmp_path)
    shipped_bound = REPO / f"{args[0]}.bound.json"
    before = _sha256(shipped_bound) if shipped_bound.is_file() else None

    rows, summary = tmp_path / "rows.csv", tmp_path / "summary.json"
    glorocert("certify", *args, "--out", str(rows), "--summary", str(summary))

    after = _sha256(shipped_bound) if shipped_bound.is_file() else None
    assert after == before, f"certify rewrote or created the shipped {shipped_bound.relative_to(REPO)}"
    _assert_same_rows(GOLDEN / "certify" / f"{case}.rows.csv", rows)
    expected = json.loads((GOLDEN / "certify" / f"{case}.summary.json").read_text())
    _assert_same(_summary_view(expected), _summary_view(json.loads(summary.read_text()), tmp_path), f"summary of {case}",
                 FORWARD_TOL)


# --------------------------------------------------------------------------- writing the references


def _regenerate() -> None:
    """Write tests/golden/ by running the literal command lines in subprocesses.

    Run with the REFERENCE code first on sys.path: `PYTHONPATH=/tmp/reference python3 -P tests/test_unchanged.py
    --regenerate` (-P keeps the working tree's glorocert off sys.path; so does -P in the children).
    """
    import tempfile

    import glorocert as package

    print(f"reference glorocert: {Path(package.__file__).parent}")
    env = dict(os.environ, OMP_NUM_THREADS=str(TORCH_THREADS))
    command = [sys.executable, "-P", "-m", "glorocert.cli"]
    (GOLDEN / "bound").mkdir(parents=True, exist_ok=True)
    (GOLDEN / "certify").mkdir(parents=True, exist_ok=True)
    for model in MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "bound.json"
            subprocess.run([*command, "bound", f"models/{model}/model.onnx", "--out", str(out)], cwd=REPO, env=env,
                           check=True, stdout=subprocess.DEVNULL)
            (GOLDEN / "bound" / f"{model}.bound.json").write_text(out.read_text())
            print(f"bound/{model}.bound.json")
    for case, args in CERTIFY_CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            if case in BOUND_FIRST:
                bound_args = _with_tmp(BOUND_FIRST[case], Path(tmp))
                subprocess.run([*command, "bound", *bound_args], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
                out = Path(bound_args[bound_args.index("--out") + 1])
                (GOLDEN / "certify" / f"{case}.bound.json").write_text(out.read_text())
            rows, summary = Path(tmp) / "rows.csv", Path(tmp) / "summary.json"
            subprocess.run([*command, "certify", *_with_tmp(args, Path(tmp)), "--out", str(rows), "--summary", str(summary)],
                           cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
            (GOLDEN / "certify" / f"{case}.rows.csv").write_bytes(rows.read_bytes())
            (GOLDEN / "certify" / f"{case}.summary.json").write_text(summary.read_text().replace(tmp, TMP))
            print(f"certify/{case}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: PYTHONPATH=/path/to/reference python3 -P tests/test_unchanged.py --regenerate")
    _regenerate()
