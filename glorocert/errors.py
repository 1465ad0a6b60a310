"""The one exception type users see, and the interruptions (Ctrl-C, SIGTERM) every command handles alike.

Every user mistake or bad input (unreadable file, unsupported operator, NaN
pixels, stale bound …) raises :class:`GlorocertError` with a one-line message
that says what is wrong and what to do. The CLI turns it into exit code 2
without a traceback; anything else is a bug and keeps its traceback.
"""

import signal


class GlorocertError(Exception):
    """A user-facing error: bad input, unsupported model, wrong usage."""

    exit_code = 2


class UnsupportedOperator(GlorocertError):
    """The model contains an operation the IR does not know (never assumed 1-Lipschitz)."""

    def __init__(self, op: str, node: str, hint: str = ""):
        self.op, self.node = op, node
        msg = f"unsupported operator {op!r} at node {node!r}"
        super().__init__(msg + (f": {hint}" if hint else ""))


class InputShapeNeeded(GlorocertError):
    """The model file does not record its per-sample input shape (TorchScript, a dynamic ONNX input)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, container stops and CI cancellation send), handled exactly as Ctrl-C is."""

    exit_code = 143
    received = False  # set when raised: libraries (typer) may replace the exception on its way up

    def __init__(self, *args):
        Terminated.received = True
        super().__init__(*args)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def caused_by_interrupt(error: BaseException) -> bool:
    """Whether ``error`` was raised because Ctrl-C or SIGTERM arrived (it has a KeyboardInterrupt in its chain)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def interrupt_on_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread, so every clean-up that Ctrl-C runs runs too."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def one_line(text: str, limit: int = 300) -> str:
    """A library's (often multi-line) message as one complete line: whitespace collapsed, cut at a word with '…'."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    return flat[:limit].rsplit(" ", 1)[0] + " …"
