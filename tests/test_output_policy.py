"""The output policy (issue 15): every output is checked before any work, written to hidden
``.NAME.PID-HEX.glorocert-partial`` files and published together; nothing a user gave as input is
ever overwritten; an interrupted run says exactly what it left behind.

Each test drives ``glorocert.cli.main`` in this process (``helpers.run_main``) on copies of a small
model and data in ``tmp_path``; one test per defect of the issue, each of which failed before the
output-policy commit (8068008). Tests run as root, so permission bits alone stop no write: a refusal
must come from glorocert itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from glorocert.api import default_path
from glorocert.data import open_dataset
from glorocert.results import read_rows
from helpers import chain_model_with_bound, run_main

PARTIAL = ".glorocert-partial"
PNG = b"\x89PNG\r\n\x1a\n"
NUM_SAMPLES = 30


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """A small ONNX model with its frozen bound, and the same 30 digits as .npz, .npy (+ labels) and .csv."""
    root = tmp_path_factory.mktemp("policy-originals")
    chain_model_with_bound(root)
    batch = next(open_dataset("digits", limit=NUM_SAMPLES).batches(1000))
    x, y = batch.x.astype(np.float32), batch.y.astype(np.int64)
    np.savez(root / "digits.npz", x=x, y=y)
    np.save(root / "x.npy", x)
    np.save(root / "y.npy", y)
    with open(root / "digits.csv", "w") as f:
        f.write(",".join(["label"] + [f"p{i}" for i in range(x[0].size)]) + "\n")
        f.writelines(",".join([str(int(yi))] + [repr(float(v)) for v in xi]) + "\n" for xi, yi in zip(x.reshape(len(x), -1), y))
    return root


@pytest.fixture
def ws(originals, tmp_path):
    """A private copy of the originals: tests may damage it."""
    work = tmp_path / "ws"
    shutil.copytree(originals, work)
    return work


def snapshot(directory: Path) -> dict[str, object]:
    """Every entry under ``directory`` (symlinks not followed): file bytes, a symlink's target, or 'dir'."""
    found: dict[str, object] = {}
    for root, dirs, names in os.walk(directory):
        for name in dirs + names:
            path = Path(root) / name
            key = str(path.relative_to(directory))
            if path.is_symlink():
                found[key] = ("symlink", os.readlink(path))
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = path.read_bytes()
    return found


def partials(directory: Path) -> list[Path]:
    """Temporary files of any naming, old (.X.HEX.tmp.ext) or new (.X.PID-HEX.glorocert-partial)."""
    return sorted(p for p in directory.rglob(".*") if p.is_file() and (PARTIAL in p.name or ".tmp" in p.name))


def assert_refused(code: int, err: str, before: dict, directory: Path, *why: str) -> None:
    """Exit 2, a one-line error naming the reason, and the directory exactly as it was (nothing written, nothing removed)."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    assert any(w in err for w in why), f"expected one of {why} in: {err}"
    after = snapshot(directory)
    assert sorted(after) == sorted(before), f"files appeared or vanished: {sorted(set(after) ^ set(before))}"
    changed = [k for k in before if after[k] != before[k]]
    assert not changed, f"changed: {changed}"


def certify_args(ws: Path, *extra) -> list:
    return ["certify", ws / "model.onnx", "--data", ws / "digits.npz", "--eps", "0.05", *extra]


# --------------------------------------------------------------------------- nothing given as input is overwritten


def test_certify_refuses_to_write_any_output_onto_an_input_and_leaves_it_byte_identical(monkeypatch, capsys, ws):
    """``certify --data mydata.csv --out mydata.csv`` replaced the user's dataset with the rows (exit 0)."""
    (ws / "link").symlink_to(ws, target_is_directory=True)
    bound = ws / "model.onnx.bound.json"
    explicit_bound = ws / "explicit.bound.json"
    shutil.copy(bound, explicit_bound)
    cases = [
        # the data file itself, by the same name and through a symlinked directory
        ["certify", ws / "model.onnx", "--data", ws / "digits.csv", "--eps", "0.05", "--out", ws / "digits.csv"],
        ["certify", ws / "model.onnx", "--data", ws / "digits.csv", "--eps", "0.05", "--out", ws / "link" / "digits.csv"],
        ["certify", ws / "model.onnx", "--data", "digits.csv", "--eps", "0.05", "--out", ws / "." / "digits.csv"],
        # the --bound file, and the bound certify reads by default (MODEL.bound.json)
        certify_args(ws, "--bound", explicit_bound, "--summary", explicit_bound),
        certify_args(ws, "--summary", bound),
        certify_args(ws, "--out", ws / "rows.csv", "--summary", ws / "link" / "model.onnx.bound.json"),
        # the model and the labels file (their formats are no output format: refused all the same)
        certify_args(ws, "--plot", ws / "model.onnx"),
        ["certify", ws / "model.onnx", "--data", ws / "x.npy", "--labels", ws / "y.npy", "--eps", "0.05", "--out", ws / "y.npy"],
    ]
    monkeypatch.chdir(ws)
    for args in cases:
        before = snapshot(ws)
        code, _, err = run_main(monkeypatch, capsys, *args)
        assert_refused(code, err, before, ws, "overwrite the input", "unknown format")


