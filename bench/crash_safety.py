"""Crash safety: kill -9 a training stage at random moments, resume it each time, compare with an uninterrupted run.

    python bench/crash_safety.py                                   # pretrain and SFT, 5 kills each
    python bench/crash_safety.py --stage pretrain --kills 2 --smoke --output /tmp/crash.json
    python bench/crash_safety.py --stage sft --kills 8 --seed 3

For each stage: a reference run trains uninterrupted; the same command is then started, SIGKILLed at
`--kills` seeded moments and restarted each time with `--resume` (or, killed before its first complete
checkpoint, without it, as pipeline/run_all.py does), until it finishes. The moments are:
- `step`: a random optimizer step (the stage logs every step; the kill lands a random fraction of a
  step's duration after that step's line), anywhere between the first save and the end;
- `save`: while a checkpoint is being written (its folder exists under <stage>/.staging, where
  checkpoints are saved before being renamed into place), once an older complete checkpoint exists;
- `final`: after training, once the final weights are in the stage folder but before the stage is
  marked finished (metrics, card, marker still to come). Always the last kill.
After every kill the stage must not be marked finished, no checkpoint-N in the stage folder may be
partial, and the checkpoint the next --resume picks (runs.latest_checkpoint) must load: parseable
trainer_state.json, readable safetensors. At the end the
resumed run must have made exactly the reference's number of optimizer steps and reach its final eval
loss within --tolerance. Both runs use one thread each and run side by side, and start from the same
weights (pretraining: a seeded fresh model saved once and given as --model_name_or_path, because
pretrain.py's own fresh model is not seeded; --fresh_init shows that; SFT: one pretrained base), so a
resume that restores everything ends bit-identical and the default tolerance is tight.
Writes a table and bench/results/crash_safety.json (or --output).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

from fluxchat import pretraining, runs
from fluxchat.cli import run_cli

STEP_LINE = re.compile(rb"step (\d+)/(\d+)")
MODEL_FLAGS = ["--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--block_size", "64"]
POLL_SECONDS = 0.002  # a tiny model's checkpoint save takes tens of milliseconds: poll well inside it


def training_flags(smoke: bool) -> dict:
    if smoke:
        return {"max_steps": 24, "save_steps": 4, "eval_steps": 8}
    return {"max_steps": 60, "save_steps": 6, "eval_steps": 20}


def stage_command(stage: str, work: Path, output_dir: Path, smoke: bool, fresh_init: bool = False) -> list[str]:
    """The stage as a user types it, with a tiny model, frequent saves and one log line per step."""
    steps = training_flags(smoke)
    common_flags = [
        "--output_dir",
        str(output_dir),
        "--max_steps",
        str(steps["max_steps"]),
        "--save_steps",
        str(steps["save_steps"]),
        "--eval_steps",
        str(steps["eval_steps"]),
        "--logging_steps",
        "1",
        "--save_total_limit",
        "3",
        "--seed",
        "0",
        "--per_device_train_batch_size",
        "16",
    ]
    if stage == "pretrain":
        return [
            sys.executable,
            "pipeline/pretrain.py",
            "--preset",
            "tiny",
            "--tokenizer_name_or_path",
            str(work / "tokenizer"),
            "--train_file",
            str(common.corpus(smoke)),
            *MODEL_FLAGS,
            *common_flags,
            "--learning_rate",
            "3e-3",
            "--warmup_steps",
            "5",
            "--sample_max_new_tokens",
            "4",
            *([] if fresh_init else ["--model_name_or_path", str(work / "init")]),
        ]
    return [
        sys.executable,
        "pipeline/sft.py",
        "--preset",
        "tiny",
        "--model_name_or_path",
        str(work / "base"),
        "--corpus_file",
        str(common.corpus(smoke)),
        "--max_train_samples",
        "400" if smoke else "1200",
        "--eval_fraction",
        "0.05",
        "--eval_examples",
        "7",
        "--eval_max_new_tokens",
        "8",
        "--eval_baseline",
        "false",
        *common_flags,
        "--warmup_steps",
        "3",
    ]


def child_env() -> dict:
    # One thread per process: the reference and the killed run share the cores and compute identically.
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1",
    }


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    handle = open(log, "ab")
    return subprocess.Popen(
        cmd, cwd=common.REPO, env=child_env(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def run_to_end(cmd: list[str], log: Path) -> None:
    code = launch(cmd, log).wait()
    if code != 0:
        sys.exit(f"error: `{' '.join(cmd)}` failed with exit code {code}; see {log}")


def save_initial_model(work: Path, seed: int) -> None:
    """The fresh GPT-2 pretrain.py would build, seeded and saved, so both pretraining runs start from the
    same weights: pretrain.py builds its model before the Trainer seeds the RNG, so two fresh runs differ
    from their first step (see --fresh_init) and the comparison would measure that, not the resume."""
    from transformers import AutoTokenizer, set_seed

    from fluxchat.arguments import ModelArguments

    if (work / "init" / "model.safetensors").is_file():
        return
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    set_seed(seed)
    model = pretraining.build_model(
        ModelArguments(**{MODEL_FLAGS[i][2:]: int(MODEL_FLAGS[i + 1]) for i in range(0, len(MODEL_FLAGS), 2)}),
        tokenizer,
    )
    model.save_pretrained(work / "init")
    tokenizer.save_pretrained(work / "init")


def prepare(stage: str, work: Path, smoke: bool) -> None:
    """The inputs a stage reads: our tokenizer, a seeded initial model, and for SFT a briefly pretrained base model."""
    common.train_tokenizer(work / "tokenizer", vocab_size=512, text=common.corpus(smoke))
    save_initial_model(work, seed=0)
    if stage == "sft" and not runs.is_finished(work / "base"):
        base = stage_command("pretrain", work, work / "base", smoke)
        base[base.index("--max_steps") + 1] = "40"
        run_to_end(base, work / "base.log")


def checkpoint_step(folder: Path | None) -> int:
    """runs.checkpoint_step, with 0 for no checkpoint (the steps a resume from nothing starts at)."""
    return (runs.checkpoint_step(folder) or 0) if folder else 0


def saves_in_progress(output_dir: Path) -> set[str]:
    """checkpoint-N folders being written under the staging folder (renamed into place when complete)."""
    return partial_checkpoints(output_dir / runs.STAGING)


def partial_checkpoints(output_dir: Path) -> set[str]:
    """checkpoint-N folders whose save has not completed (no trainer_state.json yet)."""
    try:
        entries = list(os.scandir(output_dir))
    except FileNotFoundError:
        return set()
    return {
        e.name
        for e in entries
        if e.name.startswith("checkpoint-")
        and e.is_dir()
        and not os.path.exists(os.path.join(e.path, "trainer_state.json"))
    }


class StepWatcher:
    """Follows the newest 'step N/M' line the stage writes to train.log (appended to on every resume)."""

    def __init__(self, log: Path):
        self.log, self.offset, self.step = log, log.stat().st_size if log.exists() else 0, None
        self.seen_at: float | None = None
        self.step_seconds = 0.05  # refined from the lines' arrival times

    def poll(self) -> int | None:
        try:
            size = self.log.stat().st_size
        except FileNotFoundError:
            return self.step
        if size > self.offset:
            with open(self.log, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read(size - self.offset)
            cut = chunk.rfind(b"\n") + 1  # a line still being written is read next time
            self.offset += cut
            steps = [int(m.group(1)) for m in STEP_LINE.finditer(chunk[:cut])]
            if steps:
                now = time.perf_counter()
                if self.step is not None and max(steps) > self.step:
                    self.step_seconds = min(0.5, (now - self.seen_at) / (max(steps) - self.step))
                self.step, self.seen_at = max(steps), now
        return self.step


def kill_at(proc: subprocess.Popen, moment: dict, output_dir: Path, rng: random.Random) -> str | None:
    """Wait for `moment` and SIGKILL the run there; returns what was seen, or None if the run finished first."""
    watcher = StepWatcher(output_dir / "train.log")
    stale = saves_in_progress(output_dir)  # left by an earlier kill: not this run's save
    while proc.poll() is None:
        if moment["kind"] == "step":
            step = watcher.poll()
            if step is not None and step >= moment["step"]:
                time.sleep(rng.uniform(0, watcher.step_seconds))  # somewhere inside the next step
                return kill(proc, f"after step {step}")
        elif moment["kind"] == "save":
            # Newer than every complete checkpoint: being written (an older one is being rotated away).
            # Only once a complete checkpoint exists: the resume must then fall back to it.
            newest = checkpoint_step(runs.latest_checkpoint(output_dir))
            saving = {
                name for name in saves_in_progress(output_dir) - stale if checkpoint_step(Path(name)) > newest > 0
            }
            if saving:
                return kill(proc, f"while writing {sorted(saving)[0]}")
        elif moment["kind"] == "final":
            if (output_dir / "model.safetensors").exists() and not runs.is_finished(output_dir):
                return kill(proc, "final weights written, stage not marked finished")
        time.sleep(POLL_SECONDS)
    return None


def kill(proc: subprocess.Popen, seen: str) -> str:
    os.killpg(proc.pid, signal.SIGKILL)  # the group we started: the stage and anything it spawned
    proc.wait()
    return seen


def latest_checkpoint_loads(output_dir: Path) -> bool:
    """The checkpoint the next --resume picks (runs.latest_checkpoint) must be whole."""
    from safetensors import safe_open

    ckpt = runs.latest_checkpoint(output_dir)
    if ckpt is None:
        return True
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
        with safe_open(str(ckpt / "model.safetensors"), "pt") as weights:
            list(weights.keys())
    except Exception as err:  # noqa: BLE001 - any failure to load is the finding
        print(f"  broken checkpoint {ckpt}: {type(err).__name__}: {err}", file=sys.stderr)
        return False
    return True


def plan(kills: int, rng: random.Random) -> list[str]:
    """Moment kinds: at least one save, the final one last (from 3 kills on), the rest at random steps."""
    kinds = ["save"] + ["step"] * max(0, kills - 2) + (["final"] if kills >= 3 else [])
    if kills == 2:
        kinds = ["step", "save"]
    middle = kinds[:-1] if kinds[-1] == "final" else kinds
    rng.shuffle(middle)
    return middle + (["final"] if kinds[-1] == "final" else [])


def final_numbers(output_dir: Path) -> tuple[int, float | None]:
    """(optimizer steps, eval loss at the last step) from the finished stage's own records."""
    step = json.loads((output_dir / runs.FINISHED_MARKER).read_text())["global_step"]
    history = json.loads((output_dir / "log_history.json").read_text())
    losses = [e["eval_loss"] for e in history if "eval_loss" in e and e.get("step") == step]
    return step, (losses[-1] if losses else None)


