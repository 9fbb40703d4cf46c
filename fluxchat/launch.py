"""`accelerate launch`, as run_all.py starts every training stage, without accelerate's traceback on Ctrl-C.

    python -m fluxchat.launch --quiet --num_processes 1 ... pipeline/sft.py --preset tiny --run_name demo

Ctrl-C reaches every process of the terminal's group. accelerate's launcher, waiting on the stage, gave up 0.25 s
later with a KeyboardInterrupt traceback and left the stage to stop on its own, its last line printed after
run_all's. Here the launcher ignores Ctrl-C and keeps waiting, and the stage, told by FLUXCHAT_RESTORE_SIGINT,
takes Python's own handling back (`cli.run_cli`): it stops, says where, and the launcher passes its exit on.
A launcher started with Ctrl-C already ignored (a background job) changes nothing: the stage ignores it too.

SIGTERM, sent to the launcher alone (run_all passes its own on), would end it and leave the stage running with no
one waiting: the launcher passes it to the stage and waits for the stage to save a checkpoint and stop.
(With several processes, torch's launcher takes Ctrl-C and SIGTERM over and passes them on itself; the traceback
it ends in then is dropped.)

Also here, for run_all's side of it: the launch command line (`launcher`), the check of an accelerate config before
any stage runs, and `run_stage`, which waits on a stage and passes a signal sent to the chain on to it.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil  # accelerate's own dependency

from fluxchat import runs
from fluxchat.cli import RESTORE_SIGINT, Interrupted, fail
from fluxchat.config import load_yaml, on_cpu_only


def launcher(stage: str, accelerate_config: str | None) -> list[str]:
    """The command line a stage's script follows: `accelerate launch` (by way of this module) for a training stage."""
    if stage == "tokenizer":
        return [sys.executable]
    # --quiet: a failing stage's own one-line error is the last word, not accelerate's CalledProcessError traceback.
    cmd = [sys.executable, "-m", "fluxchat.launch", "--quiet"]  # accelerate launch, quiet on Ctrl-C too
    if accelerate_config:
        return cmd + ["--config_file", accelerate_config]
    # Explicit defaults: no accelerate config on this machine is normal, and silences accelerate's warning.
    cmd += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if on_cpu_only():  # accelerate otherwise sets OMP_NUM_THREADS=1: one core of the machine, half the speed on 2
        cmd += ["--num_cpu_threads_per_process", str(os.cpu_count() or 1)]
    return cmd