def test_export_onto_its_own_source_model_is_refused_and_the_model_is_unchanged(monkeypatch, capsys, ws):
    """``export model.onnx model.onnx`` replaced the source model with the wrapped one (exit 0)."""
    (ws / "sub").mkdir()
    for target in (ws / "model.onnx", ws / "sub" / ".." / "model.onnx"):
        before = snapshot(ws)
        code, _, err = run_main(monkeypatch, capsys, "export", ws / "model.onnx", target, "--eps", "0.05")
        assert_refused(code, err, before, ws, "overwrite the input")


def test_no_json_output_may_replace_the_frozen_bound_of_the_model(monkeypatch, capsys, ws):
    """``--summary model.onnx.bound.json`` overwrote the frozen bound (exit 0). compare-local reads that same
    default bound (it resolves and caches MODEL.bound.json), so its ``--json`` must not replace it either."""
    from glorocert.studies import compare_local, isolation

    monkeypatch.setattr(compare_local, "run_isolated", isolation.run_here)  # no spawned children in a unit test
    bound = ws / "model.onnx.bound.json"
    for args in (
        certify_args(ws, "--summary", bound),
        ["compare-local", ws / "model.onnx", "--data", ws / "digits.npz", "--limit", "5", "--methods", "gloro",
         "--eps", "0.05", "--json", bound],
    ):
        before = snapshot(ws)
        code, _, err = run_main(monkeypatch, capsys, *args)
        assert_refused(code, err, before, ws, "overwrite the input")
    assert json.loads(bound.read_text())["format"] == "glorocert-bound"


def test_a_write_protected_result_file_is_refused_not_silently_replaced(monkeypatch, capsys, ws):
    """A 444 result file was silently replaced: root ignores permission bits, so glorocert must look itself."""
    out = ws / "out"
    out.mkdir()
    protected = {name: out / name for name in ("rows.csv", "summary.json", "bound.json")}
    for path in protected.values():
        path.write_text("the user's own results\n")
        path.chmod(0o444)
    rs_dir = ws / "rs"
    rs_dir.mkdir()
    (rs_dir / "summary.json").write_text("{}\n")
    (rs_dir / "summary.json").chmod(0o444)
    cases = [
        certify_args(ws, "--out", protected["rows.csv"]),
        certify_args(ws, "--out", out / "fresh.csv", "--summary", protected["summary.json"]),
        ["bound", ws / "model.onnx", "--out", protected["bound.json"]],
        ["compare-rs", ws / "model.onnx", "--data", ws / "digits.npz", "--limit", "2", "--n0", "10", "--n", "20",
         "--out", rs_dir],
    ]
    for args in cases:
        before = snapshot(ws)
        code, _, err = run_main(monkeypatch, capsys, *args)
        assert_refused(code, err, before, ws, "write-protected")
    for path in [*protected.values(), rs_dir / "summary.json"]:
        assert path.stat().st_mode & 0o777 == 0o444


def test_summary_or_plot_on_an_existing_directory_is_refused_before_any_work(monkeypatch, capsys, ws):
    """Rows were written, then exit 2 ("nothing written"). Now: exit 2 before the model is even bounded."""
    default_path(ws / "model.onnx").unlink()  # certify would compute and cache it: the first piece of work
    (ws / "summary.json").mkdir()
    (ws / "curve.png").mkdir()
    for option, directory in (("--summary", ws / "summary.json"), ("--plot", ws / "curve.png")):
        before = snapshot(ws)
        code, _, err = run_main(monkeypatch, capsys, *certify_args(ws, "--out", ws / "rows.csv", option, directory))
        assert_refused(code, err, before, ws, "is a directory")
        assert not (ws / "rows.csv").exists()
        assert not default_path(ws / "model.onnx").exists(), "the bound was computed: work began before the check"


