"""The `glorocert` console script: signals first, then the command line.

SIGTERM is turned into :class:`~glorocert.errors.Terminated` (a KeyboardInterrupt) before anything heavy is
imported, so that Ctrl-C and SIGTERM are handled alike at every moment — during start-up (importing torch takes
seconds) with one line instead of a traceback, and later by the command's own clean-up (no half-written output).
"""

from __future__ import annotations

import importlib
import sys

from glorocert.errors import Terminated, interrupt_on_sigterm


def main() -> None:
    interrupt_on_sigterm()
    try:
        cli = importlib.import_module("glorocert.cli")  # the heavy imports (torch, onnx) happen here
    except KeyboardInterrupt as e:
        sys.stderr.write("interrupted during start-up; nothing was written\n")
        sys.exit(Terminated.exit_code if isinstance(e, Terminated) else 130)
    cli.main()


if __name__ == "__main__":
    main()
