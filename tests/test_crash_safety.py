"""kill -9 during pretraining (once at a random step, once in the middle of a checkpoint save), resume,
and end where an uninterrupted run ends: bench/crash_safety.py run for real, its JSON checked."""

from __future__ import annotations

import json

from conftest import PYTHON, run_script


def test_pretraining_survives_kill_9_at_a_step_and_during_a_save(tmp_path):
    output = tmp_path / "crash.json"
    result = run_script(PYTHON, "bench/crash_safety.py", "--stage", "pretrain", "--kills", "2", "--smoke", "--output", output,
                        "--workdir", tmp_path / "work", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (row,) = json.loads(output.read_text())["results"]
    assert row["stage"] == "pretrain" and row["kills"] == 2 and row["resumes"] >= 2
    assert sorted(event["kind"] for event in row["events"]) == ["save", "step"]
    save = next(event for event in row["events"] if event["kind"] == "save")
    assert save["killed"].startswith("while writing checkpoint-")
    assert all(event["resumed_from_step"] > 0 for event in row["events"][1:])  # real resumes, not fresh starts
    # The stage never looked finished after a kill, and --resume always had a whole checkpoint to load.
    assert not any(event["marked_finished_after_kill"] for event in row["events"])
    assert all(event["latest_checkpoint_loads"] for event in row["events"])
    assert row["resumed_steps"] == row["ref_steps"] == 24
    assert row["diff"] is not None and row["diff"] <= row["tolerance"]
    assert row["passed"] and all(row["checks"].values())
    # The killed run's folder ends finished, with nothing half-written left to be mistaken for a checkpoint.
    killed = tmp_path / "work" / "pretrain_killed"
    assert (killed / "stage_complete.json").is_file() and (killed / "model.safetensors").is_file()
    assert all((ckpt / "trainer_state.json").is_file() for ckpt in killed.glob("checkpoint-*"))
