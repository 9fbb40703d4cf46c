"""The start and finish of every Trainer stage (pretraining included), staged saves, dense logs (console + train.log).

A stage command reads as: parse; `plan_stage` (every check on flags and the output folder, nothing written);
load its inputs; `start_stage` (work folder, log file, resolved config); build the Trainer; `train`;
`save_model`/`save_final`; `finish_stage` (logs, metrics, card, finished marker, swap into place, push).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from accelerate import PartialState
from transformers import AutoTokenizer, ProgressCallback, TrainerCallback, TrainerState
from transformers.trainer_utils import TrainOutput, rotate_checkpoints

from fluxchat import cards, generation, hub, runs
from fluxchat.cli import Interrupted, after_interrupt, fail, main_process
from fluxchat.config import resolved_config

logger = logging.getLogger("fluxchat")


@dataclass
class StageRun:
    """One run of a stage: where it ends up, where it is written until it has finished (the same folder, or
    a sibling swapped in at the end for `--overwrite`), and the checkpoint it resumes from."""

    stage: str
    output_dir: Path
    work_dir: Path
    overwrite: bool = False
    resume_from: Path | None = None


def run_name(training_args) -> str:
    return training_args.run_name or runs.DEFAULT_RUN_NAME


def resolve_output_dir(training_args, stage: str) -> Path:
    """`--output_dir` if given, else runs/<run_name>/<stage>; written back into the training args."""
    if training_args.output_dir is not None and not str(training_args.output_dir).strip():  # Path("") is "."
        fail(f"--output_dir is empty: give a folder, or leave it out to write to runs/<run_name>/{stage}")
    if training_args.output_dir in (None, "trainer_output"):  # transformers' placeholder when unset
        training_args.output_dir = str(runs.stage_dir(run_name(training_args), stage))
    return Path(training_args.output_dir)


def plan_stage(training_args, stage: str, *, overwrite: bool, resume: bool = False) -> StageRun:
    """Every check a stage makes before reading its inputs; writes nothing. Call right after parsing."""
    if training_args.run_name is not None:
        runs.check_run_name(training_args.run_name)
    if getattr(training_args, "resume_from_checkpoint", None):  # a TrainingArguments field nothing reads
        fail(
            "--resume_from_checkpoint is not supported: pass --resume to continue from the newest complete checkpoint in the output folder"
        )
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        fail(
            f"--max_steps {training_args.max_steps} trains nothing: give a positive number of steps (or -1 to train --num_train_epochs epochs)"
        )
    if training_args.max_steps == -1 and not training_args.num_train_epochs > 0:
        fail(
            f"--num_train_epochs {training_args.num_train_epochs} trains nothing: give a positive number (or --max_steps)"
        )
    output_dir = resolve_output_dir(training_args, stage)
    resume_from = runs.check_output_dir(
        output_dir, overwrite=overwrite, resume=resume, resumable=stage in runs.RESUMABLE, stage=stage
    )
    return StageRun(stage, output_dir, runs.work_dir(output_dir, overwrite), overwrite, resume_from)


def start_stage(
    run: StageRun, training_args, *config_objs, config_file: Path | None = None, model=None, tokenizer=None
) -> None:
    """Create the work folder, log into its train.log and save the resolved config there. Call once the inputs
    are loaded, so that a broken input leaves no trace. The folder is prepared on the main process only, the
    others waiting: with several processes an --overwrite on each would delete what the first had written.
    `model` and `tokenizer`, those about to train, are checked against the checkpoint a --resume continues."""
    state = PartialState()
    if run.resume_from is not None:  # before anything is written: a refused resume leaves config.yaml as it was
        refuse_unresumable_changes(run, resolved_config(*config_objs, config_file=config_file))
        refuse_another_model(run, model, tokenizer)
    with state.main_process_first():
        if state.is_main_process:
            runs.begin(run.output_dir, run.stage, overwrite=run.overwrite, resume=run.resume_from is not None)
    after_interrupt(lambda: next_step_after_interrupt(run))  # the folder exists: a stop from here on says what next
    log_to_file(run.work_dir)
    if state.is_main_process:  # the config records where the stage ends up, not where it is built
        if run.resume_from is not None:
            note_changed_settings(
                run.work_dir / runs.CONFIG_FILE, resolved_config(*config_objs, config_file=config_file)
            )
        runs.save_resolved_config(run.work_dir / runs.CONFIG_FILE, *config_objs, config_file=config_file)
    training_args.output_dir = str(run.work_dir)  # the Trainer's checkpoints go where the stage is built


# Settings that say how this command runs, not what it trains: a resume changes them without a note.
RESUME_FREE = {"resume", "overwrite", "output_dir", "logging_dir", "config_file", "report_to", "push_to_hub"}


# Settings that decide which weights train: a checkpoint's optimizer state fits no other set (a traceback in torch's
# load_state_dict after the note), and its weights no other shape. And the chat format: the model would be saved
# with a template other than the one most of its steps learned.
RESUME_FIXED = ("use_peft", "lora_r", "lora_target_modules", "n_layer", "n_embd", "n_head", "chat_format")


def _changed_settings(previous_config: Path, current: dict) -> tuple[dict, dict, list[str]]:
    """(the interrupted run's settings, these, the keys that differ), as config.yaml holds them."""
    try:
        previous = yaml.safe_load(previous_config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}, current, []
    if not isinstance(previous, dict):
        return {}, current, []
    current = yaml.safe_load(yaml.safe_dump(current))  # the types config.yaml holds
    changed = [
        k
        for k in sorted(current)
        if k in previous and k not in RESUME_FREE and _as_paths(previous[k]) != _as_paths(current[k])
    ]
    return previous, current, changed


def refuse_unresumable_changes(run: StageRun, current: dict) -> None:
    previous, current, changed = _changed_settings(run.work_dir / runs.CONFIG_FILE, current)
    if fixed := [key for key in changed if key in RESUME_FIXED]:
        key = fixed[0]
        fail(
            f"--resume with --{key} {current[key]}: the checkpoints in {run.output_dir} were trained with {key} "
            f"{previous[key]}; resume with that, or start again with --overwrite"
        )


# What a checkpoint's weights must share with the model a --resume loads them into.
SHAPE_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")


def refuse_another_model(run: StageRun, model, tokenizer) -> None:
    """The same flags can build another model: a tokenizer retrained with --overwrite under an interrupted pretrain,
    or a parent stage redone. Loading the checkpoint then ended in torch's size-mismatch traceback once the stage had
    started, or, where the shapes matched (another vocabulary of the same size), went on with every id meaning
    another token."""
    checkpoint = run.resume_from
    if tokenizer is not None and (checkpoint / "tokenizer_config.json").exists():
        if AutoTokenizer.from_pretrained(checkpoint).get_vocab() != tokenizer.get_vocab():
            fail(
                f"--resume: {checkpoint} was trained with another tokenizer than this command's (retrained since, or "
                "another one named): resume with that one, or start again with --overwrite"
            )
    try:
        saved = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # a LoRA checkpoint holds an adapter, no config.json: its own load says what is wrong
    for key in SHAPE_KEYS if model is not None else ():
        if key in saved and getattr(model.config, key, saved[key]) != saved[key]:
            fail(
                f"--resume: {checkpoint} has {key} {saved[key]}, but the model this command builds has "
                f"{getattr(model.config, key)} (its tokenizer or starting model changed since): start again with "
                "--overwrite"
            )


def note_changed_settings(previous_config: Path, current: dict) -> None:
    """--resume with other settings than the interrupted run's (a longer --max_steps, another batch size): allowed,
    as the Trainer allows it, but said in one note, since config.yaml will record only the new ones."""
    previous, current, changed = _changed_settings(previous_config, current)
    if changed:
        shown = ", ".join(f"{key} {previous[key]} -> {current[key]}" for key in changed)
        note = f"note: resuming with settings that differ from the interrupted run's: {shown} (config.yaml records the new ones)"
        print(note, file=sys.stderr, flush=True)
        logger.info(note)  # and in train.log, beside the steps it explains


def _as_paths(value):
    """Files named relative to one folder and absolutely by run_all.py are the same setting."""
    items = value if isinstance(value, list) else [value]
    if items and all(isinstance(v, str) and v and Path(v).exists() for v in items):
        return [Path(v).resolve() for v in items]
    return value


def log_to_file(output_dir: Path) -> None:
    """Mirror our log lines into <stage>/train.log so an overnight run can be followed with `tail -f`."""
    if not main_process():
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    for old in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:  # an earlier stage in this process
        logger.removeHandler(old)
        old.close()
    handler = logging.FileHandler(output_dir / runs.LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        if key in ("learning_rate",):
            return f"{key} {value:.2e}"
        return f"{key} {value:,.1f}" if abs(value) >= 1000 else f"{key} {value:.4f}"
    return f"{key} {value}"


class DenseProgress(ProgressCallback):
    """The Trainer's tqdm bar, with a dense one-line log per logging step instead of a printed dict.

    Adds tokens/s measured over training time only (evaluation and sampling excluded), so the
    number compares with a plain training loop's.
    """

    def __init__(self, tokens_per_step: int | None = None):
        super().__init__()
        self.tokens_per_step = tokens_per_step
        self._window = None  # (time, step) at the start of the current measuring window
        self._last_step_end = None  # (time, step) when the newest step ended, before its evaluation or checkpoint
        self.measured_steps, self.measured_seconds = 0, 0.0  # every window of this session, for `tokens_per_second`

    def tokens_per_second(self) -> float | None:
        """This session's training throughput over every measured window (evaluation, samples and checkpoints
        excluded), as the log lines give it window by window."""
        if not self.tokens_per_step or self.measured_seconds <= 0:
            return None
        return round(self.measured_steps * self.tokens_per_step / self.measured_seconds, 1)

    def on_step_begin(self, args, state, control, **kwargs):
        if self._window is None:
            self._window = (time.perf_counter(), state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self._last_step_end = (time.perf_counter(), state.global_step)

    def _close_window(self) -> tuple[int, float]:
        """(steps, seconds) from the window's start to the newest step's end, added to the session's totals. A log
        line, an evaluation or the end of training closes it (else a run shorter than one logging interval measured
        nothing); the clock restarts at the next step, so evaluation, samples and checkpoints are not counted."""
        counted = (0, 0.0)
        if self._window is not None and self._last_step_end is not None:
            (start, step), (end, last) = self._window, self._last_step_end
            if last > step and end > start:
                counted = (last - step, end - start)
                self.measured_steps += counted[0]
                self.measured_seconds += counted[1]
        self._window = None
        return counted

    def on_evaluate(self, args, state, control, **kwargs):
        super().on_evaluate(args, state, control, **kwargs)
        self._close_window()  # and restart the clock after evaluation

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        self._close_window()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if self.tokens_per_step and "loss" in logs:
            steps, seconds = self._close_window()
            if steps:
                logs["tokens_per_second"] = steps * self.tokens_per_step / seconds
                state.log_history[-1]["tokens_per_second"] = round(logs["tokens_per_second"], 1)
        if not state.is_world_process_zero:
            return
        logs.pop("total_flos", None)
        line = f"step {state.global_step}/{state.max_steps} | " + " | ".join(_fmt(k, v) for k, v in logs.items())
        logger.info(line)
        if self.training_bar is not None:
            self.training_bar.write(line)
            shown = {k: f"{v:.3f}" for k, v in logs.items() if k in ("loss", "eval_loss")}
            if "tokens_per_second" in logs:
                shown["tok/s"] = f"{logs['tokens_per_second']:,.0f}"
            self.training_bar.set_postfix(shown, refresh=False)
        else:
            print(line, flush=True)


def use_dense_progress(trainer, tokens_per_step: int | None = None) -> DenseProgress:
    trainer.remove_callback(ProgressCallback)
    progress = DenseProgress(tokens_per_step)
    trainer.add_callback(progress)
    return progress


def positions_from_attention_mask(*models) -> None:
    """Score left-padded rows at their own positions: position ids from the attention mask when a forward
    pass gets none.

    GPT-2 has learned absolute positions, and transformers' forward falls back to `arange` when it gets no
    `position_ids` (only `generate()` derives them from the mask). GRPOTrainer left-pads its prompts and
    scores the replies without them, so every shorter prompt was scored at positions shifted by its pad
    count: one pad token moves a sum's reply from log-prob -104 to -207 on the tiny SFT model. GRPO then
    trained on log-probs of a model it never samples from, and its KL to the reference spiked to 200+.
    TRL's PPO passes them itself (trl#6800 is the same gap in online DPO). Rotary models are unaffected
    either way (a shift keeps relative offsets), so the hook is harmless there; with a cache or explicit
    ids it does nothing.
    """

    def fill(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        past = kwargs.get("past_key_values")
        if (
            kwargs.get("position_ids") is not None
            or mask is None
            or ids is None
            or mask.dim() != 2
            or mask.shape[1] != ids.shape[1]
            or (past is not None and past.get_seq_length() > 0)
        ):
            return None
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return args, kwargs

    for model in models:
        if model is None:
            continue
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT wrapper
        inner = getattr(inner, "module", inner)  # under DDP
        inner.base_model.register_forward_pre_hook(fill, with_kwargs=True)  # the backbone: GPT2Model for GPT-2


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel.

    Every training step frees and re-allocates the same activation buffers. By default glibc returns
    large freed blocks to the kernel and maps them again on the next step, and each page touched again
    is a page fault: 13.7k faults per tiny-preset step against 4.8k in a plain loop, 15% of the step's
    time (0.25 s vs 0.21 s; see bench/pretrain_throughput.py). Peak memory is unchanged: the process
    keeps what it already needed at its peak. Not glibc (macOS, musl): nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest: blocks up to 32 MB come from the reusable heap
    libc.mallopt(m_trim_threshold, 1 << 30)  # give memory back only when over 1 GB is free at the heap's top


def stage_checkpoints(trainer) -> None:
    """Make every checkpoint the Trainer saves appear atomically: it is written whole under
    <output>/.staging/checkpoint-N, then renamed to <output>/checkpoint-N.

    The Trainer writes checkpoint-N in place (weights, optimizer, then trainer_state.json), so a
    kill -9 mid-save would leave a folder that looks like a checkpoint. The Trainer has no hook for
    where a checkpoint goes, so we point its output folder at the staging folder for the duration of
    the save, then rename and apply its rotation (save_total_limit) to the real folder ourselves.
    A failed save (a full disk) removes its staging folder and ends the stage in one line.
    """
    save_checkpoint, output_dir_for = trainer._save_checkpoint, trainer._get_output_dir

    def staged_save(model, trial, *args, **kwargs):
        run_dir = Path(output_dir_for(trial=trial))
        staging = run_dir / runs.STAGING
        trainer._get_output_dir = lambda trial=None: str(staging)
        name = f"checkpoint-{trainer.state.global_step}"
        try:
            with runs.save_errors(runs.staging_dir(run_dir, name), name):
                save_checkpoint(model, trial, *args, **kwargs)
        finally:
            trainer._get_output_dir = output_dir_for
        trainer.accelerator.wait_for_everyone()  # sharded saves: every rank has written its part
        if trainer.args.should_save:
            with runs.save_errors(runs.staging_dir(run_dir, name), name):
                runs.publish(runs.staging_dir(run_dir, name), run_dir)
            best = trainer.state.best_model_checkpoint
            if best and Path(best).parent == staging:
                trainer.state.best_model_checkpoint = str(run_dir / Path(best).name)
            # By step, not by time as the Trainer does: two checkpoints a second apart (a stop right after a periodic
            # save) look alike to a coarse clock, and transformers then warns that mtime is unreliable.
            rotate_checkpoints(str(run_dir), trainer.args.save_total_limit, trainer.state.best_model_checkpoint)
        trainer.accelerator.wait_for_everyone()

    trainer._save_checkpoint = staged_save


def save_final(trainer, output_dir: Path, save) -> None:
    """Run `save(folder)` (every process: sharded saves gather across them) into <output>/.staging/final,
    then move the files into `output_dir`: a crash mid-save never leaves half a model.safetensors."""
    staged = runs.staging_dir(output_dir, "final")
    if trainer.is_world_process_zero():
        shutil.rmtree(staged, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    with runs.save_errors(staged, "the final model"):
        save(staged)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        with runs.save_errors(staged, "the final model"):
            runs.publish(staged, output_dir)


def train(trainer, run: StageRun):
    """`trainer.train()` with staged checkpoints and glibc's memory kept, resuming from `run.resume_from` if given.
    Ctrl-C or SIGTERM ends in one line saying what to run next; where the stage can resume, a checkpoint of the
    step in progress is saved first (`StopAtStepEnd`).

    A run killed after its *last* checkpoint but before it was marked finished has nothing left to
    train; the Trainer would still take one more step (step 61 of 60). We load that checkpoint instead.
    """
    keep_freed_memory()
    stage_checkpoints(trainer)
    # A checkpoint is worth saving only where the next command continues from it: not for an --overwrite's
    # replacement (dropped by the next start), nor for reward and PPO (which start again).
    stop = StopAtStepEnd(trainer) if run.stage in runs.RESUMABLE and run.work_dir == run.output_dir else None
    try:
        if stop is None:
            result = _train(trainer, run.resume_from)
        else:
            with stop.listening():
                result = _train(trainer, run.resume_from)
        if stop is None or (not stop.stopped and stop.signum is None):
            refuse_diverged(trainer, run)
            return result
        signum = stop.signum or signal.SIGINT  # stopped by another process's signal: said as Ctrl-C
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signum", signal.SIGINT)
    except (RuntimeError, OSError, EOFError) as err:
        # SIGTERM sent to every process (a cluster's preemption) reaches the data-loader workers too, and torch ends
        # them at once (its own handler): the next batch fails. Stopped all the same, at the last saved checkpoint.
        if stop is None or stop.signum != signal.SIGTERM or not _data_loader_failed(err):
            raise
        signum = signal.SIGTERM
    _close_progress_bar(trainer)
    raise Interrupted(next_step_after_interrupt(run), signum) from None


def _data_loader_failed(err: BaseException) -> bool:
    """Whether the error is the data loader losing its workers: torch's own "DataLoader worker (pid N) is killed"
    or, where a worker died while handing over a batch's shared memory, the socket that carried it failing under
    the main process (ConnectionResetError in `recvmsg`, seen once in a CI run of the suite). An error a worker
    raised itself (a file it could not read) reaches the main process re-raised by torch, not through
    multiprocessing's own frames, and is no stop."""
    if isinstance(err, RuntimeError) and "DataLoader worker" in str(err):
        return True
    # walk_tb, not extract_tb: the file names alone, without reading every frame's source line (slow, and a window
    # for another signal while the stop is being handled).
    files = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(err.__traceback__)]
    return (
        isinstance(err, (OSError, EOFError))
        and any(f.endswith(os.path.join("torch", "utils", "data", "dataloader.py")) for f in files)
        and any(os.sep + "multiprocessing" + os.sep in f for f in files)
    )


def refuse_diverged(trainer, run: StageRun) -> None:
    """A run whose weights went NaN or infinite (a learning rate far too high) is not saved as a finished stage: the
    next stage would load it and every reply would be garbage. The Trainer logs on regardless: by default it even
    leaves NaN losses out of the logged average (`logging_nan_inf_filter`)."""
    bad = any(not torch.isfinite(p).all() for p in trainer.model.parameters() if p.requires_grad)
    accelerator = trainer.accelerator
    if accelerator.num_processes > 1:  # sharded weights (FSDP, ZeRO-3): every process must stop, or the others wait
        bad = bool(accelerator.gather(torch.tensor([bad], device=accelerator.device)).any())
    if bad:
        kept = f"{run.output_dir} is kept as it was; " if run.work_dir != run.output_dir else ""
        fail(
            f"training diverged: the weights are NaN or infinite after step {trainer.state.global_step}, so the "
            f"model was not saved; {kept}lower --learning_rate (or --max_grad_norm) and run again with --overwrite"
        )


def _close_progress_bar(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:  # else the bar redraws itself below our last line
        if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
            callback.training_bar.close()
            callback.training_bar = None


# A Ctrl-C this soon after the first is the same one passed on by a launcher (torch's multi-process launcher passes
# every signal to each process it started, which already had it from the terminal), not a second press.
REPEAT_AFTER_S = 1.0


class StopAtStepEnd(TrainerCallback):
    """Ctrl-C or SIGTERM while training: the step in progress ends, its checkpoint is saved, the stage stops. A
    preempted job (SIGTERM, then SIGKILL after a grace period) or a Ctrl-C loses no step. A second Ctrl-C stops at
    once; a repeated SIGTERM changes nothing (run_all and the launcher pass theirs on, so one `kill` of a process
    group can reach the stage three times).

    Every process decides together (`accelerator.check_trigger`, a sum over processes): a rank that saved alone
    would wait for the others forever. transformers' own `enable_jit_checkpoint` decides per process, writes
    checkpoint-N in place where ours are staged whole, and lets `train()` return as if finished.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.signum: int | None = None  # the first signal this process got
        self.since = 0.0
        self.stopped = False  # stopped early, this process signalled or not

    @contextmanager
    def listening(self):
        owner = os.getpid()

        def request(signum, frame):
            if os.getpid() != owner:  # a data-loader worker (forked with this handler): the main process decides
                return
            if self.signum is None:
                self.signum, self.since = signum, time.monotonic()
                self.trainer.accelerator.set_trigger()
                _quiet_killed_data_loader_workers()
                if self.trainer.is_world_process_zero():
                    again = "; Ctrl-C again stops at once" if signum == signal.SIGINT else ""
                    _say_whole(f"\nstopping: the checkpoint of this step is saved first{again}\n")
            elif signum == signal.SIGINT and time.monotonic() - self.since > REPEAT_AFTER_S:
                raise KeyboardInterrupt

        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return
        handled = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) not in (signal.SIG_IGN, None)]
        previous = {s: signal.signal(s, request) for s in handled}  # an ignored signal (a background job) stays so
        self.trainer.add_callback(self)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def on_step_end(self, args, state, control, **kwargs):
        accelerator = self.trainer.accelerator
        if accelerator.num_processes == 1:  # no collective: on a GPU, check_trigger's .item() waits for every step
            asked = self.signum is not None
        else:
            asked = accelerator.check_trigger()
        if asked:
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True


def _say_whole(text: str) -> None:
    """One write(2) to stderr: the other processes of the run and torch's C++ warnings write to the same pipe, and
    one landed between print()'s text and its newline, gluing itself to the line (a CI run of the 2-process test)."""
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), text.encode("utf-8", "replace"))
    except (AttributeError, OSError, ValueError):  # a stderr with no descriptor (a test's capture)
        print(text, end="", file=sys.stderr, flush=True)


def _quiet_killed_data_loader_workers() -> None:
    """A signal sent to the whole process group (a cluster's preemption) ends the data-loader workers too. Where torch
    notices that only once the stage has stopped, in the loader's `__del__`, Python printed "Exception ignored in
    ... Traceback ... RuntimeError: DataLoader worker (pid N) is killed by signal: Terminated" between the stage's
    lines (seen once in 27 runs of the suite). That death is this very stop, already said in one line: not reported."""
    default = sys.unraisablehook

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and "DataLoader worker" in str(error) and "killed by signal" in str(error):
            return
        # A progress bar whose construction the stop cut short: tqdm's __del__ then fails on the missing `pos`
        # ("Exception ignored in: <function tqdm.__del__> ... AttributeError", seen once in a CI run of the suite).
        deleting = getattr(unraisable.object, "__qualname__", "")
        if isinstance(error, AttributeError) and deleting.endswith("tqdm.__del__"):
            return
        default(unraisable)

    sys.unraisablehook = hook
    # torch's SIGCHLD handler raises the same error wherever the main process happens to be when a worker dies: once
    # inside train()'s own handling of the stop (a CI run of the suite ended in that traceback, exit 1 for 143). From
    # now on the stage is ending, so that death is expected; any other error of the handler still propagates. Not
    # restored: the signal can come after `train()` has returned, while the stop's line is printed.
    chld = getattr(signal, "SIGCHLD", None)  # none on Windows
    torch_handler = signal.getsignal(chld) if chld is not None else None
    if callable(torch_handler):

        def worker_ended(signum, frame) -> None:
            try:
                torch_handler(signum, frame)
            except RuntimeError as err:
                if "DataLoader worker" not in str(err):
                    raise

        signal.signal(chld, worker_ended)


def next_step_after_interrupt(run: StageRun) -> str:
    if run.work_dir != run.output_dir:  # an --overwrite: its replacement is dropped by the next start
        return f"{run.output_dir} is kept as it was; run the same command to start the replacement again"
    checkpoint = runs.latest_checkpoint(run.work_dir)
    if checkpoint is None:
        return f"no checkpoint was saved in {run.work_dir}; run the same command to start the stage again"
    if run.stage in runs.RESUMABLE:
        return f"run the same command with --resume to continue from {checkpoint}"
    return f"{checkpoint} is a snapshot this stage cannot continue from; run the same command with --overwrite to start again"


class _TiedKeysAreNotMissing(logging.Filter):
    """transformers 5's Trainer warns on every resume that a GPT-2 checkpoint lacks `lm_head.weight`: tied to the
    token embeddings, it is never saved, and loading the embeddings restores it. Only that warning is dropped."""

    PREFIX = "There were missing keys in the checkpoint model loaded: "

    def __init__(self, model):
        super().__init__()
        self.tied = set(getattr(model, "_tied_weights_keys", None) or ())

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.PREFIX):
            return True
        missing = re.findall(r"'([^']+)'", message[len(self.PREFIX) :])
        return not (missing and all(any(k == t or k.endswith(f".{t}") for t in self.tied) for k in missing))


class _SaidInOurNote(logging.Filter):
    """The Trainer's "arguments do not match the ones in trainer_state.json" (logging, eval and save steps, batch
    size): `note_changed_settings` has already named every changed setting from config.yaml, these among them, in one
    line; the Trainer's multi-line copy printed beside it said the same twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "do not match the ones in the `trainer_state.json`" not in record.getMessage()


def _train(trainer, resume_from: Path | None):
    if resume_from is None:
        return trainer.train()  # PPOTrainer.train() takes no argument
    quiet, said = _TiedKeysAreNotMissing(trainer.model), _SaidInOurNote()
    logging.getLogger("transformers.trainer").addFilter(quiet)
    logging.getLogger("transformers.trainer_utils").addFilter(said)
    try:
        state = json.loads((Path(resume_from) / runs.TRAINER_STATE_FILE).read_text())
        if 0 < trainer.args.max_steps <= state["global_step"]:
            trainer._load_from_checkpoint(str(resume_from))  # weights only; optimizer state is not needed any more
            trainer.state = TrainerState.load_from_json(str(Path(resume_from) / runs.TRAINER_STATE_FILE))
            losses = [h["train_loss"] for h in trainer.state.log_history if "train_loss" in h]
            return TrainOutput(trainer.state.global_step, losses[-1] if losses else float("nan"), {})
        return trainer.train(resume_from_checkpoint=str(resume_from))
    finally:
        logging.getLogger("transformers.trainer").removeFilter(quiet)
        logging.getLogger("transformers.trainer_utils").removeFilter(said)


def gather_rank_info(info: dict) -> list[dict]:
    """Every rank's `info`, on every rank (a single process gets a list of one)."""
    if dist.is_available() and dist.is_initialized():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, info)
        return gathered
    return [info]


def is_sharded(trainer) -> bool:
    """Whether each process holds only a shard of the weights (FSDP, DeepSpeed ZeRO-3): then no process can
    save the model from its own copy, and the full weights must be gathered first."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return bool(getattr(trainer, "is_deepspeed_enabled", False) and plugin is not None and plugin.zero_stage == 3)


def full_state_dict(trainer, model) -> dict | None:
    """`model`'s full weights on the main process (None elsewhere), gathered by accelerate's get_state_dict from
    the module the trainer wrapped (e.g. PPO's policy+value wrapper), as the Trainer's own sharded save does.
    Call it on every process: under FSDP / ZeRO-3 the gather is collective."""
    wrapped = getattr(trainer, "model_wrapped", None)  # PPOTrainer sets it only under DeepSpeed
    wrapped = trainer.model if wrapped is None else wrapped
    state = trainer.accelerator.get_state_dict(wrapped)
    if not trainer.is_world_process_zero():
        return None
    unwrapped = trainer.accelerator.unwrap_model(wrapped)
    prefix = next((f"{name}." if name else "" for name, module in unwrapped.named_modules() if module is model), None)
    if prefix is None:  # not part of the trained module (e.g. a merged copy): its own weights are whole
        return None
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def merged_copy(peft_model, state: dict):
    """A CPU copy of a LoRA model built from gathered full weights, with the adapter merged in."""
    import peft  # only LoRA stages need it

    base = peft_model.get_base_model()
    copy = peft.get_peft_model(type(base)._from_config(base.config), peft_model.peft_config["default"])
    copy.load_state_dict(state)
    return copy.merge_and_unload()


def save_model(trainer, model, tokenizer, output_dir: Path, merge_adapter: bool, direct: bool = False):
    """Save `model` (+ tokenizer with chat template + generation config) so AutoModel... loads it.

    A LoRA model is merged first unless --merge_adapter false (then only the adapter is saved, and
    loading it needs peft). `direct` saves `model` itself from the main process instead of going
    through trainer.save_model (PPO: its save_model cannot find the policy inside a DDP wrapper).
    Returns the model to evaluate."""
    is_peft = hasattr(model, "merge_and_unload")
    sharded = is_sharded(trainer)
    if is_peft and merge_adapter and not sharded:  # sharded: merged after gathering (a shard cannot be merged)
        model = model.merge_and_unload()
    if getattr(model, "can_generate", lambda: False)():  # PPOTrainer leaves its own stop settings in it
        model.generation_config = generation.generation_config(tokenizer)

    def save(folder: Path) -> None:
        if direct or (is_peft and merge_adapter):
            # Every process takes part in the gather (FSDP / ZeRO-3: each holds a shard); the main one writes.
            state = full_state_dict(trainer, model)
            if trainer.is_world_process_zero():
                if sharded and is_peft and merge_adapter:
                    merged_copy(model, state).save_pretrained(folder)
                else:
                    model.save_pretrained(folder, state_dict=state)
                tokenizer.save_pretrained(folder)
        else:
            trainer.save_model(str(folder))  # on every process: sharded (DeepSpeed/FSDP) saves gather across them

    save_final(trainer, output_dir, save)
    return model


def finish_stage(
    trainer, run: StageRun, metrics: dict, evaluation: dict | None = None, *, finished: bool = True, push_request=None
) -> None:
    """Write log_history.json, eval.json (when the stage evaluates), metrics.json and the model card, then the
    finished marker (last); then swap the work folder into place and push if `--push_to_hub` asked for it."""
    if not trainer.is_world_process_zero():
        return
    runs.write_json(run.work_dir / runs.LOG_HISTORY_FILE, trainer.state.log_history)
    if run.resume_from is not None:
        metrics = {
            **metrics,
            **resumed_figures(trainer.state.log_history, resumed_step(run), metrics, trainer.state.global_step),
        }
    if evaluation is not None:
        runs.write_json(run.work_dir / runs.EVAL_FILE, evaluation)
        metrics = {**metrics, "eval": evaluation}
    runs.write_json(run.work_dir / runs.METRICS_FILE, metrics)
    cards.write_model_card(
        run.work_dir, run.stage, location=run.output_dir
    )  # replaces the generic card TRL's save_model writes
    if finished:
        runs.mark_finished(run.work_dir, run.stage, global_step=trainer.state.global_step)
        runs.commit(run.work_dir, run.output_dir)
        after_interrupt(None)  # finished: nothing to run again
        hub.maybe_push(push_request, run.output_dir, run.stage)


def resumed_step(run: StageRun) -> int:
    """The step this session started from: 0, or the checkpoint's a --resume continues."""
    return runs.checkpoint_step(run.resume_from) if run.resume_from is not None else 0


def resumed_figures(log_history: list[dict], resumed: int, metrics: dict, global_step: int) -> dict:
    """The Trainer's figures of a resumed stage cover only the steps since the resume: its train_loss was the mean
    of the last 13 of 40 steps (4.65, where the same run uninterrupted gave 5.65). train_loss is made the mean over
    every step whose loss is known: each loss logged before the resume weighs as many steps as it covers, the
    resumed session's train_loss its own steps (the steps between the last log and the checkpoint are in no figure:
    `train_loss_steps` says how many are). The resumed session's figure is kept beside it, and the step it resumed
    at is recorded (the card then says the time is since then)."""
    figures: dict = {"resumed_from_step": resumed}
    since = metrics.get("train_loss")
    if not isinstance(since, (int, float)) or not math.isfinite(since):
        return figures
    total, steps, last = since * (global_step - resumed), global_step - resumed, 0
    for entry in log_history:  # before the resume: each logged loss is the mean since the log before it
        loss, step = entry.get("loss"), entry.get("step")
        if isinstance(loss, (int, float)) and math.isfinite(loss) and isinstance(step, int) and last < step <= resumed:
            total, steps, last = total + loss * (step - last), steps + step - last, step
    figures.update(train_loss_since_resume=since, train_loss=total / max(steps, 1), train_loss_steps=steps)
    return figures


def train_metrics(result, seconds: float) -> dict:
    metrics = {k: v for k, v in (result.metrics if result is not None else {}).items() if k != "total_flos"}
    metrics["train_wall_seconds"] = round(seconds, 1)
    return metrics


def say_done(trainer, run, stage: str, steps: int, seconds: float, summary: str, unit: str = "steps") -> None:
    """A finished stage's last word: its summary in train.log, and on stdout (main process) with where it went."""
    logger.info(f"after {stage}: {summary}")
    if trainer.is_world_process_zero():
        print(f"{stage} done: {steps} {unit} in {seconds:.0f}s, {summary} -> {run.output_dir}")
