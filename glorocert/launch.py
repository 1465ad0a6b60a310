"""The `glorocert` console script: signals first, then the command line.

SIGTERM is turned into :class:`~glorocert.errors.Terminated` (a KeyboardInterrupt) before anything heavy is
imported, so that Ctrl-C and SIGTERM are handled alike at every moment — during start-up (importing torch takes
seconds) with one line instead of a traceback, and later by the command's own clean-up (no half-written output).
"""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import sys

from glorocert.errors import Terminated, caused_by_interrupt, interrupt_on_sigterm


def main() -> None:
    """The console script: :func:`run`, then leave the process without interpreter teardown (:func:`_leave`)."""
    _leave(run())


def run() -> int | str | None:
    """The command line in this process, with signals handled from the first instant; its exit code."""
    interrupt_on_sigterm()
    try:
        cli = importlib.import_module("glorocert.cli")  # the heavy imports (torch, onnx) happen here
    except BaseException as e:  # an extension may wrap the interrupt in an ImportError
        if not caused_by_interrupt(e):
            raise
        sys.stderr.write(("terminated (SIGTERM)" if Terminated.received else "interrupted") + " during start-up; nothing was written\n")
        return Terminated.exit_code if Terminated.received else 130
    try:
        cli.main()
        return 0
    except SystemExit as e:
        return e.code
    except KeyboardInterrupt:  # a signal in the instant between the command's own handler and here
        return Terminated.exit_code if Terminated.received else 130


def _leave(code: int | str | None) -> None:
    """Exit without tearing the interpreter down. The command has finished: its outputs are complete or
    absent. Teardown only adds ways to lose the exit code: Python restores the default handlers while
    finalizing, so a late SIGTERM killed the process (-15), and a native torch/onnxruntime thread touching
    the finalizing interpreter aborted it (-6, "PyThreadState_Get: ... the GIL is released")."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)  # too late to stop anything: the result stands
    if isinstance(code, str):
        sys.stderr.write(code + "\n")
        code = 1
    atexit._run_exitfuncs()  # what the libraries registered (multiprocessing reaps its children here)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    main()