def check_accelerate_config(path: str) -> None:
    """accelerate reads its config only when it launches the first training stage, and a wrong one ends there in
    a traceback, after the tokenizer ran: read it as accelerate does, before any stage."""
    from accelerate.commands.config.config_args import load_config_from_file  # only with the flag: 2 s of imports

    if not Path(path).is_file():
        fail(f"--accelerate_config {path}: no such file (configs/accelerate/ has one per setup)")
    if not load_yaml(Path(path)):  # one line for a file that is not a YAML (or JSON) mapping
        fail(f"--accelerate_config {path} is empty: accelerate needs at least its distributed_type")
    try:
        config = load_config_from_file(path)
    except (ValueError, TypeError, KeyError) as err:  # no or an unknown distributed_type, unknown keys
        fail(f"--accelerate_config {path}: {str(err).strip().splitlines()[0]}")
    # accelerate takes any YAML value here and fails on it only when it launches (`num_processes: abc`: a TypeError
    # comparing it with 1, after the tokenizer stage ran).
    for key in ("num_processes", "num_machines", "machine_rank", "main_process_port"):
        value = getattr(config, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            fail(f"--accelerate_config {path}: {key} must be a whole number, got {value!r}")
    precision = str(getattr(config, "mixed_precision", None) or "no")
    if precision not in ("no", "fp16", "bf16", "fp8"):
        fail(f"--accelerate_config {path}: mixed_precision must be no, fp16, bf16 or fp8, got {precision!r}")
    kind = str(getattr(getattr(config, "distributed_type", None), "value", getattr(config, "distributed_type", "")))
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:  # else an ImportError traceback at
        fail(  # the first training stage, after the tokenizer ran
            f"--accelerate_config {path} runs DeepSpeed, which is not installed: `pip install deepspeed` (it needs "
            "GPUs and a CUDA toolkit), or choose another config"
        )
    processes, cores = getattr(config, "num_processes", 1) or 1, os.cpu_count() or 1
    if on_cpu_only() and processes > cores:  # a GPU config on a CPU machine: it ran, 8 processes on 2 cores, silently
        print(
            f"note: --accelerate_config {path} starts {processes} processes and this machine has no GPU, only {cores} "
            f"CPU cores: each process gets a share of them and a step trains {processes} batches; for CPUs, "
            "configs/accelerate/cpu_2proc.yaml",
            file=sys.stderr,
        )


def _typed_at_the_terminal() -> bool:
    """Whether a SIGINT here was Ctrl-C at the terminal we run in the foreground of, which the terminal sends to the
    whole foreground process group, the stage with us. Else (no terminal: a container, a supervisor, `setsid`,
    `timeout -s INT`) it was sent to us alone."""
    try:
        tty = os.open("/dev/tty", os.O_RDONLY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(tty) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(tty)


def run_stage(cmd: list[str]) -> int:
    """The stage's exit code. Ctrl-C reaches the stage too (one process group): wait while it stops and says where
    it stopped, where subprocess.call would kill it 0.25 s later, perhaps mid-save. A SIGTERM, or a SIGINT not typed
    at our terminal, sent to run_all alone (`timeout`, `kill`, `docker stop`) is passed on to the stage as SIGTERM
    (the launcher leaves SIGINT to the terminal; the stages stop the same way on both, once, ignoring a repeat).
    Then stop the chain."""
    # In the user's folder, as run_all. run_all says itself which later stages an --overwrite leaves.
    process = subprocess.Popen(cmd, env={**os.environ, runs.LATER_STAGES_NOTED: "1"})
    signals: list[int] = []  # what reached us, the first deciding how the chain ends
    passed_on = False

    def on_signal(signum, frame) -> None:
        nonlocal passed_on
        signals.append(signum)
        typed = signum == signal.SIGINT and _typed_at_the_terminal()  # then the stage had it too
        if not typed and not passed_on:  # once: the stage stops at the first
            process.send_signal(signal.SIGTERM)
            passed_on = True

    # Handlers, not KeyboardInterrupt: Popen.wait() holds a KeyboardInterrupt back 0.25 s, long enough for a
    # SIGTERM after it to be taken as the first. A SIGINT ignored (a background job) stays ignored.
    handled = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, on_signal) for s in handled}
    try:
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    # Our stages exit 128 + the signal; a plain Python (the launcher passes a stage's failure on as 1) -signal.
    by_code = {130: signal.SIGINT, -signal.SIGINT: signal.SIGINT, 143: signal.SIGTERM, -signal.SIGTERM: signal.SIGTERM}
    signum = signals[0] if signals else by_code.get(code)
    if signum is not None:
        raise Interrupted(
            "run the same run_all command again to continue: finished stages are skipped, and "
            f"{', '.join(runs.RESUMABLE)} continue from their newest checkpoint",
            signum,
        )
    return code


def pass_on(signum, frame) -> None:
    for child in psutil.Process().children():
        child.send_signal(signum)


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the stage as it starts: hence the variable
        os.environ[RESTORE_SIGINT] = "1"
    signal.signal(signal.SIGTERM, pass_on)
    sys.argv[0] = "accelerate launch"
    from accelerate.commands.launch import main  # here: run_all imports this module for its functions alone

    try:
        main()
    except Exception as err:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        if not isinstance(err, SignalException):
            raise
        # torch's multi-process launcher ends in this traceback once it has passed a Ctrl-C or SIGTERM on to every
        # process and waited for them: each has said where it stopped, nothing is left to say.
        sys.exit(128 + int(err.sigval))
