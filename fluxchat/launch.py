"""`accelerate launch`, as run_all.py starts every training stage, without accelerate's traceback on Ctrl-C.

    python -m fluxchat.launch --quiet --num_processes 1 ... pipeline/sft.py --preset tiny --run_name demo

Ctrl-C reaches every process of the terminal's group. accelerate's launcher, waiting on the stage, gave up 0.25 s
later with a KeyboardInterrupt traceback and left the stage to stop on its own, its last line printed after
run_all's. Here the launcher ignores Ctrl-C and keeps waiting, and the stage, told by FLUXCHAT_RESTORE_SIGINT,
takes Python's own handling back (`config.run_cli`): it stops, says where, and the launcher passes its exit on.
A launcher started with Ctrl-C already ignored (a background job) changes nothing: the stage ignores it too.

SIGTERM, sent to the launcher alone (run_all passes its own on), would end it and leave the stage running with no
one waiting: the launcher passes it to the stage and waits for the stage to save a checkpoint and stop.
(With several processes, torch's launcher takes Ctrl-C and SIGTERM over and passes them on itself; the traceback
it ends in then is dropped.)
"""

from __future__ import annotations

import os
import signal
import sys

import psutil  # accelerate's own dependency
from accelerate.commands.launch import main

from fluxchat.config import RESTORE_SIGINT


def pass_on(signum, frame) -> None:
    for child in psutil.Process().children():
        child.send_signal(signum)


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the stage as it starts: hence the variable
        os.environ[RESTORE_SIGINT] = "1"
    signal.signal(signal.SIGTERM, pass_on)
    sys.argv[0] = "accelerate launch"
    try:
        main()
    except Exception as err:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        if not isinstance(err, SignalException):
            raise
        # torch's multi-process launcher ends in this traceback once it has passed a Ctrl-C or SIGTERM on to every
        # process and waited for them: each has said where it stopped, nothing is left to say.
        sys.exit(128 + int(err.sigval))
