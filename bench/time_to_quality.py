"""Time to quality: val bits per character on tinyshakespeare's last 10% after a wall-clock budget.

    python bench/time_to_quality.py                  # tiny preset, 300 s budget (issue 6 aim: <= 2.30)
    python bench/time_to_quality.py --budget 120 --threads 2
    python bench/time_to_quality.py --smoke

Trains the tokenizer (configs/tiny/tokenizer.yaml) and the model (configs/tiny/pretrain.yaml) through the
real tokenizer/train.py and pipeline/pretrain.py. The preset's max_steps is sized for ~5 minutes on a quiet
2-core machine, so the schedule normally completes; a callback stops training at the budget otherwise
(then the cosine schedule has not decayed, and the table says so). Evaluation time counts in the budget.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path

import common

from fluxchat.cli import run_cli

SMOKE_FLAGS = [
    *common.SMOKE_MODEL_FLAGS,
    "--max_steps",
    "12",
    "--warmup_steps",
    "2",
    "--logging_steps",
    "4",
    "--eval_steps",
    "12",
    "--sample_max_new_tokens",
    "8",
]


def wall_clock_stop(budget_seconds: float):
    from transformers import TrainerCallback

    class WallClockStop(TrainerCallback):
        def __init__(self):
            self.start = None
            self.stopped_early = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - self.start >= budget_seconds and state.global_step < state.max_steps:
                control.should_training_stop = True
                self.stopped_early = True

    return WallClockStop()


def main() -> None:
    args = common.parser("time_to_quality", __doc__)
    args.add_argument("--budget", type=float, default=300.0, help="Training wall-clock seconds.")
    args.add_argument("extra", nargs="*", help="More pretrain.py flags after `--`, e.g. -- --max_steps 500.")
    args = args.parse_args()
    threads = common.set_threads(args.threads)
    budget = 5.0 if args.smoke else args.budget
    text = common.corpus(args.smoke)
    work = Path(tempfile.mkdtemp(prefix="bench-ttq-"))

    from fluxchat.data import load_text
    from pipeline import pretrain
    from tokenizer import train

    with contextlib.redirect_stdout(sys.stderr):
        tokenizer_dir = train.main(
            ["--preset", "tiny", "--train_file", str(text), "--output_dir", str(work / "tokenizer")]
        )
    stop = wall_clock_stop(budget)
    argv = [
        "--preset",
        "tiny",
        "--train_file",
        str(text),
        "--tokenizer_name_or_path",
        str(tokenizer_dir),
        "--output_dir",
        str(work / "pretrain"),
        *(SMOKE_FLAGS if args.smoke else []),
        *args.extra,
    ]
    start = time.perf_counter()
    with common.trainer_callbacks(stop), contextlib.redirect_stdout(sys.stderr):
        out = pretrain.main(argv)
    wall = time.perf_counter() - start
    import json

    import yaml

    metrics = json.loads((out / "metrics.json").read_text())
    planned_steps = yaml.safe_load((out / "config.yaml").read_text())["max_steps"]
    _, val_docs = load_text([str(text)], None, "text", 0.1)
    bytes_per_char = sum(len(d.encode("utf-8")) for d in val_docs) / sum(len(d) for d in val_docs)
    row = {
        "budget_s": budget,
        "params_M": round(metrics["parameters"] / 1e6, 3),
        "steps": metrics["global_step"],
        "planned_steps": planned_steps,
        "stopped_by_budget": stop.stopped_early,
        "train_s": metrics["train_wall_seconds"],
        "tokens_per_s": metrics["tokens_per_second"],
        "val_bits_per_byte": round(metrics["eval_bits_per_byte"], 4),
        "val_bits_per_char": round(metrics["eval_bits_per_byte"] * bytes_per_char, 4),
        "wall_s_incl_setup": round(wall, 1),
    }
    common.print_table(f"Time to quality: tiny preset, {budget:.0f} s budget, {threads} threads", [row])
    common.write_results(args.output, "time_to_quality", [row], args.smoke, threads=threads, extra_flags=args.extra)


if __name__ == "__main__":
    run_cli(main)  # a usage error is one line, as in every command
