"""The hostile-input signal suite (issue 15): every command, run through the console script's entry point
(``glorocert.launch.main``) in a subprocess on small inputs, is sent SIGINT, SIGTERM or SIGKILL at a seeded
random moment, then run again in the same directory.

After each signal:

* the exit code is 130 (SIGINT), 143 (SIGTERM) or -9 (SIGKILL), or the run's normal code if it finished first;
* for SIGINT and SIGTERM stderr ends with ONE line saying what was kept, and holds no traceback;
* every declared output is absent or complete and valid (rows parse at full length, JSON parses, the bound
  loads, ONNX passes the checker, PNG and zip archives are whole); SIGINT and SIGTERM publish all of a
  run's outputs or none, and the message says which;
* every other file is one the command keeps on purpose (and is valid), or a ``.glorocert-partial`` left by
  SIGKILL: nothing truncated hides under a result's name;
* resume state is never lost: compare-rs keeps every finished row of ``smoothing-rows.jsonl``; train keeps a
  ``train_state`` pair that loads, and ``--resume`` ends with the same weights as an uninterrupted run.

The final run completes, matches an uninterrupted reference run and removes the partial files of dead
processes. The reference run is also the command's measured typical duration; the signals land at seeded
fractions 0.45–1.0 of it (before that the interpreter is mostly importing torch, which the start-up tests
cover by signalling a process while ``import torch`` runs). The deterministic tests at the end put the interruption
exactly into the windows a random moment rarely hits.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from glorocert.data import open_dataset
from helpers import chain_model_with_bound, interrupt_at_the_second_state_json, run_main

ENTRY = [sys.executable, "-c", "from glorocert.launch import main; main()"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
PARTIAL = ".glorocert-partial"
SIGNALS = {"SIGINT": (signal.SIGINT, 130), "SIGTERM": (signal.SIGTERM, 143), "SIGKILL": (signal.SIGKILL, -9)}
EXIT_WAIT = 90  # seconds a signalled run may take to exit: longer means the signal was swallowed
N_DATA = 40
N_TRAIN = 200


# --------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Read-only inputs: a small ONNX model with its frozen bound, 40 digits (.npz), 250 training digits (.npz)."""
    root = tmp_path_factory.mktemp("signal-inputs")
    chain_model_with_bound(root)
    batch = next(open_dataset("digits", limit=N_DATA).batches(1000))
    np.savez(root / "digits.npz", x=batch.x.astype(np.float32), y=batch.y.astype(np.int64))
    train = next(open_dataset("digits", split="train", limit=N_TRAIN + 50).batches(10_000))
    np.savez(root / "train.npz", x=train.x.astype(np.float32), y=train.y.astype(np.int64))
    for path in root.iterdir():
        path.chmod(0o444)
    return root


# --------------------------------------------------------------------------- validators: complete and valid, or an exception


def rows_of(n: int) -> Callable[[Path], None]:
    def check(path: Path) -> None:
        from glorocert.results import read_rows

        rows = read_rows(path)
        lengths = {k: len(v) for k, v in rows.items()}
        assert rows and set(lengths.values()) == {n}, f"{n} rows expected, columns have {lengths}"

    return check


def json_file(path: Path) -> None:
    json.loads(path.read_text(encoding="utf-8"))


def summary_of(n: int) -> Callable[[Path], None]:
    def check(path: Path) -> None:
        assert json.loads(path.read_text(encoding="utf-8"))["num_samples"] == n

    return check


def bound_file(path: Path) -> None:
    from glorocert.lipschitz.boundfile import Bound

    Bound.load(path)


def onnx_file(path: Path) -> None:
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))


