"""The run-directory layout, and the only module that knows it.

    runs/<run_name>/
        tokenizer/   tokenizer.json, chat_template.jinja, tokenizer_stats.json
        pretrain/    model.safetensors, config.json, tokenizer, metrics.json, train.log, checkpoint-N/
        sft/ reward/ ppo/ grpo/ dpo/   same shape, plus eval.json
        data/, summary.json, evaluation.json, report.md, report.json   (run_all's)

A stage folder is *finished* when `stage_complete.json` exists; it is written last, atomically, so a
crash at any moment leaves either a finished stage or an unfinished one, never a half-finished one
that looks complete. The next stage refuses an unfinished input and names the command that makes it.

Nothing is written in place: checkpoints are saved under `.staging/checkpoint-N` and renamed into
place when complete; the final model is saved under `.staging/final` and its files renamed into the
stage folder; JSON files go through a temporary file. A crash leaves at most a `.staging` folder,
which the next start of the stage removes. One command at a time writes a stage folder: from `begin` to `commit`
its main process holds an exclusive lock on it (`lock_stage`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

from fluxchat.cli import UsageError, fail, main_process
from fluxchat.config import command_path, redact_secrets, resolved_config

STAGES = ("tokenizer", "pretrain", "sft", "reward", "ppo", "grpo", "dpo")
# The stages with --resume: continue from their newest whole checkpoint (TRL's PPOTrainer saves the policy only;
# the reward stage is a minute, and its recipes save no checkpoint).
RESUMABLE = ("pretrain", "sft", "grpo", "dpo")
CHAT_STAGES = (
    "ppo",
    "grpo",
    "dpo",
    "sft",
    "pretrain",
)  # stages whose model generates text: a run folder serves the first finished
STAGING = ".staging"  # inside a stage folder: saves in progress, renamed into place when complete
OVERWRITE_SUFFIX = ".overwrite"  # <parent>/.<stage>.overwrite: a replacement built beside the stage it replaces
REPLACED_SUFFIX = ".replaced"  # <parent>/.<stage>.replaced: the replaced stage, for the moment of the swap
DEFAULT_RUNS_DIR = "runs"
DEFAULT_RUN_NAME = "default"

# Every file a stage writes, named once. Checkpoints are the Trainer's own layout (checkpoint-N/).
FINISHED_MARKER = "stage_complete.json"  # written last: the stage is finished
STARTED_MARKER = ".fluxchat_stage.json"  # written first: the folder belongs to a stage (hidden: never uploaded)
CONFIG_FILE = "config.yaml"  # the resolved configuration, secrets redacted
LOG_FILE = "train.log"  # our dense log lines
METRICS_FILE = "metrics.json"  # headline numbers of the stage (and its evaluation under "eval")
EVAL_FILE = "eval.json"  # the end-of-stage evaluation report
LOG_HISTORY_FILE = "log_history.json"  # the Trainer's log history
CARD_FILE = "README.md"  # the model card (also the Hub's)
PLOT_FILE = "loss_curve.png"  # the card's training curves
TOKENIZER_STATS_FILE = "tokenizer_stats.json"  # the tokenizer stage's compression report
TRAINER_STATE_FILE = "trainer_state.json"  # the Trainer writes it last into a checkpoint
EVALUATION_FILE = "evaluation.json"  # pipeline/evaluate.py's report (in the model folder, or the run folder)
SUMMARY_FILE = "summary.json"  # pipeline/run_all.py's per-stage summary, in the run folder
DATA_DIR = "data"  # in the run folder: corpora pipeline/run_all.py writes for its stages
FACTS_FILE = "facts.txt"  # in DATA_DIR, pretraining's: the facts text, steps table included
FACTS_MIX_FILE = "facts_mix.txt"  # in DATA_DIR, what SFT and DPO mix in: the facts prose and dialogues, no steps table

# Each stage's script, in chain order (run_all.py runs them; "run this first" errors name them).
SCRIPTS = {
    "tokenizer": "tokenizer/train.py",
    "pretrain": "pipeline/pretrain.py",
    "sft": "pipeline/sft.py",
    "reward": "pipeline/reward.py",
    "ppo": "pipeline/ppo.py",
    "grpo": "pipeline/grpo.py",
    "dpo": "pipeline/dpo.py",
}


def producer(stage: str, run: str) -> str:
    """The command that makes `stage` of run `run`, for a hint that runs from the user's folder: the preset (a
    `--config configs/...` path resolves only in the project folder), the script by `command_path`."""
    launcher = "python" if stage == "tokenizer" else "accelerate launch"
    return f"{launcher} {command_path(SCRIPTS[stage])} --preset {run_preset(run)} --run_name {run}"


def run_preset(run: str) -> str:
    """The preset the run's stages were made with, as their config.yaml names its recipe file (tiny if none does):
    a `small` run's "run this first" hint named the tiny recipe."""
    for stage in STAGES:
        recipe = Path(read_config(stage_dir(run, stage)).get("config_file") or "")
        if recipe.parent.parent.name == "configs" and recipe.stem == stage:
            return recipe.parent.name
    return "tiny"


