"""Wall time per stage of an end-to-end run, read from the run folder's stage_complete.json and metrics.

    python bench/pipeline_time.py --run_dir runs/demo      # a finished run: per-stage wall times
    python bench/pipeline_time.py --run                    # launch the tiny end-to-end run first, then report
    python bench/pipeline_time.py --smoke

--run starts pipeline/run_all.py (the orchestrator) with the tiny preset on tinyshakespeare, in a run folder
that must not exist yet (run_all skips finished stages, which would time nothing). --smoke runs only the
tokenizer and a few pretraining steps, as a user would type them. A stage's wall time
is the time between its stage_complete.json and the previous stage's (the first stage counts from the
launch, or for --run_dir from the oldest file in the run folder, an underestimate), so process start-up, data loading and saving are included; the
stage's own training time (metrics.json: train_wall_seconds / train_runtime) is shown next to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

from fluxchat.cli import run_cli

MARKER = "stage_complete.json"
TRAIN_TIME_KEYS = ("train_wall_seconds", "train_runtime", "wall_seconds")


def stage_rows(run_dir: Path, started: float | None = None) -> list[dict]:
    stages = sorted((p.parent for p in run_dir.glob(f"*/{MARKER}")), key=lambda d: (d / MARKER).stat().st_mtime)
    if not stages:
        sys.exit(f"error: no finished stage ({MARKER}) under {run_dir}: pass a run folder, or --run to make one")
    # without the launch time, the first stage can only count from its oldest file (an underestimate)
    previous = started or min(f.stat().st_mtime for f in run_dir.rglob("*") if f.is_file())
    rows = []
    for stage in stages:
        done = (stage / MARKER).stat().st_mtime
        metrics_file = stage / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        train_seconds = next((metrics[k] for k in TRAIN_TIME_KEYS if isinstance(metrics.get(k), (int, float))), None)
        rows.append(
            {
                "stage": stage.name,
                "wall_s": round(done - previous, 1),
                "train_s": None if train_seconds is None else round(train_seconds, 1),
                "steps": metrics.get("global_step"),
            }
        )
        previous = done
    rows.append({"stage": "total", "wall_s": round(sum(r["wall_s"] for r in rows), 1)})
    return rows


def launch(run_name: str, smoke: bool) -> Path:
    runs_root = Path(os.environ.get("FLUXCHAT_RUNS_DIR", common.REPO / "runs"))
    if (runs_root / run_name).exists():
        sys.exit(
            f"error: {runs_root / run_name} exists and its finished stages would be skipped: remove it or pass another --run_name"
        )
    text = str(common.corpus(smoke))
    orchestrator = common.REPO / "pipeline" / "run_all.py"
    if not smoke:
        commands = [
            [sys.executable, str(orchestrator), "--preset", "tiny", "--run_name", run_name, "--train_file", text]
        ]
    else:  # the stages that exist today, as a user would type them
        small = [*common.SMOKE_MODEL_FLAGS, "--max_steps", "6", "--eval_steps", "6", "--sample_max_new_tokens", "8"]
        commands = [
            [
                sys.executable,
                "tokenizer/train.py",
                "--preset",
                "tiny",
                "--run_name",
                run_name,
                "--train_file",
                text,
                "--overwrite",
            ],
            [
                sys.executable,
                "pipeline/pretrain.py",
                "--preset",
                "tiny",
                "--run_name",
                run_name,
                "--train_file",
                text,
                "--overwrite",
                *small,
            ],
        ]
    for command in commands:
        print("running:", " ".join(command[1:]), file=sys.stderr)
        proc = subprocess.run(
            command,
            cwd=common.REPO,
            env={**os.environ, "FLUXCHAT_RUNS_DIR": str(runs_root)},
            stdout=sys.stderr,
            stderr=sys.stderr,
        )
        if proc.returncode:
            sys.exit(f"error: {' '.join(command[1:3])} failed with exit code {proc.returncode}")
    return runs_root / run_name


def main() -> None:
    args = common.parser("pipeline_time", __doc__)
    args.add_argument("--run_dir", type=Path, help="A run folder (runs/<run_name>) to report on.")
    args.add_argument("--run", action="store_true", help="Launch the tiny end-to-end run first.")
    args.add_argument("--run_name", default="bench-pipeline")
    args = args.parse_args()
    if args.smoke:
        os.environ["FLUXCHAT_RUNS_DIR"] = tempfile.mkdtemp(prefix="bench-pipeline-")
        args.run = True
    if not args.run and args.run_dir is None:
        sys.exit("error: give --run_dir runs/<run_name> (a finished run) or --run (launch one)")
    started = time.time()
    run_dir = launch(args.run_name, args.smoke) if args.run else args.run_dir
    launched_seconds = round(time.time() - started, 1) if args.run else None
    rows = stage_rows(run_dir, started if args.run else None)
    common.print_table(f"Wall time per stage: {run_dir}", rows)
    common.write_results(
        args.output, "pipeline_time", rows, args.smoke, run_dir=str(run_dir), launched_wall_seconds=launched_seconds
    )


if __name__ == "__main__":
    run_cli(main)  # a usage error is one line, as in every command
