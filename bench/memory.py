"""Peak memory (RSS) of pretraining: the tiny preset and a ~0.5M-parameter model, each in a fresh process.

    python bench/memory.py                # 40 steps each (issue 6 aim: <= 0.6 GB)
    python bench/memory.py --steps 100
    python bench/memory.py --smoke

Each model trains through the real pipeline/pretrain.py main() in its own subprocess, so one run's
allocations do not hide the other's; peak RSS is the kernel's high-water mark (getrusage ru_maxrss),
reported next to the RSS after imports and data loading (what Python + torch + transformers cost before
the first step).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import common

from fluxchat.cli import run_cli

MODELS = {
    "tiny preset": [],
    "0.5M params": ["--n_layer", "2", "--n_embd", "128", "--n_head", "4"],
}


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def child(flags: list[str]) -> None:
    """Runs in the subprocess: train, then print one JSON line with the memory figures."""
    import contextlib

    from transformers import TrainerCallback

    from pipeline import pretrain

    seen = {}

    class FirstStep(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["rss_before_training_mb"] = current_rss_mb()
            seen["parameters"] = sum(p.numel() for p in model.parameters())

    seen["rss_after_imports_mb"] = current_rss_mb()
    with common.trainer_callbacks(FirstStep()), contextlib.redirect_stdout(sys.stderr):
        pretrain.main(flags)
    print(json.dumps({**seen, "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    args = common.parser("memory", __doc__)
    args.add_argument("--steps", type=int, default=40)
    args.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # the subprocess side
    args = args.parse_args()
    if args.child is not None:
        common.set_threads(args.threads)
        return child(args.child)
    steps = 4 if args.smoke else args.steps
    text = common.corpus(args.smoke)
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    tokenizer_dir = common.train_tokenizer(work / "tokenizer", "bpe", 1024, text)
    rows = []
    models = dict(list(MODELS.items())[:1]) if args.smoke else MODELS  # smoke: one fresh process is enough
    for name, model_flags in models.items():
        flags = [
            "--preset",
            "tiny",
            "--train_file",
            str(text),
            "--tokenizer_name_or_path",
            str(tokenizer_dir),
            "--output_dir",
            str(work / name.replace(" ", "-")),
            "--max_steps",
            str(steps),
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--sample_max_new_tokens",
            "8",
            *model_flags,
            *(common.SMOKE_MODEL_FLAGS if args.smoke else []),
        ]
        threads = ["--threads", str(args.threads)] if args.threads else []
        proc = subprocess.run([sys.executable, __file__, *threads, "--child", *flags], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{name}: training failed:\n{proc.stderr[-3000:]}")
        figures = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "model": name,
                "params_M": round(figures["parameters"] / 1e6, 3),
                "steps": steps,
                "rss_after_imports_MB": round(figures["rss_after_imports_mb"]),
                "rss_before_training_MB": round(figures["rss_before_training_mb"]),
                "peak_rss_MB": round(figures["peak_rss_mb"]),
                "peak_rss_GB": round(figures["peak_rss_mb"] / 1024, 3),
            }
        )
    common.print_table("Peak memory while pretraining (fresh process each)", rows)
    common.write_results(args.output, "memory", rows, args.smoke)


if __name__ == "__main__":
    run_cli(main)  # a usage error is one line, as in every command
