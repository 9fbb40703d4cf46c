"""--resume on a checkpoint damaged since it was saved (a copy cut short, a file deleted by hand): one error line
naming the checkpoint, the file and the way out, before anything is loaded, and the folder left exactly as it was."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from conftest import SHAKESPEARE, TINY_MODEL_FLAGS, TINY_TRAIN_FLAGS, run_main, train_tiny_tokenizer

from fluxchat import runs


@pytest.fixture(scope="module")
def unfinished_stage(tmp_path_factory) -> tuple[Path, Path]:
    """(a tokenizer, an unfinished pretrain folder holding checkpoint-1 and checkpoint-2), built once."""
    from pipeline import pretrain

    root = tmp_path_factory.mktemp("damaged")
    old = os.environ.get("FLUXCHAT_RUNS_DIR")
    os.environ["FLUXCHAT_RUNS_DIR"] = str(root / "runs")
    try:
        train_tiny_tokenizer("damaged")
        argv = ["--preset", "tiny", "--train_file", SHAKESPEARE, "--run_name", "damaged", "--max_steps", 2]
        argv += [*TINY_MODEL_FLAGS, *TINY_TRAIN_FLAGS, "--save_steps", 1, "--eval_strategy", "no"]
        code, error = run_main(pretrain.main, argv)
        assert code == 0, error
    finally:
        if old is None:
            os.environ.pop("FLUXCHAT_RUNS_DIR")
        else:
            os.environ["FLUXCHAT_RUNS_DIR"] = old
    finished, unfinished = root / "runs" / "damaged" / "pretrain", root / "unfinished"
    unfinished.mkdir()
    for name in ("checkpoint-1", "checkpoint-2"):
        shutil.copytree(finished / name, unfinished / name)
    for name in (runs.STARTED_MARKER, runs.CONFIG_FILE):
        shutil.copy2(finished / name, unfinished / name)
    return root / "runs" / "damaged" / "tokenizer", unfinished


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:500])


DAMAGE = {
    "truncated model.safetensors": (
        lambda ckpt: truncate(ckpt / "model.safetensors"),
        "model.safetensors cannot be read",
    ),
    "truncated optimizer.pt": (lambda ckpt: truncate(ckpt / "optimizer.pt"), "optimizer.pt cannot be read"),
    "missing model.safetensors": (lambda ckpt: (ckpt / "model.safetensors").unlink(), "model.safetensors is missing"),
    "bad global_step": (
        lambda ckpt: (ckpt / runs.TRAINER_STATE_FILE).write_text('{"global_step": "x"}'),
        "trainer_state.json has global_step 'x', not a step number",
    ),
}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` (hidden ones too) and the folders beside it, with file checksums."""
    listing = {f"../{p.name}": "" for p in folder.parent.iterdir()}
    for path in sorted(folder.rglob("*")):
        listing[str(path.relative_to(folder))] = (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        )
    return listing


def resume(tokenizer: Path, stage: Path) -> tuple[int, str]:
    from pipeline import pretrain

    argv = ["--preset", "tiny", "--train_file", SHAKESPEARE, "--tokenizer_name_or_path", tokenizer]
    argv += ["--output_dir", stage, *TINY_MODEL_FLAGS, *TINY_TRAIN_FLAGS, "--max_steps", 3, "--eval_strategy", "no"]
    return run_main(pretrain.main, [*argv, "--resume"])


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_resume_from_a_damaged_checkpoint_names_it_and_changes_nothing(unfinished_stage, tmp_path, kind):
    tokenizer, template = unfinished_stage
    stage = tmp_path / "pretrain"
    shutil.copytree(template, stage)
    damage, problem = DAMAGE[kind]
    damage(stage / "checkpoint-2")
    before = snapshot(stage)
    code, error = resume(tokenizer, stage)
    assert code == 2
    assert error == (
        f"--resume: {stage / 'checkpoint-2'} is damaged ({problem}): "
        "delete that folder to resume from checkpoint-1, or pass --overwrite to start afresh"
    )
    assert snapshot(stage) == before


def test_a_damaged_only_checkpoint_leaves_overwrite_as_the_way_out(unfinished_stage, tmp_path):
    tokenizer, template = unfinished_stage
    stage = tmp_path / "pretrain"
    shutil.copytree(template, stage, ignore=shutil.ignore_patterns("checkpoint-1"))
    truncate(stage / "checkpoint-2" / "rng_state.pth")
    before = snapshot(stage)
    code, error = resume(tokenizer, stage)
    assert (code, error) == (
        2,
        f"--resume: {stage / 'checkpoint-2'} is damaged (rng_state.pth cannot be read): pass --overwrite to start afresh",
    )
    assert snapshot(stage) == before