def crash_and_resume(
    stage: str, work: Path, kills: int, seed: int, smoke: bool, tolerance: float, fresh_init: bool = False
) -> dict:
    prepare(stage, work, smoke)
    ref_dir, crash_dir = work / f"{stage}_reference", work / f"{stage}_killed"
    max_steps, save_steps = training_flags(smoke)["max_steps"], training_flags(smoke)["save_steps"]
    reference = launch(stage_command(stage, work, ref_dir, smoke, fresh_init), work / f"{stage}_reference.log")

    rng = random.Random(f"{seed}:{stage}")
    base_cmd = stage_command(stage, work, crash_dir, smoke, fresh_init)
    events, launches, fresh_restarts, broken_checkpoints = [], 0, 0, 0
    finished_early = []
    for kind in plan(kills, rng):
        resume_from = checkpoint_step(runs.latest_checkpoint(crash_dir))
        cmd = base_cmd + (["--resume"] if resume_from else [])
        if launches and not resume_from:
            fresh_restarts += 1
        # Past the first save, so that every restart is a real --resume from a checkpoint.
        first = max(resume_from, save_steps) + 1
        moment = {"kind": kind, "step": rng.randint(first, max_steps - 1) if first < max_steps else max_steps}
        proc = launch(cmd, work / f"{stage}_killed.log")
        launches += 1
        seen = kill_at(proc, moment, crash_dir, rng)
        if seen is None:  # the run ended before the moment came (or failed)
            finished_early.append({"kind": kind, "exit_code": proc.returncode})
            break
        marked = runs.is_finished(crash_dir)
        whole = latest_checkpoint_loads(crash_dir)
        broken_checkpoints += not whole
        events.append(
            {
                "kind": kind,
                "resumed_from_step": resume_from,
                "killed": seen,
                "marked_finished_after_kill": marked,
                "latest_checkpoint_loads": whole,
                "partial_checkpoints_left": sorted(partial_checkpoints(crash_dir)),
            }
        )
        print(
            f"  {stage}: kill {len(events)} ({kind}) {seen}; resumed from step {resume_from}; finished marker: {marked}",
            flush=True,
        )

    if not runs.is_finished(crash_dir):
        resume_from = checkpoint_step(runs.latest_checkpoint(crash_dir))
        run_to_end(base_cmd + (["--resume"] if resume_from else []), work / f"{stage}_killed.log")
        launches += 1
    if reference.wait() != 0:
        sys.exit(f"error: the reference {stage} run failed; see {work / f'{stage}_reference.log'}")

    ref_steps, ref_loss = final_numbers(ref_dir)
    steps, loss = final_numbers(crash_dir)
    diff = None if ref_loss is None or loss is None else abs(loss - ref_loss)
    checks = {
        "same_steps": steps == ref_steps,
        "eval_loss_within_tolerance": diff is not None and diff <= tolerance,
        "never_marked_finished_after_a_kill": not any(e["marked_finished_after_kill"] for e in events),
        "resumed_checkpoints_load": broken_checkpoints == 0,
        "no_partial_checkpoint_in_place": not any(e["partial_checkpoints_left"] for e in events),
        "all_kills_delivered": len(events) == kills,
        "killed_during_a_save": any(e["kind"] == "save" for e in events),
    }
    return {
        "stage": stage,
        "kills": len(events),
        "resumes": launches - 1,
        "fresh_restarts": fresh_restarts,
        "ref_steps": ref_steps,
        "resumed_steps": steps,
        "ref_eval_loss": ref_loss,
        "resumed_eval_loss": loss,
        "diff": diff,
        "tolerance": tolerance,
        "checks": checks,
        "passed": all(checks.values()),
        "events": events,
        "finished_before_moment": finished_early,
        "start": "shared pretrained base"
        if stage == "sft"
        else ("fresh init in each run" if fresh_init else "shared seeded init"),
    }


