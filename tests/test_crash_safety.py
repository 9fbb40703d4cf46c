"""kill -9 during pretraining (once at a random step, once in the middle of a checkpoint save), resume,
and end where an uninterrupted run ends: bench/crash_safety.py run for real, its JSON checked."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import yaml
from conftest import PYTHON, REPO, run_main, run_script

from fluxchat import runs

sys.path.insert(0, str(REPO / "bench"))


@pytest.fixture(scope="module")
def crash_bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    output, work = root / "crash.json", root / "work"
    result = run_script(
        PYTHON,
        "bench/crash_safety.py",
        "--stage",
        "pretrain",
        "--kills",
        "2",
        "--smoke",
        "--output",
        output,
        "--workdir",
        work,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (row,) = json.loads(output.read_text())["results"]
    return row, work


def test_pretraining_survives_kill_9_at_a_step_and_during_a_save(crash_bench):
    row, work = crash_bench
    assert row["stage"] == "pretrain" and row["kills"] == 2 and row["resumes"] >= 2
    assert sorted(event["kind"] for event in row["events"]) == ["save", "step"]
    save = next(event for event in row["events"] if event["kind"] == "save")
    assert save["killed"].startswith("while writing checkpoint-")
    # Checkpoints are written under .staging and renamed: a kill mid-save never leaves a partial one in place.
    assert not any(event["partial_checkpoints_left"] for event in row["events"])
    assert all(event["resumed_from_step"] > 0 for event in row["events"][1:])  # real resumes, not fresh starts
    # The stage never looked finished after a kill, and --resume always had a whole checkpoint to load.
    assert not any(event["marked_finished_after_kill"] for event in row["events"])
    assert all(event["latest_checkpoint_loads"] for event in row["events"])
    # Same start, same steps: a resume that restores model, optimizer, scheduler, RNG and data position ends identical.
    assert row["resumed_steps"] == row["ref_steps"] == 24
    assert row["diff"] is not None and row["diff"] <= row["tolerance"] <= 1e-3
    assert row["passed"] and all(row["checks"].values())
    # The killed run's folder ends finished, with nothing half-written left to be mistaken for a checkpoint.
    killed = work / "pretrain_killed"
    assert (killed / "stage_complete.json").is_file() and (killed / "model.safetensors").is_file()
    assert all((ckpt / "trainer_state.json").is_file() for ckpt in killed.glob("checkpoint-*"))
    assert not (killed / ".staging").exists()


def test_resuming_a_run_killed_after_its_last_checkpoint_adds_no_step(crash_bench, tmp_path):
    """What a kill between the final checkpoint and the finished marker leaves: checkpoint-24 complete, stage unfinished."""
    import crash_safety

    _, work = crash_bench
    stage = tmp_path / "pretrain"
    shutil.copytree(work / "pretrain_killed", stage, ignore=shutil.ignore_patterns("stage_complete.json"))
    result = run_script(*crash_safety.stage_command("pretrain", work, stage, smoke=True), "--resume", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((stage / "stage_complete.json").read_text())["global_step"] == 24
    assert max(int(ckpt.name.split("-")[1]) for ckpt in stage.glob("checkpoint-*")) == 24
    assert "note: resuming" not in result.stderr  # the same settings: nothing to say


def test_a_resume_with_other_settings_says_which(crash_bench, tmp_path, capfd):
    """Allowed, as the Trainer allows it (a longer run is the usual reason), but said once: config.yaml will
    record only the new settings, and the first steps ran with the old ones."""
    import crash_safety

    from pipeline import pretrain

    _, work = crash_bench
    stage = tmp_path / "pretrain"
    shutil.copytree(work / "pretrain_killed", stage, ignore=shutil.ignore_patterns("stage_complete.json"))
    argv = crash_safety.stage_command("pretrain", work, stage, smoke=True)[2:]
    # A change the checkpoints cannot take (another shape of weights; --use_peft alike) is refused before anything is
    # written: it was a note, then a traceback from load_state_dict, config.yaml already recording the new setting.
    recorded = (stage / runs.CONFIG_FILE).read_bytes()
    width = yaml.safe_load(recorded)["n_embd"]
    code, error = run_main(pretrain.main, [*argv, "--resume", "--n_embd", width * 2])
    assert code == 2 and error == (
        f"--resume with --n_embd {width * 2}: the checkpoints in {stage} were trained with n_embd {width}; "
        "resume with that, or start again with --overwrite"
    )
    assert (stage / runs.CONFIG_FILE).read_bytes() == recorded
    logging_steps = int(yaml.safe_load(recorded)["logging_steps"])
    code, error = run_main(pretrain.main, [*argv, "--resume", "--max_steps", 26, "--logging_steps", logging_steps + 1])
    assert code == 0, error
    err = capfd.readouterr().err
    note = re.search(r"note: resuming with settings that differ from the interrupted run's: (.*) \(config", err)
    assert note and note[0] in (stage / "train.log").read_text()
    assert re.fullmatch(
        rf"logging_steps {logging_steps}(\.0)? -> {logging_steps + 1}(\.0)?, max_steps 24 -> 26", note[1]
    )
    assert "do not match the ones in the `trainer_state.json`" not in err  # the Trainer's multi-line copy of it
    assert json.loads((stage / "stage_complete.json").read_text())["global_step"] == 26