def holds_model(folder: str | Path) -> bool:
    """A saved model or a LoRA adapter is in the folder (a stage's output, not a run folder of stages)."""
    return any((Path(folder) / name).is_file() for name in ("config.json", "adapter_config.json"))


def adapter_config(folder: str | Path) -> dict | None:
    """The adapter_config.json of a LoRA adapter folder (`--use_peft --no_merge_adapter`: no config.json of its
    own), None for any other folder; {} where it cannot be read."""
    folder = Path(folder)
    path = folder / "adapter_config.json"
    if (folder / "config.json").is_file() or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def runs_dir() -> Path:
    value = os.environ.get("FLUXCHAT_RUNS_DIR", str(DEFAULT_RUNS_DIR))
    if not value.strip():  # Path("") is the current folder: runs would land beside the user's files
        fail("FLUXCHAT_RUNS_DIR is set but empty: unset it to write under runs/, or name a folder")
    return Path(value)


# One path component the file system takes whole, with room for the siblings a stage writes beside its folder
# (".<name>.overwrite", ".<name>.replaced"): 255 bytes on ext4, xfs, btrfs and APFS.
MAX_NAME_BYTES = 240


def check_path_text(path: str | Path, what: str) -> None:
    """A path every file the stage writes can record: config.yaml, the model card and the Trainer's JSON hold it as
    UTF-8 text, and a name undecodable on the command line (bytes from another locale) failed only when the first
    of them was saved, after training; a component longer than the file system takes failed in a traceback."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        fail(f"{what} {text.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8: name the folder in UTF-8")
    if any(ch in text for ch in "\n\r\t"):
        fail(f"{what} {text!r} holds a line break or tab: choose a name without one")
    long = next((part for part in Path(text).parts if len(part.encode("utf-8")) > MAX_NAME_BYTES), None)
    if long is not None:
        fail(f"{what}: the name {long[:40]}... is {len(long.encode('utf-8'))} bytes, longer than {MAX_NAME_BYTES}")


def check_run_name(run_name: str, flag: str = "--run_name") -> str:
    """A run name is one plain folder name under runs/: never a path that leads elsewhere."""
    if not run_name or run_name in (".", "..") or "/" in run_name or "\\" in run_name or Path(run_name).is_absolute():
        fail(f"{flag} {run_name!r} must be one plain folder name under {runs_dir()}/ (no '/', '..' or absolute path)")
    check_path_text(run_name, flag)
    return run_name


def run_dir(run_name: str) -> Path:
    return runs_dir() / check_run_name(run_name)


def stage_dir(run_name: str, stage: str) -> Path:
    assert stage in STAGES, stage
    return run_dir(run_name) / stage


def is_finished(folder: str | Path) -> bool:
    return (Path(folder) / FINISHED_MARKER).is_file()


def marked_stage(folder: str | Path) -> str | None:
    """The stage a folder's finished marker (else its started marker) names; None where neither says."""
    for name in (FINISHED_MARKER, STARTED_MARKER):
        try:
            marker = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(marker, dict) and isinstance(marker.get("stage"), str):
            return marker["stage"]
    return None


