"""The `glorocert` console script: signals first, then the command line.

SIGTERM is turned into :class:`~glorocert.errors.Terminated` (a KeyboardInterrupt) before anything heavy is
imported, so that Ctrl-C and SIGTERM are handled alike at every moment — during start-up (importing torch takes
seconds) with one line instead of a traceback, and later by the command's own clean-up (no half-written output).
"""

from __future__ import annotations

import importlib
import sys

from glorocert.errors import Terminated, caused_by_interrupt, interrupt_on_sigterm


def main() -> None:
    interrupt_on_sigterm()
    try:
        cli = importlib.import_module("glorocert.cli")  # the heavy imports (torch, onnx) happen here
    except BaseException as e:  # an extension may wrap the interrupt in an ImportError
        if not caused_by_interrupt(e):
            raise
        sys.stderr.write(("terminated (SIGTERM)" if Terminated.received else "interrupted") + " during start-up; nothing was written\n")
        sys.exit(Terminated.exit_code if Terminated.received else 130)
    cli.main()


if __name__ == "__main__":
    main()