def test_two_outputs_on_the_same_path_are_refused_before_any_work(monkeypatch, capsys, ws):
    """--out and --summary (or --plot) naming one file. certify's row, summary and plot formats are disjoint,
    so there the format check refuses it; compare-rs' --out directory and --plot file can collide by name."""
    cases = [
        certify_args(ws, "--out", ws / "same.csv", "--summary", ws / "same.csv"),
        certify_args(ws, "--out", ws / "same.json", "--summary", ws / "same.json"),
        ["compare-rs", ws / "model.onnx", "--data", ws / "digits.npz", "--limit", "2", "--n0", "10", "--n", "20",
         "--out", ws / "same.png", "--plot", ws / "same.png"],
    ]
    for args in cases:
        before = snapshot(ws)
        code, _, err = run_main(monkeypatch, capsys, *args)
        assert_refused(code, err, before, ws, "also given as", "unknown format")


def test_an_output_inside_another_outputs_path_is_refused_before_any_work(monkeypatch, capsys, ws):
    """``--plot a.png --out a.png/rows.csv``: two outputs that cannot both exist. Checked one by one, both pass;
    the rows are published, then the plot's rename fails on the directory the rows created (a traceback,
    half the outputs kept). The check must see it up front: exit 2, nothing created."""
    for args in (
        certify_args(ws, "--plot", ws / "a.png", "--out", ws / "a.png" / "rows.csv"),
        certify_args(ws, "--summary", ws / "s.json", "--plot", ws / "s.json" / "curve.png"),
    ):
        before = snapshot(ws)
        code, _, err = run_main(monkeypatch, capsys, *args)
        assert_refused(code, err, before, ws, "also given as", "inside", "directory")


# --------------------------------------------------------------------------- temporary files


def test_a_partial_file_of_a_killed_process_is_removed_by_the_next_run_and_one_of_a_live_process_kept(monkeypatch, capsys, ws):
    """kill -9 left truncated hidden temp files that no later run cleaned. A temporary file is named
    ``.NAME.PID-HEX.glorocert-partial``; the next run writing into that directory removes those whose process is dead."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        out = ws / "out"
        out.mkdir()
        stale = out / f".rows.csv.{dead.pid}-0badc0de{PARTIAL}"
        stale.write_text("index,label\n0,1\n1,")  # a truncated write
        alive = out / f".rows.csv.{live.pid}-0ddba11a{PARTIAL}"
        alive.write_text("index,label\n")
        own = out / f".summary.json.{os.getpid()}-0ddba11b{PARTIAL}"
        own.write_text("{")
        code, _, err = run_main(monkeypatch, capsys, *certify_args(ws, "--out", out / "rows.csv"))
        assert code == 0, err
        assert not stale.exists(), "the partial file of a dead process was not removed"
        assert alive.exists() and own.exists(), "a running process's partial file was removed"
        assert len(read_rows(out / "rows.csv")["radius"]) == NUM_SAMPLES
        assert sorted(p.name for p in out.iterdir()) == sorted(["rows.csv", alive.name, own.name])
    finally:
        live.kill()
        live.wait()


# --------------------------------------------------------------------------- Ctrl-C says what it kept


def _interrupt_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    return lines[0]


def test_ctrl_c_while_the_plot_is_written_publishes_nothing_and_says_no_output_was_written(monkeypatch, capsys, ws):
    """Rows and summary used to be written before the plot: Ctrl-C during plotting left them behind."""
    from matplotlib.figure import Figure

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    out = ws / "out"
    out.mkdir()
    code, _, err = run_main(monkeypatch, capsys, *certify_args(
        ws, "--out", out / "rows.csv", "--summary", out / "summary.json", "--plot", out / "curve.png"))
    assert code == 130, err
    line = _interrupt_line(err)
    assert line.startswith("interrupted") and "no output was written" in line, line
    assert list(out.iterdir()) == [], f"left behind: {sorted(p.name for p in out.iterdir())}"


def test_ctrl_c_after_the_outputs_are_published_names_every_file_it_kept(monkeypatch, capsys, ws):
    """Ctrl-C after the rows were written said "no partial output was written" while rows.csv stayed."""
    from glorocert import render

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(render, "summary_table", interrupted)  # the first thing certify does after publishing
    out = ws / "out"
    out.mkdir()
    paths = {"rows": out / "rows.csv", "summary": out / "summary.json", "plot": out / "curve.png"}
    code, _, err = run_main(monkeypatch, capsys, *certify_args(
        ws, "--out", paths["rows"], "--summary", paths["summary"], "--plot", paths["plot"]))
    assert code == 130, err
    line = _interrupt_line(err)
    assert line.startswith("interrupted") and "no output was written" not in line, line
    for path in paths.values():
        assert str(path) in line, f"{path} is not named in: {line}"
    assert len(read_rows(paths["rows"])["radius"]) == NUM_SAMPLES
    assert json.loads(paths["summary"].read_text())["num_samples"] == NUM_SAMPLES
    assert paths["plot"].read_bytes()[:8] == PNG
    assert partials(out) == []
    assert re.search(r"\bkept\b|complete", line)
