"""Ctrl-C in the command lines: at any instant, one line on stderr and exit status 130.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread happens to be, and
that is not always survivable: inside an import (numpy then refuses to be imported again, "CPU
dispatcher tracer already initialized"), inside a callback from C++ (pybind11 aborts the process),
during interpreter start-up (a traceback), or inside code that catches it. So `mixtral-edu` and the
training command replace Python's handler, as their first act, by one that writes the line and
ends the process on the spot with `os._exit(130)`. No clean-up runs then, and none is needed: the
commands write files only by renames. A stretch that does have clean-up to do (a staging folder to
remove) asks for a KeyboardInterrupt instead, for that stretch only: `with raising_keyboard_interrupt():`.

The package's `__init__` installs it first thing when the process is `mixtral-edu ...` or
`python -m mixtral_edu...` (`on_command_line`), so only the interpreter's own start-up comes before it.
A process started with SIGINT ignored (a background job of a shell script) keeps ignoring it, as
Python itself does. Imported by a program, a notebook or `cli.main([...])` from Python, nothing changes.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager

_line = b"interrupted\n"
COMMAND_NAMES = ("mixtral-edu", "mixtral-edu.exe")


def _exit_now(signum, frame) -> None:
    try:
        os.write(2, _line)
    except OSError:             # stderr closed: the status still says it
        pass
    os._exit(130)


def launched_as_command() -> bool:
    """True when this process is `mixtral-edu ...` or `python -m mixtral_edu ...` (from sys.argv[0])."""
    program = sys.argv[0] if sys.argv else ""
    return (os.path.basename(program) in COMMAND_NAMES
            or program.endswith(os.path.join("mixtral_edu", "__main__.py")))


def on_command_line() -> None:
    """Called by the package's __init__: `exit_on_ctrl_c` when this process is one of the package's commands.
    While `python -m mixtral_edu...` imports the package, sys.argv[0] is still "-m" (the module is being
    located); the command (cli.py, training/train.py) sets its own line once it runs."""
    if launched_as_command():
        exit_on_ctrl_c("mixtral-edu: interrupted")
    elif sys.argv[:1] == ["-m"]:
        exit_on_ctrl_c("interrupted")


def exit_on_ctrl_c(line: str) -> bool:
    """From now on Ctrl-C prints `line` on stderr and exits with status 130. Calling it again changes the
    line. False (and nothing changes) when SIGINT is ignored or this is not the main thread."""
    global _line
    _line = (line.replace("\n", " ") + "\n").encode("utf-8", "replace")
    try:
        if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None):
            return False
        signal.signal(signal.SIGINT, _exit_now)
    except ValueError:          # not the main thread
        return False
    return True


def installed() -> bool:
    return signal.getsignal(signal.SIGINT) is _exit_now


def ignore_ctrl_c() -> None:
    """The command's work is done: a late Ctrl-C must not kill the interpreter while it shuts down
    (Python puts back the default action, death by signal with no line, before it exits)."""
    if installed():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def raising_keyboard_interrupt():
    """Within the block Ctrl-C raises KeyboardInterrupt (so `finally` clauses clean up); outside it the
    process ends at once. Does nothing where `exit_on_ctrl_c` is not installed."""
    if not installed():
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, _exit_now)
