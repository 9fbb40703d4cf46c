"""Tune the tiny preset at a fixed step budget (wall clock on a shared machine is unreliable).

    python bench/tune_tiny.py probe  NAME --tokenizer DIR [pretrain flags...]   # ~20-step tokens/s
    python bench/tune_tiny.py train  NAME --tokenizer DIR --steps N [pretrain flags...]
    python bench/tune_tiny.py table                                             # the trials as a Markdown table

Each trial runs the real `pipeline/pretrain.py` (defaults from configs/tiny/pretrain.yaml, the flags
given override them) on tinyshakespeare, with one evaluation at the end, and appends a JSON line to
bench/results/tuning_trials.jsonl: name, flags, steps, tokens/s, val bits per byte.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SHAKESPEARE

REPO = Path(__file__).resolve().parent.parent
TRIALS = REPO / "bench" / "results" / "tuning_trials.jsonl"


def run_trial(mode: str, name: str, tokenizer: str, steps: int, flags: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"tune-{name}-"))
    common = [
        "--preset",
        "tiny",
        "--train_file",
        str(SHAKESPEARE),
        "--tokenizer_name_or_path",
        tokenizer,
        "--output_dir",
        str(out),
        "--overwrite",
        "--save_strategy",
        "no",
        "--sample_prompts",
        "ROMEO:",
    ]
    if mode == "probe":
        common += ["--max_steps", str(steps), "--eval_strategy", "no", "--logging_steps", str(steps)]
    else:
        common += ["--max_steps", str(steps), "--eval_steps", str(steps), "--logging_steps", "100"]
    start = time.time()
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipeline" / "pretrain.py"), *common, *flags],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if proc.returncode:
        print(proc.stdout[-2000:], proc.stderr[-3000:])
        raise SystemExit(f"trial {name} failed")
    metrics = json.loads((out / "metrics.json").read_text())
    record = {
        "name": name,
        "mode": mode,
        "tokenizer": Path(tokenizer).name,
        "flags": " ".join(flags),
        "steps": steps,
        "parameters": metrics["parameters"],
        "tokens_per_second": metrics["tokens_per_second"],
        "train_wall_seconds": metrics["train_wall_seconds"],
        "eval_bits_per_byte": metrics.get("eval_bits_per_byte"),
        "eval_loss": metrics.get("eval_loss"),
        "wall_seconds": round(time.time() - start, 1),
        "load_average": round(os.getloadavg()[0], 2),
    }
    TRIALS.parent.mkdir(parents=True, exist_ok=True)
    with TRIALS.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))
    return record


def markdown_table() -> str:
    lines = [
        "| trial | mode | tokenizer | flags (over configs/tiny) | params | steps | tokens/s (contended) | val bits/byte |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for line in TRIALS.read_text().splitlines():
        r = json.loads(line)
        bpb = "" if r["mode"] == "probe" else f"{r['eval_bits_per_byte']:.4f}"
        lines.append(
            f"| {r['name']} | {r['mode']} | {r['tokenizer']} | {r['flags'] or '-'} | {r['parameters'] / 1e6:.2f}M | "
            f"{r['steps']} | {r['tokens_per_second']:,.0f} (load {r['load_average']}) | {bpb} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["table"]:
        raise SystemExit(print(markdown_table()))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["probe", "train"])
    parser.add_argument("name")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--steps", type=int, default=20)
    known, rest = parser.parse_known_args()
    run_trial(known.mode, known.name, known.tokenizer, known.steps, rest)
