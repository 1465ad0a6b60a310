"""Writing and hashing files: the one atomic writer every output goes through.

:func:`atomic_write` writes to a uniquely named hidden temporary file in the
target's directory, fsyncs it and moves it over the target with
``os.replace`` only once complete, so after an exception, a crash or Ctrl-C
the target either holds the previous complete file or does not exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from glorocert.errors import GlorocertError

__all__ = ["atomic_write", "write_text", "write_json", "jsonable", "sha256_of"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it over ``path`` only if the block completes.

    On any exception (including KeyboardInterrupt) the temporary file is
    removed and the exception re-raised, so ``path`` is never half-written.
    Missing parent directories are created.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp{target.suffix}")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies, unlike mkstemp's 0600
    except OSError as e:
        raise GlorocertError(f"cannot write {target}: {e.strerror or e}; choose a writable location") from e
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the rename makes it visible
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GlorocertError(f"cannot write {target}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
