"""Writing and hashing files: the one atomic writer every output goes through, and the output policy.

:func:`atomic_write` writes to a uniquely named hidden temporary file in the
target's directory (``.NAME.PID-HEX.glorocert-partial``), fsyncs it and moves
it over the target with ``os.replace`` only once complete, so after an
exception, a crash, Ctrl-C or SIGTERM the target either holds the previous
complete file or does not exist. :class:`Outputs` is what every command does
with its outputs: check them all before any work, publish them together.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import secrets
import signal
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from glorocert.errors import GlorocertError

__all__ = ["Outputs", "PARTIAL", "atomic_write", "jsonable", "remove_stale_partials", "sha256_of", "write_json", "write_text"]


PARTIAL = ".glorocert-partial"  # every temporary file ends so: never mistaken for a result, removed by the next run


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it over ``path`` only if the block completes.

    On any exception (including KeyboardInterrupt) the temporary file is
    removed and the exception re-raised, so ``path`` is never half-written.
    A temporary file left by a process that was killed (kill -9) is removed
    by the next write into the same directory. Missing parent directories
    are created. Inside :meth:`Outputs.publishing`, a declared output is
    staged instead and appears only when every output is complete.
    """
    target = Path(path)
    tmp = _new_partial(target)
    try:
        yield tmp
        _fsync(tmp)  # the data is on disk before the rename makes it visible
        outputs = _PUBLISHING.get()
        if outputs is not None and outputs.declares(target):
            outputs.staged.append((tmp, target))
        else:
            os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GlorocertError(f"cannot write {target}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_partial(target: Path) -> Path:
    """A new, empty, uniquely named temporary file beside ``target`` (stale ones of dead processes removed first)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(target.parent)
        tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL}")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies, unlike mkstemp's 0600
    except OSError as e:
        raise GlorocertError(f"cannot write {target}: {e.strerror or e}; choose a writable location") from e
    return tmp


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_partials(directory: Path) -> list[Path]:
    """Remove the temporary files in ``directory`` whose writing process no longer runs; the removed paths."""
    removed = []
    for path in directory.glob(f".*{PARTIAL}"):
        if not path.is_file():
            continue
        pid = path.name.rsplit(".", 2)[-2].split("-")[0] if path.name.count(".") >= 2 else ""
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_PUBLISHING: contextvars.ContextVar[Outputs | None] = contextvars.ContextVar("glorocert_publishing", default=None)


class Outputs:
    """The files one command writes: checked before any work, staged while it runs, published together at the end.

    ``add`` refuses, before anything runs, an output whose format is unknown, that is a directory, that is
    write-protected, that names the same file as another output or as an input (the model, the data, the
    bound …), or whose directory cannot be written. Inside :meth:`publishing`, every write of a declared
    output (through :func:`atomic_write`) is staged; the staged files replace their targets together when
    the block completes, and are removed when it fails or is interrupted: a run leaves all its results or
    none. Undeclared files (resume state, logs that grow while a run goes on) are written at once.
    """

    def __init__(self, inputs: Iterable[str | os.PathLike | None] = ()):
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.files: dict[Path, str] = {}
        self.directories: dict[Path, str] = {}
        self.staged: list[tuple[Path, Path]] = []
        self.published: list[Path] = []
        self.kept: list[str] = []  # what an interrupted run leaves on purpose (resume state), said on exit

    def add(self, path: str | os.PathLike | None, option: str, formats: Sequence[str] | None = None) -> Path | None:
        """Declare the output file of ``option`` (None: not requested); refuses it now if it cannot be written safely."""
        if path is None:
            return None
        path = Path(path)
        if formats is not None and path.suffix.lower() not in formats:
            raise GlorocertError(f"{option} {path}: unknown format {path.suffix or '(no extension)'}; use one of {', '.join(formats)}")
        if path.is_dir():
            raise GlorocertError(f"{option} {path} is a directory; give a file name")
        self._check_new(path, option)
        self.files[_key(path)] = option
        return path

    def add_directory(self, path: str | os.PathLike | None, option: str, names: Iterable[str] = ()) -> Path | None:
        """Declare an output directory: every file written into it is a result (staged); ``names`` are the results
        it will hold, checked like files; refuses a path that exists and is not a directory."""
        if path is None:
            return None
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise GlorocertError(f"{option} {path} exists and is not a directory")
        self._check_new(path, option)
        self.directories[_key(path)] = option
        for name in names:
            self._check_new(path / name, option)
            self.files[_key(path / name)] = option
        return path

    def _check_new(self, path: Path, option: str) -> None:
        key = _key(path)
        declared = {**self.files, **self.directories}
        if key in declared:
            raise GlorocertError(f"{option} {path} is also given as {declared[key]}; give each output its own path")
        for other, name in self.files.items():
            if other in key.parents or key in other.parents:
                raise GlorocertError(f"{option} {path} and {name} {other} lie inside one another; give each output its own path")
        for source in self.inputs:
            if key == _key(source) or (path.exists() and source.exists() and os.path.samefile(path, source)):
                raise GlorocertError(f"{option} {path} would overwrite the input {source}; choose another path")
        if path.is_file() and not os.stat(path).st_mode & 0o222:
            raise GlorocertError(f"{option} {path} is write-protected; remove it or choose another path")
        _probe_writable(path, option)

    def declares(self, target: Path) -> bool:
        key = _key(target)
        return key in self.files or any(parent in self.directories for parent in map(_key, target.parents))

    @contextlib.contextmanager
    def publishing(self) -> Iterator[Outputs]:
        """Stage every declared output written inside the block; publish them together when it completes."""
        token = _PUBLISHING.set(self)
        try:
            yield self
            with _signals_held():  # Ctrl-C or SIGTERM now would split the set: it waits until all are in place
                while self.staged:
                    tmp, target = self.staged[0]
                    try:
                        os.replace(tmp, target)
                    except OSError as e:
                        raise GlorocertError(f"cannot write {target}: {e.strerror or e}") from e
                    self.staged.pop(0)
                    self.published.append(target)
        finally:
            _PUBLISHING.reset(token)
            for tmp, _ in self.staged:  # failed or interrupted: nothing staged stays behind
                tmp.unlink(missing_ok=True)
            self.staged.clear()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT and SIGTERM for the block: they are recorded and raised right after it.

    The handlers are swapped rather than the signal mask changed: a mask holds only the calling thread, and the
    kernel hands a process-wide signal to any thread (numpy's, torch's, onnxruntime's pools) that does not
    block it. Outside the main thread, where handlers cannot be set, the block runs as it is.
    """
    received: list[int] = []
    try:
        previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        if received:
            signal.raise_signal(received[0])  # now handled as usual: KeyboardInterrupt or Terminated


def _key(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _probe_writable(path: Path, option: str) -> None:
    """A real probe of the nearest existing directory: permission bits say little to root or on special file systems."""
    parent = next(p for p in path.absolute().parents if p.exists())
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise GlorocertError(f"{option} {path}: cannot write to {parent} ({e.strerror}); choose a writable location") from None


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically; numpy scalars/arrays, tensors and paths become plain JSON."""
    return write_text(path, json.dumps(jsonable(obj), indent=2) + "\n")


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy arrays/scalars, 0-d tensors (anything with ``.item()``) and paths turned into JSON values."""
    if isinstance(obj, Mapping):
        return {(k if isinstance(k, str) else str(jsonable(k))): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic) or (hasattr(obj, "item") and not isinstance(obj, (str, bytes, float, int))):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
