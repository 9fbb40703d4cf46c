"""`accelerate launch`, as run_all.py starts every training stage, without accelerate's traceback on Ctrl-C.

    python -m fluxchat.launch --quiet --num_processes 1 ... pipeline/sft.py --preset tiny --run_name demo

Ctrl-C reaches every process of the terminal's group. accelerate's launcher, waiting on the stage, gave up 0.25 s
later with a KeyboardInterrupt traceback and left the stage to stop on its own, its last line printed after
run_all's. Here the launcher ignores Ctrl-C and keeps waiting, and the stage, told by FLUXCHAT_RESTORE_SIGINT,
takes Python's own handling back (`config.run_cli`): it stops, says where, and the launcher passes its exit on.
A launcher started with Ctrl-C already ignored (a background job) changes nothing: the stage ignores it too.
"""

from __future__ import annotations

import os
import signal
import sys

from accelerate.commands.launch import main

from fluxchat.config import RESTORE_SIGINT

if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the stage as it starts: hence the variable
        os.environ[RESTORE_SIGINT] = "1"
    sys.argv[0] = "accelerate launch"
    main()
