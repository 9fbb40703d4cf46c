"""How a command runs: its user errors as one line (`UsageError`, `fail`, exit 2), Ctrl-C and SIGTERM as one line
saying what to run next (`Interrupted`, exit 128 + the signal), its own output failing, and which process speaks.
`run_cli(main)` is the last line of every command. Imports nothing of ours: every module can use it."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn


class UsageError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with what to run next (continue from a checkpoint, or start again): printed by `run_cli`,
    which exits 128 + the signal's number, as a shell reports a command ended by it."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


def _stop(signum, frame) -> NoReturn:
    raise Interrupted(signum=signum)


# What `run_cli` says after a Ctrl-C or SIGTERM that lands outside training (while the trainer is built, during the
# evaluation before training, ...), where no Interrupted carries it: set by a stage once its folder exists.
_say_next: Callable[[], str] | None = None


def after_interrupt(say_next: Callable[[], str] | None) -> None:
    global _say_next
    _say_next = say_next


def fail(message: str) -> NoReturn:
    raise UsageError(message)


@contextmanager
def terminal_output() -> Iterator[None]:
    """A command's own output failing (`> /dev/full`, a disk that fills) ends it in one line, where it was a traceback;
    a reader that leaves (`| head`) is run_cli's, which ends quietly."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as err:
        try:  # Python's flush of stdout at exit would fail again, with a traceback of its own
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):  # no stdout at all, or one with no descriptor (a test's)
            pass
        fail(f"cannot write to standard output ({err.strerror or err})")


# Set by fluxchat/launch.py, which ignores Ctrl-C itself: the command it starts takes Python's handling back.
RESTORE_SIGINT = "FLUXCHAT_RESTORE_SIGINT"


def run_cli(main: Callable[..., Any]) -> None:
    """Run a stage's `main()` as a command: user errors become one line on stderr and exit code 2."""
    after_interrupt(None)  # what an earlier main() in this process set (the tests run many)
    if os.environ.pop(RESTORE_SIGINT, None) == "1":
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # SIGTERM (`kill`, `timeout`, `docker stop`, a cluster's preemption) ends the command the way Ctrl-C does, with
    # its one line, where Python's default would end it without a word. A training loop answers both more gently.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stop)
    try:
        main()
        _leave_process_group()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        # The reader of our output went away (`chat.py ... | head -1`): stop as a Unix tool does, without a word,
        # exit status as a shell reports SIGPIPE. Python's flush of stdout at exit would fail again: point it at null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    except KeyboardInterrupt as interrupt:
        # A second signal now (run_all or a launcher passing on what the process group already had) would break
        # this message off in a traceback of its own: the command is stopping already.
        for ignored in (signal.SIGINT, signal.SIGTERM):
            signal.signal(ignored, signal.SIG_IGN)
        signum = getattr(interrupt, "signum", signal.SIGINT)
        word = "terminated" if signum == signal.SIGTERM else "interrupted"
        message = str(interrupt) or (_say_next() if _say_next else "")
        if main_process():  # once, not once per process of a multi-process run
            # On a line of its own: Ctrl-C usually lands in the middle of a progress bar's line.
            print(f"\n{word}: {message}" if message else f"\n{word}", file=sys.stderr)
        sys.exit(128 + signum)


def _leave_process_group() -> None:
    """torch.distributed's process group, left before the interpreter exits. Torn down with the process instead, its
    threads aborted one rank of ~1 in 8 two-process runs on a loaded machine ("terminate called without an active
    exception", exit -6) after the stage had finished and saved, and the launcher reported the run as failed."""
    if "torch.distributed" not in sys.modules:  # a command that never trained: nothing to leave, no torch to import
        return
    import torch.distributed as dist  # already imported (above): this module never imports torch

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