def png_file(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "no PNG header"
    assert data[-12:-8] == b"\x00\x00\x00\x00" and data[-8:-4] == b"IEND", "PNG without its IEND chunk (truncated)"


def zip_file(path: Path) -> None:  # TorchScript archives
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None


def safetensors_file(path: Path) -> None:
    from safetensors.torch import load_file

    assert load_file(str(path))


def npz_file(path: Path) -> None:
    with np.load(path) as archive:
        for name in archive.files:
            archive[name]


def card_file(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.rstrip().endswith("._"), "card.md does not end with its '_Generated … by glorocert …_' line"


def csv_log(path: Path) -> None:
    with open(path, newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert table and all(len(row) == len(table[0]) for row in table), "ragged or empty log.csv"


def jsonl_rows(path: Path, torn_tail_allowed: bool = False) -> list[dict]:
    """The finished rows of an appended JSONL log; a torn last line only where SIGKILL may have cut a write."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    elif lines:
        assert torn_tail_allowed, f"{path.name}: its last line is incomplete"
        lines.pop()
    return [json.loads(line) for line in lines]


def train_state(run: Path) -> int:
    """The resume state loads as ``--resume`` reads it (glorocert's own reader, which refuses a state whose halves
    do not belong together); its epochs done."""
    from glorocert.train.state import _read_state

    return int(_read_state(run)["epochs_done"])


# --------------------------------------------------------------------------- the commands


@dataclass
class Command:
    name: str
    args: Callable[[Path, Path, bool], list]         # (inputs, work directory, resume) → arguments
    outputs: Callable[[Path], dict[Path, Callable]]  # work directory → declared outputs and their validators
    kept: Callable[[Path], dict[Path, Callable]] = lambda w: {}  # files kept on purpose (resume state, logs)
    extra: Callable[[Path], dict[Path, Callable]] = lambda w: {}  # outputs whose names depend on the run
    resume_state: Callable[[Path], bool] = lambda w: False        # is there something to --resume?
    finishes: int = 0                                             # the exit code of a run that completes
    # the signals sent one after another in the same directory: all three where there is resume state to
    # lose; elsewhere SIGKILL and one of SIGINT / SIGTERM (which share their code path), to keep within time
    # (compare-local, whose workers each import torch again: SIGTERM only, which must also stop its worker)
    signals: tuple[str, ...] = ("SIGINT", "SIGTERM", "SIGKILL")


RS_SAMPLES = 12


def _rs_args(i: Path, w: Path, resume: bool) -> list:
    return ["compare-rs", i / "model.onnx", "--data", i / "digits.npz", "--limit", RS_SAMPLES, "--n0", 20, "--n", 4000,
            "--batch-size", 1000, "--out", w / "rs", "--plot", w / "rs.png", *(["--resume"] if resume else [])]


def _train_args(i: Path, w: Path, resume: bool) -> list:
    return ["train", "--data", i / "train.npz", "--limit", N_TRAIN, "--epochs", 3, "--eps", 0.3, "--batch-size", 50,
            "--out", w / "run", *(["--resume"] if resume else [])]


TRAIN_OUTPUTS = {"model.safetensors": safetensors_file, "model.onnx": onnx_file, "model.ts.pt": zip_file,
                 "model.onnx.bound.json": bound_file, "card.md": card_file}

COMMANDS = {c.name: c for c in [
    Command("train", _train_args,
            lambda w: {w / "run" / k: v for k, v in TRAIN_OUTPUTS.items()},
            kept=lambda w: {w / "run" / "log.csv": csv_log, w / "run" / "train_state.json": lambda p: train_state(p.parent),
                            w / "run" / "train_state.safetensors": safetensors_file},
            resume_state=lambda w: (w / "run" / "train_state.json").exists()),
    Command("compare-local",
            lambda i, w, r: ["compare-local", i / "model.onnx", "--data", i / "digits.npz", "--limit", 20, "--eps", "0.05,0.1",
                             "--methods", "gloro", "--json", w / "local.json"],
            lambda w: {w / "local.json": json_file}, signals=("SIGTERM",)),  # its report is written at the very end
    Command("compare-rs", _rs_args,
            lambda w: {w / "rs" / "gloro-rows.csv": rows_of(RS_SAMPLES), w / "rs" / "smoothing-rows.csv": rows_of(RS_SAMPLES),
                       w / "rs" / "summary.json": summary_of(RS_SAMPLES), w / "rs.png": png_file},
            kept=lambda w: {w / "rs" / "smoothing-rows.jsonl": lambda p: jsonl_rows(p, torn_tail_allowed=True)},
            resume_state=lambda w: (w / "rs" / "smoothing-rows.jsonl").exists()),
    Command("audit",
            lambda i, w, r: ["audit", i / "model.onnx", "--data", i / "digits.npz", "--limit", 30, "--steps", 5, "--restarts", 1,
                             "--out", w / "audit"],
            lambda w: {w / "audit" / "audit.json": json_file},
            extra=lambda w: {p: npz_file for p in (w / "audit").glob("violation-*.npz")}, signals=("SIGINT", "SIGKILL")),
    Command("certify",
            lambda i, w, r: ["certify", i / "model.onnx", "--data", i / "digits.npz", "--eps", "0.05,0.1",
                             "--out", w / "rows.csv", "--summary", w / "summary.json", "--plot", w / "curve.png"],
            lambda w: {w / "rows.csv": rows_of(N_DATA), w / "summary.json": summary_of(N_DATA), w / "curve.png": png_file},
            signals=("SIGTERM", "SIGKILL")),
    Command("bound", lambda i, w, r: ["bound", i / "model.onnx", "--out", w / "bound.json"],
            lambda w: {w / "bound.json": bound_file}, signals=("SIGINT", "SIGKILL")),
    Command("export", lambda i, w, r: ["export", i / "model.onnx", w / "gloro.onnx", "--eps", "0.1"],
            lambda w: {w / "gloro.onnx": onnx_file}, signals=("SIGTERM", "SIGKILL")),
]}


# --------------------------------------------------------------------------- running and signalling


@dataclass
class Run:
    code: int
    seconds: float
    stderr: str
    signalled: bool = False
    orphans: bool = False  # processes of the run (children) still alive after it exited


def launch(args: list, cwd: Path, log: Path, delay: float | None = None, signum: int | None = None) -> Run:
    """Run the entry point with ``args``; send ``signum`` after ``delay`` seconds if it still runs."""
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        started = time.monotonic()
        process = subprocess.Popen([*ENTRY, *map(str, args)], cwd=cwd, env=ENV, stdout=out, stderr=err,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        signalled = False
        try:
            if signum is not None:
                time.sleep(delay)
                if process.poll() is None:
                    os.kill(process.pid, signum)
                    signalled = True
            try:
                code = process.wait(timeout=EXIT_WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                code = None
            seconds = time.monotonic() - started
            orphans = _group_alive(process.pid, grace=3.0)
        finally:
            _kill_group(process.pid)  # children a SIGKILLed parent could not stop (compare-local's workers)
    stderr = log.with_suffix(".err").read_text(errors="replace")
    sent = f"{signal.Signals(signum).name} at {delay:.2f} s" if signalled else "no signal"
    print(f"{args[0]}: {sent} → exit {code} after {seconds:.2f} s")  # shown when a test fails
    if code is None:
        pytest.fail(f"{args[0]} did not exit within {EXIT_WAIT} s of the signal: swallowed?\n{stderr[-2000:]}")
    return Run(code, seconds, stderr, signalled, orphans)


def _group_alive(pgid: int, grace: float) -> bool:
    """Does a process of the group ``pgid`` (the run and its children) still run ``grace`` seconds after it exited?"""
    deadline = time.monotonic() + grace
    while True:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)


def snapshot_names(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir()}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def interrupt_line(stderr: str) -> tuple[str | None, str | None]:
    """(the one line saying what an interrupted run kept, or None; what is wrong with stderr, or None)."""
    if "Traceback" in stderr or "Exception ignored" in stderr:
        return None, f"a traceback on stderr:\n{stderr[-3000:]}"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith(("interrupted", "terminated"))]
    if len(said) != 1:
        return None, f"expected ONE interrupt line on stderr, got {len(said)}:\n{stderr[-3000:]}"
    if lines[-1] != said[0]:
        return said[0], f"the interrupt line is not the last line of stderr:\n{stderr[-3000:]}"
    return said[0], None


def stat_of(paths) -> dict[Path, tuple[int, int] | None]:
    found = {}
    for path in paths:
        try:
            s = path.stat()
            found[path] = (s.st_ino, s.st_mtime_ns)
        except FileNotFoundError:
            found[path] = None
    return found


def validate(path: Path, check: Callable) -> str | None:
    try:
        check(path)
    except Exception as e:  # noqa: BLE001 — any failure to read it back is the finding
        return f"{path.name} is not complete and valid: {type(e).__name__}: {e}"
    return None


BY_SUFFIX = {".json": json_file, ".csv": csv_log, ".npz": npz_file, ".png": png_file, ".onnx": onnx_file,
             ".safetensors": safetensors_file, ".pt": zip_file, ".md": lambda p: p.read_text(encoding="utf-8")}


def check_directory(cmd: Command, work: Path, after: str) -> list[str]:
    """Every file under ``work`` is complete and valid: a declared output or kept file by its own check, any
    other file by its format (a command may keep more state than this suite knows of). Partial files are
    allowed only after SIGKILL (``after`` names the signal); a hidden file is a partial or a finding."""
    problems = []
    known = {**cmd.outputs(work), **cmd.extra(work), **cmd.kept(work)}
    for path in sorted(p for p in work.rglob("*") if p.is_file()):
        where = path.relative_to(work)
        partial = next((part for part in where.parts if part.endswith(PARTIAL)), None)  # a file, or a staging directory
        if partial:
            if after != "SIGKILL":
                problems.append(f"after {after}: a partial file was left behind: {where}")
            elif not partial.startswith("."):
                problems.append(f"a partial file that is not hidden: {where}")
            continue
        if path.suffix == ".jsonl":
            check = lambda p: jsonl_rows(p, torn_tail_allowed=after == "SIGKILL")  # noqa: E731
        elif path in known:
            check = known[path]
        elif path.name.startswith(".") or path.suffix not in BY_SUFFIX:
            problems.append(f"after {after}: an unexpected file (a temporary file under another name?): {where}")
            continue
        else:
            check = BY_SUFFIX[path.suffix]
        error = validate(path, check)
        if error:
            problems.append(f"after {after}: {where}: {error}")
    return problems


def resume_rows(cmd: Command, work: Path) -> dict[int, dict]:
    if cmd.name != "compare-rs" or not (work / "rs" / "smoothing-rows.jsonl").exists():
        return {}
    return {int(r["index"]): r for r in jsonl_rows(work / "rs" / "smoothing-rows.jsonl", torn_tail_allowed=True)}


def train_epochs(cmd: Command, work: Path) -> int | None:
    if cmd.name != "train" or not (work / "run" / "train_state.json").exists():
        return None
    try:
        return train_state(work / "run")
    except Exception:  # noqa: BLE001 — reported by check_directory
        return -1


def check_signalled(cmd: Command, work: Path, name: str, run: Run, expected: int, before: dict,
                    rows_before: dict, epochs_before: int | None) -> list[str]:
    """Everything a run interrupted by signal ``name`` must have left: see the module docstring."""
    problems = []
    what = f"{cmd.name} after {name} at {run.seconds:.1f} s"
    declared = list(cmd.outputs(work))
    changed = [p for p, s in stat_of(declared).items() if s is not None and s != before.get(p)]
    # A signal that lands while the interpreter shuts down, after the command finished and published everything,
    # meets Python's restored default action: the process ends by that signal (a shell reads 130 / 143 all
    # the same) without a line. Accepted only when every output was published by this run.
    finished_then_signalled = run.code == -SIGNALS[name][0] and len(changed) == len(declared) and name != "SIGKILL"
    if run.code not in (expected, cmd.finishes) and not finished_then_signalled:
        problems.append(f"{what}: exit code {run.code}, expected {expected} (or {cmd.finishes} if it finished first)\n{run.stderr[-2000:]}")
    if run.orphans and name != "SIGKILL":
        problems.append(f"{what}: child processes were still running 3 s after it exited")
    if run.code == expected and name != "SIGKILL":
        line, wrong = interrupt_line(run.stderr)
        if wrong:
            problems.append(f"{what}: {wrong}")
        if line is not None:
            if changed and len(changed) != len(declared):
                problems.append(f"{what}: only some outputs were published (not all or nothing): "
                                f"{sorted(p.name for p in changed)} of {sorted(p.name for p in declared)}")
            if "no output was written" in line and changed:
                problems.append(f"{what}: says 'no output was written' but published {sorted(p.name for p in changed)}: {line}")
            for path in changed:
                if str(path) not in line and path.name not in line:
                    problems.append(f"{what}: published {path.name} without saying so: {line}")
            state_grew = resume_rows(cmd, work) != rows_before or train_epochs(cmd, work) != epochs_before
            if state_grew and "--resume" not in line:
                problems.append(f"{what}: kept the resume state it wrote but does not say so (and how to resume): {line}")
    problems += [f"{cmd.name}: {p}" for p in check_directory(cmd, work, name)]
    rows_after = resume_rows(cmd, work)
    lost = sorted(set(rows_before) - set(rows_after))
    if lost:
        problems.append(f"{what}: finished smoothing rows lost from smoothing-rows.jsonl: indices {lost}")
    altered = [i for i in rows_before if i in rows_after and rows_after[i] != rows_before[i]]
    if altered:
        problems.append(f"{what}: finished smoothing rows changed: indices {altered}")
    epochs_after = train_epochs(cmd, work)
    if epochs_before is not None and (epochs_after is None or epochs_after < epochs_before):
        problems.append(f"{what}: the resume state after epoch {epochs_before} is gone or unreadable (now: {epochs_after})")
    return problems


def compare_with_reference(cmd: Command, work: Path, reference: Path) -> list[str]:
    """The interrupted-and-resumed run ends where an uninterrupted one does."""
    problems = []
    if cmd.name == "train":
        from safetensors.torch import load_file

        ours, theirs = load_file(str(work / "run" / "model.safetensors")), load_file(str(reference / "run" / "model.safetensors"))
        if set(ours) != set(theirs) or any(not np.array_equal(ours[k].numpy(), theirs[k].numpy()) for k in ours):
            problems.append("train: the resumed run's weights differ from the uninterrupted run's")
    if cmd.name == "compare-rs":
        from glorocert.results import read_rows

        ours, theirs = read_rows(work / "rs" / "smoothing-rows.csv"), read_rows(reference / "rs" / "smoothing-rows.csv")
        for column in ("index", "predicted", "radius", "correct"):
            if column in theirs and not np.array_equal(ours[column], theirs[column]):
                problems.append(f"compare-rs: resumed smoothing rows differ from the uninterrupted run's in {column!r}")
    if cmd.name == "certify":
        from glorocert.results import read_rows

        if not np.array_equal(read_rows(work / "rows.csv")["radius"], read_rows(reference / "rows.csv")["radius"]):
            problems.append("certify: the final rows differ from the uninterrupted run's")
    return problems


# --------------------------------------------------------------------------- the suite


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_survives_signals_at_random_moments_keeps_its_resume_state_and_then_completes(inputs, tmp_path, name):
    cmd = COMMANDS[name]
    inputs_before = snapshot_names(inputs)
    reference, work = tmp_path / "reference", tmp_path / "work"
    reference.mkdir()
    work.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()

    ref = launch(cmd.args(inputs, reference, False), reference, logs / "reference")
    assert ref.code == cmd.finishes, f"the uninterrupted run failed:\n{ref.stderr[-3000:]}"
    assert not (problems := check_directory(cmd, reference, "an uninterrupted run")), problems
    assert all(p.exists() for p in cmd.outputs(reference)), "the uninterrupted run did not write every output"

    rng = random.Random(f"glorocert-signals:{name}")
    problems: list[str] = []
    for name_of_signal in cmd.signals:
        signum, expected = SIGNALS[name_of_signal]
        fraction = rng.uniform(0.45, 1.0)
        before = stat_of(cmd.outputs(work))
        rows_before, epochs_before = resume_rows(cmd, work), train_epochs(cmd, work)
        run = launch(cmd.args(inputs, work, cmd.resume_state(work)), work, logs / name_of_signal,
                     delay=fraction * ref.seconds, signum=signum)
        problems += check_signalled(cmd, work, name_of_signal, run, expected, before, rows_before, epochs_before)

    rows_before = resume_rows(cmd, work)
    final = launch(cmd.args(inputs, work, cmd.resume_state(work)), work, logs / "final")
    if final.code != cmd.finishes:
        problems.append(f"{name}: the run after the signals failed (exit {final.code}):\n{final.stderr[-3000:]}")
    else:
        problems += [f"{name} (final run): {p}" for p in check_directory(cmd, work, "the final run")]
        problems += [f"{name}: the final run did not write {p.name}" for p in cmd.outputs(work) if not p.exists()]
        lost = sorted(set(rows_before) - set(resume_rows(cmd, work)))
        if lost:
            problems.append(f"{name}: the resumed run dropped finished smoothing rows {lost}")
        problems += compare_with_reference(cmd, work, reference)
    if snapshot_names(inputs) != inputs_before:
        problems.append(f"{name} wrote beside its inputs: {sorted(set(snapshot_names(inputs)) ^ set(inputs_before))}")
    assert not problems, "\n".join(problems)


def _handler_installed(pid: int) -> bool:
    """Has the process installed its SIGTERM handler (launch.main's first act)? From /proc: SigCgt bit 15."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except FileNotFoundError:
        return False
    return False


@pytest.mark.parametrize("name_of_signal", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("name", ["certify", "train"])
def test_a_signal_during_start_up_exits_with_one_line_and_writes_nothing(inputs, tmp_path, name, name_of_signal):
    """Ctrl-C during start-up printed a 21–25-line traceback; SIGTERM was not handled at all. The signal is sent
    10 ms after the entry point has installed its handler (seen in /proc), while the CLI imports: a fixed delay from
    the start (0.2 s here before) raced the import, which cached bytecode makes shorter than that."""
    cmd = COMMANDS[name]
    signum, expected = SIGNALS[name_of_signal]
    work = tmp_path / "work"
    work.mkdir()
    args = cmd.args(inputs, work, False)
    with open(tmp_path / "stderr", "w") as err:
        started = time.monotonic()
        process = subprocess.Popen([*ENTRY, *map(str, args)], cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=err,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            while not _handler_installed(process.pid) and process.poll() is None and time.monotonic() - started < 30:
                time.sleep(0.005)
            time.sleep(0.01)  # inside the CLI's import, which takes 0.1–0.3 s (cached bytecode or not)
            os.kill(process.pid, signum)
            code = process.wait(timeout=EXIT_WAIT)
        finally:
            _kill_group(process.pid)
    stderr = (tmp_path / "stderr").read_text(errors="replace")
    assert code == expected, stderr
    line, wrong = interrupt_line(stderr)
    assert wrong is None, wrong
    assert "start-up" in line and "nothing was written" in line, line
    assert list(work.iterdir()) == []


# --------------------------------------------------------------------------- the windows a random moment rarely hits


class _InterruptingJson:
    """``json`` for glorocert.studies.compare_rs, but ``dumps`` raises KeyboardInterrupt on call number ``at``."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __getattr__(self, name):
        return getattr(json, name)

    def dumps(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return json.dumps(*args, **kwargs)


def test_ctrl_c_while_compare_rs_resumes_keeps_every_finished_row(monkeypatch, capsys, inputs, tmp_path):
    """``compare-rs --resume`` truncated smoothing-rows.jsonl and rewrote it: an interrupt in that window turned
    300,000 finished rows into 0. The run is interrupted after 3 rows, then at the first line the resumed run
    writes (in the rewrite, or at the first new row): the 3 rows must survive, and the run then completes."""
    from glorocert.studies import compare_rs

    out = tmp_path / "rs"
    args = ["compare-rs", inputs / "model.onnx", "--data", inputs / "digits.npz", "--limit", 6, "--n0", 10, "--n", 50,
            "--out", out]
    monkeypatch.setattr(compare_rs, "json", _InterruptingJson(at=4))
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 130, err
    finished = jsonl_rows(out / "smoothing-rows.jsonl")
    assert len(finished) == 3

    monkeypatch.setattr(compare_rs, "json", _InterruptingJson(at=1))
    code, _, err = run_main(monkeypatch, capsys, *args, "--resume")
    assert code in (130, 0), err
    assert jsonl_rows(out / "smoothing-rows.jsonl")[:3] == finished, "finished rows lost by an interrupted --resume"

    monkeypatch.setattr(compare_rs, "json", json)
    code, _, err = run_main(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    rows = jsonl_rows(out / "smoothing-rows.jsonl")
    assert rows[:3] == finished and sorted(int(r["index"]) for r in rows) == list(range(6))


def _train_args_in_process(inputs: Path, out: Path, *extra) -> list:
    return ["train", "--data", inputs / "train.npz", "--limit", 100, "--epochs", 2, "--eps", 0.3, "--batch-size", 50,
            "--out", out, *extra]


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.numpy() for k, v in load_file(str(path)).items()}


def test_an_interrupt_between_the_two_halves_of_the_train_state_keeps_a_state_that_resumes(monkeypatch, capsys, inputs, tmp_path):
    """After each epoch train writes train_state.safetensors, then train_state.json (which holds the tensors'
    hash). Ctrl-C, SIGTERM or kill -9 between the two leaves new tensors beside the old JSON, and --resume
    refuses ("does not match … cannot resume"): the run is lost. Interrupted there after epoch 2, the state must
    still load, and --resume must end with the weights of an uninterrupted run."""
    from glorocert.train import state

    code, _, err = run_main(monkeypatch, capsys, *_train_args_in_process(inputs, tmp_path / "reference"))
    assert code == 0, err

    run = tmp_path / "run"
    real_write_text = interrupt_at_the_second_state_json(monkeypatch)
    code, _, err = run_main(monkeypatch, capsys, *_train_args_in_process(inputs, run))
    assert code == 130, err
    monkeypatch.setattr(state, "write_text", real_write_text)
    assert train_state(run) >= 1
    code, _, err = run_main(monkeypatch, capsys, *_train_args_in_process(inputs, run, "--resume"))
    assert code == 0, err
    ours, theirs = _weights(run / "model.safetensors"), _weights(tmp_path / "reference" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_ctrl_c_while_train_writes_its_outputs_publishes_all_or_none_and_says_what_it_kept(monkeypatch, capsys, inputs, tmp_path):
    """train wrote model.safetensors, model.onnx, model.ts.pt, the bound and card.md one by one: Ctrl-C between
    them left some, and the message said "no output was written" (train declares no outputs). The message must
    also say that the resume state was kept, and how to resume."""
    from glorocert.train import outputs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    monkeypatch.setattr(outputs, "export_torchscript", interrupted)  # after the checkpoint and the ONNX export
    code, _, err = run_main(monkeypatch, capsys, *_train_args_in_process(inputs, run))
    assert code == 130, err
    line, wrong = interrupt_line(err)
    assert wrong is None, wrong
    present = sorted(name for name in TRAIN_OUTPUTS if (run / name).exists())
    assert present in ([], sorted(TRAIN_OUTPUTS)), f"some outputs published, not all: {present}"
    if not present:
        assert "no output was written" in line or "already complete" not in line, line
    assert "--resume" in line and ("train_state" in line or str(run) in line), f"the kept resume state is not named: {line}"
    assert not [p.name for p in run.iterdir() if PARTIAL in p.name]
    monkeypatch.undo()
    code, _, err = run_main(monkeypatch, capsys, *_train_args_in_process(inputs, run, "--resume"))
    assert code == 0, err
    assert all((run / name).exists() for name in TRAIN_OUTPUTS)


def _certify_interrupted(monkeypatch, capsys, inputs: Path, tmp_path: Path) -> tuple[int, str, Path]:
    """Certify in-process (something in it raises the interrupt); exit code, the one interrupt line, the rows path."""
    rows = tmp_path / "rows.csv"
    code, _, err = run_main(monkeypatch, capsys, "certify", inputs / "model.onnx", "--data", inputs / "digits.npz",
                            "--eps", "0.05", "--out", rows)
    line, wrong = interrupt_line(err)
    assert wrong is None, wrong
    return code, line, rows


def test_sigterm_while_a_command_runs_exits_143_and_says_terminated(monkeypatch, capsys, inputs, tmp_path):
    """SIGTERM (what `timeout`, container stops and CI cancellation send) is handled like Ctrl-C, with its own
    exit code: 143 and a line that says so, not Ctrl-C's 130 (typer turns every KeyboardInterrupt raised in a
    command, Terminated included, into Exit(130)). Raised here in the middle of certify, after publishing."""
    from glorocert import render
    from glorocert.errors import Terminated

    def terminated(*args, **kwargs):
        raise Terminated  # what the SIGTERM handler raises (the subprocess tests send the real signal)

    monkeypatch.setattr(render, "summary_table", terminated)
    code, line, rows = _certify_interrupted(monkeypatch, capsys, inputs, tmp_path)
    assert code == 143, f"exit {code}: {line}"
    assert "SIGTERM" in line and str(rows) in line, line


_INTERRUPT_INSIDE_A_LAZY_IMPORT = """
import sys
from pathlib import Path

class InterruptOnce:
    '''Raise KeyboardInterrupt, as SIGINT would, in the middle of importing sympy (torch imports it lazily).'''
    def find_spec(self, name, path=None, target=None):
        if name == "sympy.concrete.summations" and not MARK.exists():
            MARK.write_text("fired")
            raise KeyboardInterrupt
        return None

MARK = Path(sys.argv.pop(1))
sys.meta_path.insert(0, InterruptOnce())
from glorocert.launch import main
main()
"""


def test_ctrl_c_while_train_imports_torch_lazily_exits_130_with_one_line(inputs, tmp_path):
    """Seen in the random suite: train calls torch.use_deterministic_algorithms, which imports torch._inductor
    (and sympy) on first use, for seconds. Ctrl-C during that import, then the same call in train's ``finally``
    re-imports a half-initialised sympy: AttributeError "module 'sympy' has no attribute 'printing'", a 60-line
    traceback and exit 1. The KeyboardInterrupt is raised here at that exact point of the import."""
    mark, run = tmp_path / "fired", tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_INSIDE_A_LAZY_IMPORT, mark, *map(str, _train_args_in_process(inputs, run))],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=EXIT_WAIT, stdin=subprocess.DEVNULL, check=False)
    if not mark.exists():  # this torch never imports sympy during train: nothing was interrupted
        assert result.returncode == 0, result.stderr
        return
    _, wrong = interrupt_line(result.stderr)
    assert wrong is None, wrong
    assert result.returncode == 130, result.stderr[-3000:]


def test_a_signal_while_onnxruntime_initialises_is_an_interrupt_not_an_import_error(monkeypatch, capsys, inputs, tmp_path):
    """Seen in the random suite (export, SIGTERM at 8.6 s): onnxruntime is imported when the model is loaded, and
    its pybind11 extension turns an exception raised during its initialisation — here the signal handler's
    Terminated — into ``ImportError: initialization failed`` (Terminated its direct cause), which onnxruntime
    re-raises: a traceback and exit 1 instead of one line and 143. Reproduced by making that import fail so."""
    from glorocert.errors import Terminated

    class InitialisationInterrupted:
        def find_spec(self, name, path=None, target=None):
            if name == "onnxruntime":
                try:
                    raise Terminated
                except Terminated as e:
                    raise ImportError("initialization failed") from e

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(sys, "meta_path", [InitialisationInterrupted(), *sys.meta_path])
    code, line, rows = _certify_interrupted(monkeypatch, capsys, inputs, tmp_path)
    assert code == 143, f"exit {code}: {line}"
    assert not rows.exists()