def main() -> None:
    p = common.parser("crash_safety", __doc__)
    p.add_argument(
        "--stage", choices=["pretrain", "sft", "both"], default="both", help="Which training stage to kill."
    )
    p.add_argument(
        "--kills", type=int, default=5, help="SIGKILLs per stage (at least 2: one random step, one checkpoint save)."
    )
    p.add_argument("--seed", type=int, default=0, help="Seeds the kill moments.")
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="Largest accepted |final eval loss - reference| (with --fresh_init use ~0.3).",
    )
    p.add_argument(
        "--fresh_init",
        action="store_true",
        help="Let each pretraining run build its own fresh model (today: differently initialised, see save_initial_model).",
    )
    p.add_argument(
        "--workdir", type=Path, default=None, help="Keep the runs here (default: a temporary folder, removed)."
    )
    args = p.parse_args()
    if args.kills < 2:
        p.error("--kills must be at least 2")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="fluxchat-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for stage in ["pretrain", "sft"] if args.stage == "both" else [args.stage]:
            print(
                f"{stage}: reference run and a run killed {args.kills} times, side by side (logs in {work})",
                flush=True,
            )
            rows.append(
                crash_and_resume(stage, work, args.kills, args.seed, args.smoke, args.tolerance, args.fresh_init)
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    columns = [
        "stage",
        "kills",
        "resumes",
        "ref_steps",
        "resumed_steps",
        "ref_eval_loss",
        "resumed_eval_loss",
        "diff",
        "passed",
    ]
    shown = [
        {
            **r,
            **{k: "-" if r[k] is None else f"{r[k]:.4f}" for k in ("ref_eval_loss", "resumed_eval_loss")},
            "diff": "-" if r["diff"] is None else f"{r['diff']:.2e}",
        }
        for r in rows
    ]
    common.print_table("kill -9 and resume vs an uninterrupted run", shown, columns)
    for row in rows:
        failed = [name for name, ok in row["checks"].items() if not ok]
        print(f"{row['stage']}: " + ("all checks passed" if not failed else f"FAILED: {', '.join(failed)}"))
    common.write_results(args.output, "crash_safety", rows, args.smoke, kills_requested=args.kills, seed=args.seed)
    sys.exit(0 if all(r["passed"] for r in rows) else 1)


if __name__ == "__main__":
    run_cli(main)  # a usage error is one line, as in every command
