"""Run one study step in a fresh process, so that its peak memory is its own and a crash is a result, not the end.

:func:`run_isolated` runs a module-level function in a *spawned* child and
returns its result dict with ``status`` (ok, unsupported, out of memory,
failed, crashed) and the child's own ``peak_rss_bytes``; :func:`run_here`
does the same in this process (no per-step memory).
"""

from __future__ import annotations

import multiprocessing
import resource
import signal
import sys
from collections.abc import Callable

from glorocert.errors import GlorocertError

__all__ = ["peak_rss_bytes", "run_here", "run_isolated"]


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes.

    Linux: ``VmHWM`` of /proc/self/status. Not ``ru_maxrss``, which survives fork and exec: a child
    spawned by a large parent would report the parent's peak as its own.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def _call(target, argument) -> dict:
    """``{"status": "ok", **target(argument)}``, or the status and message of the exception it raised."""
    try:
        return {"status": "ok", **target(argument)}
    except GlorocertError as e:
        return {"status": "out of memory" if "out of memory" in str(e) else "unsupported", "error": str(e)}
    except MemoryError as e:
        return {"status": "out of memory", "error": str(e) or "MemoryError"}
    except Exception as e:  # noqa: BLE001 — reported in the method's row, never a traceback in the report
        text = str(e).lower()
        return {"status": "out of memory" if "alloc" in text and "memory" in text else "failed", "error": f"{type(e).__name__}: {e}"}


def _child(conn, target, argument) -> None:
    """Child process: run ``target(argument)``; send back {status, …, peak_rss_bytes}."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops this process
    result = _call(target, argument)
    result["peak_rss_bytes"] = peak_rss_bytes()
    conn.send(result)
    conn.close()


def run_here(target: Callable, argument) -> dict:
    """:func:`run_isolated` without the process: same result, but no per-method memory (``None``)."""
    return {**_call(target, argument), "peak_rss_bytes": None, "load_rss_bytes": None}


def run_isolated(target: Callable, argument, *, poll_seconds: float = 0.2) -> dict:
    """``target(argument)`` in a fresh *spawned* process; its result dict with ``status`` and ``peak_rss_bytes``.

    ``target`` must be importable (a module-level function). A child that dies
    without answering (killed, segfault) gives ``status="crashed"`` and a
    message; Ctrl-C in the parent stops the child and propagates.
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, target, argument), daemon=True)
    process.start()
    send.close()  # the child holds the only writer: its death closes the pipe
    try:
        result = None
        while process.is_alive() or receive.poll(0):
            if receive.poll(poll_seconds):
                try:
                    result = receive.recv()
                except EOFError:
                    pass
                break
        process.join()
    except BaseException:
        process.terminate()
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
        raise
    finally:
        receive.close()
    if result is None:
        why = _exit_reason(process.exitcode)
        result = {"status": "crashed", "error": f"the child process died without a result ({why})", "peak_rss_bytes": None}
    return result


def _exit_reason(code: int | None) -> str:
    if code is None or code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "an unknown signal"
    return f"killed by {name}, signal {-code}" + ("; out of memory?" if -code == signal.SIGKILL else "")
