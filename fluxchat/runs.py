"""The run-directory layout, and the only module that knows it.

    runs/<run_name>/
        tokenizer/   tokenizer.json, chat_template.jinja, tokenizer_stats.json
        pretrain/    model.safetensors, config.json, tokenizer, metrics.json, train.log, checkpoint-N/
        sft/ reward/ ppo/   same shape

A stage folder is *finished* when `stage_complete.json` exists; it is written last, atomically, so a
crash at any moment leaves either a finished stage or an unfinished one, never a half-finished one
that looks complete. The next stage refuses an unfinished input and names the command that makes it.

Nothing is written in place: checkpoints are saved under `.staging/checkpoint-N` and renamed into
place when complete; the final model is saved under `.staging/final` and its files renamed into the
stage folder; JSON files go through a temporary file. A crash leaves at most a `.staging` folder,
which the next start of the stage removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from fluxchat.config import fail, resolved_config

STAGES = ("tokenizer", "pretrain", "sft", "reward", "ppo")
FINISHED_MARKER = "stage_complete.json"
STAGING = ".staging"  # inside a stage folder: saves in progress, renamed into place when complete
DEFAULT_RUNS_DIR = "runs"

# The command that produces each stage, for "run this first" errors.
PRODUCER = {
    "tokenizer": "python tokenizer/train.py --config configs/tiny/tokenizer.yaml --run_name {run}",
    "pretrain": "accelerate launch pipeline/pretrain.py --config configs/tiny/pretrain.yaml --run_name {run}",
    "sft": "accelerate launch pipeline/sft.py --config configs/tiny/sft.yaml --run_name {run}",
    "reward": "accelerate launch pipeline/reward.py --config configs/tiny/reward.yaml --run_name {run}",
    "ppo": "accelerate launch pipeline/ppo.py --config configs/tiny/ppo.yaml --run_name {run}",
}


def runs_dir() -> Path:
    return Path(os.environ.get("FLUXCHAT_RUNS_DIR", DEFAULT_RUNS_DIR))


def run_dir(run_name: str) -> Path:
    return runs_dir() / run_name


def stage_dir(run_name: str, stage: str) -> Path:
    assert stage in STAGES, stage
    return run_dir(run_name) / stage


def is_finished(folder: str | Path) -> bool:
    return (Path(folder) / FINISHED_MARKER).is_file()


def looks_like_hub_id(value: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", value)) and not Path(value).exists()


def resolve_input(value: str | None, run_name: str, stage: str) -> str:
    """The folder (or Hub id) a stage reads: `value` if given, else the run's `stage` folder.

    A local folder must hold a finished stage; a missing one names the command that produces it.
    """
    if value and looks_like_hub_id(value):
        return value
    folder = Path(value) if value else stage_dir(run_name, stage)
    if not folder.exists():
        hint = PRODUCER[stage].format(run=run_name)
        fail(f"{folder} does not exist: run `{hint}` first, or pass a path with the matching flag")
    if not is_finished(folder) and not (value and _is_plain_model_dir(folder)):  # the run's own stage folder must be finished
        hint = PRODUCER[stage].format(run=run_name)
        fail(f"{folder} holds no finished {stage} output (no {FINISHED_MARKER}): finish it with `{hint}`")
    return str(folder)


def _is_plain_model_dir(folder: Path) -> bool:
    """A folder saved by `save_pretrained` outside our layout (downloaded, hand-made) is usable as is."""
    return (folder / "tokenizer.json").is_file() and not any(folder.glob("checkpoint-*"))


def refuse_finished(folder: Path, overwrite: bool) -> None:
    """Call before any work: a finished stage is only replaced on `--overwrite`."""
    if is_finished(folder) and not overwrite:
        fail(f"{folder} already holds a finished run: pass --overwrite to replace it, or choose another --run_name/--output_dir")


def prepare_output_dir(folder: Path, *, overwrite: bool, resume: bool = False) -> None:
    """Refuse to clobber a finished stage unless asked; `--overwrite` starts the folder afresh."""
    refuse_finished(folder, overwrite)
    if resume:
        if latest_checkpoint(folder) is None:
            fail(f"--resume: no complete checkpoint in {folder} to resume from (drop --resume to start afresh)")
        return
    if not overwrite and latest_checkpoint(folder) is not None:
        fail(f"{folder} holds checkpoints of an unfinished run: pass --resume to continue it, or --overwrite to start afresh")
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder / STAGING, ignore_errors=True)


def _readable_json(path: Path) -> bool:
    """The Trainer writes trainer_state.json last and in place: a crash can leave it cut short."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def latest_checkpoint(folder: Path) -> Path | None:
    """Newest `checkpoint-N` whose save completed (trainer_state.json is written last by the Trainer)."""
    if not Path(folder).is_dir():
        return None
    complete = [
        ckpt
        for ckpt in Path(folder).glob("checkpoint-*")
        if ckpt.name.split("-")[-1].isdigit() and _readable_json(ckpt / "trainer_state.json")
    ]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def discard_incomplete_checkpoints(folder: Path) -> list[Path]:
    """Remove saves a crash interrupted (the staging folder; a `checkpoint-N` without a readable
    trainer_state.json, as runs from before staged saves can hold), so that resuming and the
    Trainer's checkpoint rotation only ever see complete ones."""
    removed = []
    if (Path(folder) / STAGING).exists():
        shutil.rmtree(Path(folder) / STAGING, ignore_errors=True)
        removed.append(Path(folder) / STAGING)
    for ckpt in Path(folder).glob("checkpoint-*"):
        if ckpt.is_dir() and not _readable_json(ckpt / "trainer_state.json"):
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


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
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
    """For a run folder, the most aligned finished stage with a model (ppo > sft > pretrain)."""
    for stage in ("ppo", "sft", "pretrain"):
        candidate = Path(folder) / stage
        if is_finished(candidate):
            return candidate
    return None


def save_resolved_config(path: Path, *objs, config_file: Path | None = None) -> None:
    text = yaml.safe_dump(resolved_config(*objs, config_file=config_file), sort_keys=True, allow_unicode=True)
    atomic_write_text(path, text)