def looks_like_hub_id(value: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", value)) and not Path(value).exists()


def resolve_input(value: str | None, run_name: str, stage: str) -> str:
    """The folder (or Hub id) a stage reads: `value` if given, else the run's `stage` folder.

    A local folder must hold a finished stage; a missing one names the command that produces it.
    """
    if value and looks_like_hub_id(value):
        return value
    folder = Path(value) if value else stage_dir(run_name, stage)
    if not folder.exists() and value:  # the producer's hint would make runs/<run>/<stage>, not this folder
        fail(f"{folder} does not exist: give the folder of a finished {stage} stage (check the path)")
    if not folder.exists():
        hint = producer(stage, run_name)
        fail(f"{folder} does not exist: run `{hint}` first, or pass a path with the matching flag")
    if value and not folder.is_dir():
        fail(
            f"{folder} is a file: give the folder of a finished {stage} stage (or a model saved with save_pretrained)"
        )
    if value and any(is_finished(folder / s) for s in STAGES):  # a run folder; the hint below names this command's run
        fail(
            f"{folder} is a run folder: give its {stage} stage, "
            + (
                str(folder / stage)
                if is_finished(folder / stage)
                else f"which it does not hold finished ({folder / stage})"
            )
        )
    if value and stage != "tokenizer" and is_finished(folder) and not holds_model(folder):
        # A tokenizer's folder where a model is read: "cannot read the model config ... re-run the stage" misled
        fail(
            f"{folder} holds a {marked_stage(folder) or 'finished'} stage, not a model: give the folder of a finished {stage} stage"
        )
    if value and not is_finished(folder) and not _is_plain_model_dir(folder):
        fail(
            f"{folder} holds no finished {stage} output (no {FINISHED_MARKER}) and no saved model (no tokenizer.json): "
            "give a finished stage's folder"
        )
    if not value and not is_finished(folder):  # the run's own stage folder must be finished
        hint = producer(stage, run_name)
        fail(f"{folder} holds no finished {stage} output (no {FINISHED_MARKER}): finish it with `{hint}`")
    return str(folder)


def _is_plain_model_dir(folder: Path) -> bool:
    """A folder saved by `save_pretrained` outside our layout (downloaded, hand-made) is usable as is."""
    return (folder / "tokenizer.json").is_file() and not any(folder.glob("checkpoint-*"))


def _sibling(folder: Path, suffix: str) -> Path:
    return Path(folder).parent / f".{Path(folder).name}{suffix}"


def is_stage_folder(folder: str | Path) -> bool:
    """Whether a stage may write into (and `--overwrite` may replace) `folder`: absent, empty, or written by
    one of our stages (its started or finished marker, our staging folder, a Trainer checkpoint)."""
    folder = Path(folder)
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    if not any(folder.iterdir()):
        return True
    return (
        (folder / FINISHED_MARKER).is_file()
        or (folder / STARTED_MARKER).is_file()
        or (folder / STAGING).is_dir()
        or any((ckpt / TRAINER_STATE_FILE).is_file() for ckpt in folder.glob("checkpoint-[0-9]*"))
    )


def check_writable(folder: Path, what: str) -> None:
    """Refuse now, not once the inputs have loaded (or the work is done), a folder we could not create or write:
    its nearest existing ancestor must be writable. `what` starts the error line (the flag and its value)."""
    existing = next(p for p in [Path(folder), *Path(folder).absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"{what}: {existing} is not writable")


def check_evaluation_file(path: Path) -> None:
    """evaluate.py's --output_file, checked before the work (a folder, or a path under a file, failed only once the
    work was done): a regular file or none, writable, and replacing only an earlier evaluation report (a JSON object
    with "model" and "tasks"), never a file of the user's (a --pairs_file, notes, a config)."""
    flag = "--output_file"
    if path.is_dir():
        fail(f"{flag} {path} is a folder: name a file, e.g. {path / 'evaluation.json'}")
    if path.exists() and not path.is_file():  # the report is renamed into place: /dev/null would go
        fail(f"{flag} {path} is not a regular file (a device, FIFO or socket): name a file")
    if blocking := next((p for p in path.parents if p.exists() and not p.is_dir()), None):
        fail(f"{flag} {path}: {blocking} is a file, so nothing can be written under it")
    check_writable(path.parent, f"{flag} {path}")
    if not path.is_file():
        return
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        earlier = None
    if not (isinstance(earlier, dict) and {"model", "tasks"} <= earlier.keys()):
        fail(
            f"{flag} {path} exists and is not an evaluation report: name a new file (only an earlier report is replaced)"
        )


def folder_identity(folder: str | Path) -> tuple[int, int] | None:
    """The folder as the file system knows it: a stage replaced by --overwrite is another folder renamed over it."""
    try:
        stat = os.stat(folder)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


_HELD_LOCKS: dict[tuple[int, int], int] = {}  # (device, inode) of a stage folder -> the open fd that locks it


def lock_stage(folder: str | Path, hold: bool = True) -> None:
    """Two commands writing one stage folder at once (the same command started twice) would interleave their
    checkpoints and markers. From `begin` on, the main process holds an exclusive lock on the folder itself until
    the stage is committed or the process ends (the kernel drops it then, even after kill -9), so a second command
    is refused before it touches anything. `hold=False` only checks that nobody holds it (`check_output_dir`: a
    command refused for its inputs keeps nothing). No lock file: nothing is left behind."""
    folder = Path(folder)
    if not main_process() or not folder.is_dir():
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # unreadable: the checks that follow name it
    key = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
    if key in _HELD_LOCKS:  # this process holds it already (a test calling main() twice)
        os.close(fd)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        fail(f"{folder} is being written by another command right now: wait for it to end, or stop it first")
    except OSError:  # a file system without locks (some network mounts): the stage runs unguarded, as before
        os.close(fd)
        return
    if hold:
        _HELD_LOCKS[key] = fd
    else:
        os.close(fd)


def release_stage_locks() -> None:
    """The stage is committed: another command may take the folder (to --overwrite it, say) from now on."""
    while _HELD_LOCKS:
        os.close(_HELD_LOCKS.popitem()[1])  # closing the last fd of a lock releases it


def check_output_dir(
    folder: str | Path, *, overwrite: bool, resume: bool = False, resumable: bool = True, stage: str | None = None
) -> Path | None:
    """Every check on a stage's output folder, run before any input is read and anything written.
    Returns the checkpoint to resume from (`resume`), else None. `resumable`: the stage has a --resume. `stage`: the
    stage about to write there, refused where the folder holds another (`sft --output_dir runs/x/tokenizer
    --overwrite` replaced the run's tokenizer with an SFT model without a word)."""
    folder = Path(folder)
    check_path_text(folder, "--output_dir")
    lock_stage(folder, hold=False)  # first: what follows may repair or remove what another command is writing
    recover_interrupted_swap(folder)
    blocking = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        fail(f"--output_dir {folder}: {blocking} is a file, not a folder")
    check_writable(folder, f"--output_dir {folder}")
    if resume and overwrite:
        fail(f"--resume continues the run in {folder} and --overwrite replaces it: give one of them")
    other = marked_stage(folder) if stage is not None else None
    if other is not None and other != stage:
        fail(
            f"{folder} holds a {other} stage, not {stage}: choose another --output_dir (--overwrite replaces a "
            "stage only with the same stage)"
        )
    if not is_stage_folder(folder):
        fail(
            f"{folder} is not empty and holds no fluxchat stage (no {FINISHED_MARKER}, no checkpoint-N): refusing to "
            f"{'replace' if overwrite else 'write into'} it; choose another --output_dir or --run_name"
        )
    if is_finished(folder) and not overwrite:
        fail(
            f"{folder} already holds a finished run: pass --overwrite to replace it, or choose another --run_name/--output_dir"
        )
    if resume:
        checkpoint = latest_checkpoint(folder)
        if checkpoint is None:
            fail(
                f"--resume: no complete checkpoint in {folder} (complete = its {TRAINER_STATE_FILE} is readable); drop --resume to start afresh"
            )
        damage = checkpoint_damage(checkpoint)
        if damage is not None:
            older = next((c for c in _complete_checkpoints(folder)[1:] if checkpoint_damage(c) is None), None)
            way_out = f"delete that folder to resume from {older.name}, or " if older is not None else ""
            fail(f"--resume: {checkpoint} is damaged ({damage}): {way_out}pass --overwrite to start afresh")
        return checkpoint
    if not overwrite and latest_checkpoint(folder) is not None:
        fail(
            f"{folder} holds checkpoints of an unfinished run: pass --resume to continue it, or --overwrite to start afresh"
            if resumable
            else f"{folder} holds checkpoints of an unfinished run, which this stage cannot continue: pass --overwrite to start afresh"
        )
    return None


def work_dir(folder: str | Path, overwrite: bool) -> Path:
    """Where a stage writes until it has finished: its output folder, or, when `--overwrite` replaces a folder
    that holds something, the sibling <parent>/.<name>.overwrite that `commit` swaps in at the very end. So a
    failed, killed or refused overwrite leaves the previous stage exactly as it was."""
    folder = Path(folder)
    if overwrite and folder.is_dir() and any(folder.iterdir()):
        return _sibling(folder, OVERWRITE_SUFFIX)
    return folder


def begin(folder: str | Path, stage: str, *, overwrite: bool, resume: bool = False) -> Path:
    """Create the folder a stage writes into (main process only; call after `check_output_dir`) and return it."""
    folder = Path(folder)
    lock_stage(folder)  # before anything is removed: another command may have started since the check
    if is_finished(folder) and not overwrite:  # a stage that works before this (the tokenizer trains first)
        fail(
            f"{folder} was finished by another command while this one ran: pass --overwrite to replace it, or choose "
            "another --run_name/--output_dir"
        )
    if overwrite and is_finished(folder):
        note_later_stages(folder, stage)
    work = work_dir(folder, overwrite)
    if work != folder:
        _remove(work)  # what an earlier, killed overwrite left
    if resume:
        discard_incomplete_checkpoints(work)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # what os.access cannot foresee: a read-only or virtual file system (/proc), a full disk
        fail(f"--output_dir {folder}: cannot create {work} ({err.strerror or err})")
    lock_stage(folder)  # a folder this command has just made (two starts racing: the second stops here)
    lock_stage(work)  # an --overwrite's replacement: the folder once `commit` swaps it in
    shutil.rmtree(work / STAGING, ignore_errors=True)
    write_json(work / STARTED_MARKER, {"stage": stage})
    return work


# Set by run_all.py for its stages: it says which later stages stay as they are itself, knowing which it redoes.
LATER_STAGES_NOTED = "FLUXCHAT_LATER_STAGES_NOTED"


def note_later_stages(folder: Path, stage: str) -> None:
    """A stage replaced with --overwrite leaves the run's later stages as they were, made from the one replaced (the
    reward model and PPO of the old SFT model, say): said, as run_all.py says it, else nothing did."""
    if stage not in STAGES or folder.name != stage or os.environ.get(LATER_STAGES_NOTED):
        return
    later = [s for s in STAGES[STAGES.index(stage) + 1 :] if is_finished(folder.parent / s)]
    if later:
        print(
            f"note: {stage} is replaced (--overwrite); {', '.join(later)} in {folder.parent} came after it, perhaps "
            f"from it, and stay as they are unless redone too (with --overwrite)",
            file=sys.stderr,
            flush=True,
        )


def _remove(path: Path) -> None:
    """Delete a folder this module set aside, or the link it was: a stage folder may be a symbolic link to another
    run's stage, and rmtree refuses a link (silently, with ignore_errors), which left it in the way of the next swap.
    A link goes, never what it points to."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def commit(work: str | Path, folder: str | Path) -> None:
    """Put a finished replacement in place: the old folder renamed away, the new one renamed in, the old one
    deleted. A crash between the two renames is repaired by the next `check_output_dir`."""
    work, folder = Path(work), Path(folder)
    if work != folder:
        replaced = _sibling(folder, REPLACED_SUFFIX)
        _remove(replaced)
        if folder.exists() or folder.is_symlink():
            os.replace(folder, replaced)
        os.replace(work, folder)
        _remove(replaced)
    release_stage_locks()


def recover_interrupted_swap(folder: str | Path) -> None:
    """Finish or undo a `commit` a crash interrupted between its renames (main process only)."""
    folder = Path(folder)
    replaced, work = _sibling(folder, REPLACED_SUFFIX), _sibling(folder, OVERWRITE_SUFFIX)
    if not main_process() or not replaced.is_dir():
        return
    if not folder.exists():
        os.replace(work if is_finished(work) else replaced, folder)
    _remove(replaced)


def readable_json(path: Path) -> bool:
    """The Trainer writes trainer_state.json last and in place: a crash can leave it cut short."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def _complete_checkpoints(folder: Path) -> list[Path]:
    """Every `checkpoint-N` whose save completed (trainer_state.json is written last by the Trainer), newest first."""
    if not Path(folder).is_dir():
        return []
    complete = [
        ckpt
        for ckpt in Path(folder).glob("checkpoint-*")
        if checkpoint_step(ckpt) is not None and readable_json(ckpt / TRAINER_STATE_FILE)
    ]
    return sorted(complete, key=checkpoint_step, reverse=True)


def checkpoint_step(checkpoint: str | Path) -> int | None:
    """N of a `checkpoint-N` folder (the Trainer's name for it); None for any other name."""
    step = Path(checkpoint).name.rsplit("-", 1)[-1]
    return int(step) if Path(checkpoint).name.startswith("checkpoint-") and step.isdigit() else None


def latest_checkpoint(folder: Path) -> Path | None:
    """Newest `checkpoint-N` whose save completed. It may still be damaged since (a copy cut short, a file
    deleted by hand): `check_output_dir` checks the one --resume picks with `checkpoint_damage`."""
    return next(iter(_complete_checkpoints(folder)), None)


# The Trainer's names for a checkpoint's model weights: whole, sharded (an index naming its shards), a LoRA adapter.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.bin",
)


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What makes `checkpoint` unloadable, in a few words (None if nothing does), found before anything is loaded:
    otherwise --resume ends, after the inputs have loaded, in a traceback from safetensors, torch or the Trainer.
    Cheap, whatever the model's size: headers and zip directories are read, never a tensor. A file cut short
    loses the end a reader needs (the tensors a safetensors header promises, a zip's central directory), so
    truncation is caught; bytes altered in the middle are not."""
    from safetensors import SafetensorError, safe_open  # the weights' own reader: header and sizes, no tensor

    checkpoint = Path(checkpoint)
    try:
        step = json.loads((checkpoint / TRAINER_STATE_FILE).read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError, AttributeError):
        return f"{TRAINER_STATE_FILE} cannot be read"
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"{TRAINER_STATE_FILE} has global_step {step!r}, not a step number"
    # DeepSpeed (global_stepN/) and FSDP (pytorch_model_fsdp*) checkpoints keep their weights in their own layout.
    own_layout = any(checkpoint.glob("global_step*")) or any(checkpoint.glob("pytorch_model_fsdp*"))
    adapters = [d for d in checkpoint.iterdir() if d.is_dir() and (d / "adapter_config.json").is_file()]
    if not own_layout and not adapters and not any((checkpoint / name).is_file() for name in WEIGHT_FILES):
        missing = (
            "adapter_model.safetensors" if (checkpoint / "adapter_config.json").is_file() else "model.safetensors"
        )
        return f"{missing} is missing"
    weights = sorted(checkpoint.glob("*.safetensors")) + [f for d in adapters for f in sorted(d.glob("*.safetensors"))]
    for index in checkpoint.glob("*.index.json"):  # a sharded save: every shard it names must be there
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} cannot be read"
        lost = next((name for name in shards if not (checkpoint / name).is_file()), None)
        if lost is not None:
            return f"{lost}, named in {index.name}, is missing"
    for path in weights:
        try:
            with safe_open(path, framework="pt"):
                pass
        except (OSError, SafetensorError):
            return f"{path.relative_to(checkpoint)} cannot be read"
    # torch.save writes zip archives: optimizer.pt, scheduler.pt, rng_state*.pth (one per process), *.bin weights.
    for path in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth"), *checkpoint.glob("*.bin")]):
        try:
            with zipfile.ZipFile(path):
                pass
        except (OSError, zipfile.BadZipFile):
            return f"{path.name} cannot be read"
    return None


def discard_incomplete_checkpoints(folder: Path) -> list[Path]:
    """Remove saves a crash interrupted (the staging folder; a `checkpoint-N` without a readable
    trainer_state.json, as runs from before staged saves can hold), so that resuming and the
    Trainer's checkpoint rotation only ever see complete ones."""
    removed = []
    if (Path(folder) / STAGING).exists():
        shutil.rmtree(Path(folder) / STAGING, ignore_errors=True)
        removed.append(Path(folder) / STAGING)
    for ckpt in Path(folder).glob("checkpoint-*"):
        if ckpt.is_dir() and not readable_json(ckpt / TRAINER_STATE_FILE):
            shutil.rmtree(ckpt, ignore_errors=True)
            removed.append(ckpt)
    return removed


def staging_dir(folder: Path, name: str) -> Path:
    """Where a save named `name` (checkpoint-N, final) of the stage in `folder` is written before `publish`."""
    return Path(folder) / STAGING / name


def publish(staged: Path, folder: Path) -> None:
    """Move a completed save into place. A checkpoint is one folder rename; the final model's files
    are renamed one by one into the stage folder (which already holds logs and checkpoints), which
    is safe because the stage only counts as finished once its marker is written after them."""
    staged, folder = Path(staged), Path(folder)
    _readable_like_the_rest(staged)
    if staged.name.startswith("checkpoint-"):
        target = folder / staged.name
        if target.exists():  # the same step saved again (a resumed run): the new save wins
            shutil.rmtree(target)
        os.replace(staged, target)
    else:
        for item in staged.iterdir():
            target = folder / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
        staged.rmdir()
    with contextlib.suppress(OSError):
        staged.parent.rmdir()  # the staging folder, once empty


def _readable_like_the_rest(folder: Path) -> None:
    """transformers writes model.safetensors through a temporary file, owner-only (0600) as mkstemp makes it, where
    every other output is readable as the umask allows: on a shared machine or a served folder the weights alone
    were unreadable to others. Files an owner-only umask made stay so."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600:
            os.chmod(path, 0o666 & ~umask)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():  # the rename would put a file where a device was
        raise FileExistsError(errno.EEXIST, "not a regular file (a device, FIFO or socket), not replaced", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; these are ordinary outputs
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def mark_finished(folder: Path, stage: str, **info: Any) -> None:
    write_json(Path(folder) / FINISHED_MARKER, {"stage": stage, **info})


def latest_stage(folder: str | Path) -> Path | None:
    """For a run folder, the most aligned finished stage with a model (ppo > grpo > dpo > sft > pretrain)."""
    for stage in CHAT_STAGES:
        candidate = Path(folder) / stage
        if is_finished(candidate):
            return candidate
    return None


def compared_stage(served: str, stages: list[str]) -> str | None:
    """The stage the app compares a served one with, of `stages` (most aligned first): SFT, which PPO, GRPO and DPO
    start from; else the next one after the served stage; else any other; None when there is no other. The app's
    Compare tab and a pushed Space pick alike."""
    others = [stage for stage in stages if stage != served]
    if not others:
        return None
    later = stages[stages.index(served) + 1 :] if served in stages else []
    return "sft" if "sft" in others else (later or others)[0]


# A failed write as torch.save and safetensors report it, neither an OSError: torch's C++ stream ("basic_ios::clear:
# iostream error", then "unexpected pos N vs M" as the zip writer closes) and safetensors' "I/O error: No space left
# on device (os error 28)". Anything else raised during a save is a bug, kept as the traceback it is.
_FAILED_WRITE = re.compile(r"iostream error|unexpected pos \d+ vs \d+|file write failed|I/O error|os error \d+")
_OS_ERROR = re.compile(r"os error (\d+)")


@contextlib.contextmanager
def save_errors(staged: Path, what: str):
    """A failed write into `staged` (a full disk, a quota, a file size limit) becomes one line naming the device.
    The half-written save is removed (and a replacement built for --overwrite with it); what was saved before stays
    intact."""
    try:
        yield
    except Exception as err:
        staged = Path(staged)
        folder = staged.parent.parent if staged.parent.name == STAGING else staged.parent
        code = err.errno if isinstance(err, OSError) else None
        if code is None and (number := _OS_ERROR.search(str(err))):
            code = int(number[1])
        failed_write = isinstance(err, OSError) or _FAILED_WRITE.search(str(err)) is not None
        # torch says no more than that its stream failed: a device with no room left is the usual reason (looked
        # at before the half-written save gives its room back)
        full = code in (errno.ENOSPC, errno.EDQUOT) or (code is None and failed_write and _nearly_full(folder))
        shutil.rmtree(staged, ignore_errors=True)
        if staged.parent.name == STAGING:
            shutil.rmtree(staged.parent, ignore_errors=True)  # nothing else is saved while this save runs
        kept = "the checkpoints saved before it are intact"
        if folder.name.endswith(OVERWRITE_SUFFIX):  # nothing can resume an overwrite: free its space
            shutil.rmtree(folder, ignore_errors=True)
            kept = "the stage it was to replace is intact"
        if not failed_write:
            raise
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if full:
            problem = "is full"
        elif code == errno.EFBIG or (code is None and limit != resource.RLIM_INFINITY):
            problem = f"refused a file over this process's size limit (`ulimit -f`: {limit:,} bytes)"
        else:
            problem = f"refused the write ({os.strerror(code) if code else str(err).splitlines()[0][:120]})"
        raise UsageError(
            f"saving {what} failed: the device {device_of(folder)} holding {folder} {problem}; "
            f"the half-written save was removed and {kept}"
        ) from None


def _nearly_full(folder: Path) -> bool:
    """Less room left than one more write buffer: a write there fails."""
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def device_of(path: str | Path) -> str:
    """The device (as /proc/self/mounts names it) and mount point holding `path`, for a message about a full disk."""
    mount = Path(path).resolve()
    while not mount.exists() or (not os.path.ismount(mount) and mount != mount.parent):
        mount = mount.parent
    device = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1] == str(mount):
                device = fields[0]  # the last entry for a mount point is the one in effect
    return f"{device} (mounted at {mount})" if device else str(mount)


def save_resolved_config(path: Path, *objs, config_file: Path | None = None) -> None:
    text = yaml.safe_dump(resolved_config(*objs, config_file=config_file), sort_keys=True, allow_unicode=True)
    atomic_write_text(path, text)


def read_config(stage_dir: Path) -> dict[str, Any]:
    """A stage's config.yaml as written by `save_resolved_config` (secrets redacted); {} if missing or unreadable."""
    try:
        config = yaml.safe_load((Path(stage_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return redact_secrets(config) if isinstance(config, dict) else {}
