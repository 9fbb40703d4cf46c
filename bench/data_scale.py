"""Pretraining on a corpus 100x larger costs no more memory: token shards on disk, windows read from a memory map.

    python bench/data_scale.py                 # ~10 MB and ~1 GB corpora (the 1 GB one takes a while on 2 cores)
    python bench/data_scale.py --small_mb 10 --large_mb 200
    python bench/data_scale.py --smoke         # 0.2 MB and 2 MB: seconds

Each corpus is tinyshakespeare's lines, shuffled and repeated to the size asked, in a temporary folder.
For each corpus, the real `python pipeline/pretrain.py` (tiny preset, a few steps) runs twice in a fresh
process against an empty token cache, then again reusing it. Reported per run: the peak RSS of the
pretraining process (the kernel's high-water mark, its tokenizing threads included: ru_maxrss from wait4), the
seconds until its token data was ready (the "token cache:" line, counted from launch, imports included), and for the first run the tokenization throughput from the cache's manifest.
Aim (issue 13): peak memory of the large run within 100 MB of the small run's; the second run starts in seconds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

from fluxchat.cli import run_cli

STEPS_FLAGS = [
    "--max_steps",
    "20",
    "--eval_strategy",
    "no",
    "--save_strategy",
    "no",
    "--logging_steps",
    "10",
    "--sample_max_new_tokens",
    "4",
    "--sample_prompts",
    "ROMEO:",
]
# The same held-out text (~0.5 MB, ~800 blocks of the tiny preset) at both sizes: a fixed fraction gave the 10 MB
# corpus 8 blocks, fewer than one evaluation batch, and the 1 GB one ~800, so the final evaluation's full
# batches of logits (~130 MB) showed up as a memory gap that has nothing to do with the corpus size.
VALIDATION_MB = 0.5


def make_corpus(path: Path, megabytes: float, seed: int) -> Path:
    """tinyshakespeare's lines, shuffled, repeated until `megabytes` of text: written a pass at a time."""
    lines = common.SHAKESPEARE.read_text(encoding="utf-8").splitlines(keepends=True)
    rng = random.Random(seed)
    target, written = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            rng.shuffle(lines)
            block = "".join(lines)[: target - written]
            out.write(block)
            written += len(block.encode("utf-8"))
    return path


def run_pretrain(corpus: Path, megabytes: float, tokenizer_dir: Path, cache: Path, out: Path, smoke: bool) -> dict:
    """One `python pipeline/pretrain.py` in a fresh process: peak RSS, seconds until the data was ready, wall time."""
    cmd = [
        sys.executable,
        "pipeline/pretrain.py",
        "--preset",
        "tiny",
        "--train_file",
        str(corpus),
        "--tokenizer_name_or_path",
        str(tokenizer_dir),
        "--output_dir",
        str(out),
        "--overwrite",
        "--token_cache_dir",
        str(cache),
        "--validation_fraction",
        str(min(0.05, VALIDATION_MB / megabytes)),
        *STEPS_FLAGS,
        *(common.SMOKE_MODEL_FLAGS if smoke else []),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    process = subprocess.Popen(
        cmd, cwd=common.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    data_ready, lines = None, []
    for line in process.stdout:
        lines.append(line)
        if (
            line.startswith("token cache:")
            and data_ready is None
            and ("tokenized" in line or "rebuilding" not in line)
        ):
            data_ready = time.perf_counter() - start
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"pretrain.py failed:\n{''.join(lines[-30:])}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "peak_rss_MB": round(usage.ru_maxrss / 1024),
        "data_ready_s": round(data_ready, 1),
        "wall_s": round(wall, 1),
        "tokens_per_s": metrics.get("tokens_per_second"),
        "log": [line.strip() for line in lines if line.startswith("token cache:")],
    }


def main() -> None:
    p = common.parser("data_scale", __doc__)
    p.add_argument("--small_mb", type=float, default=10.0, help="Size of the small corpus.")
    p.add_argument("--large_mb", type=float, default=1000.0, help="Size of the large corpus.")
    p.add_argument(
        "--work", type=Path, default=None, help="Folder for corpora and caches (default: a temporary one, removed)."
    )
    args = p.parse_args()
    if args.smoke:
        args.small_mb, args.large_mb = 0.2, 2.0
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        tokenizer_dir = common.train_tokenizer(work / "tokenizer", "bpe", 1024, common.corpus(args.smoke))
        for label, megabytes in (("small", args.small_mb), ("large", args.large_mb)):
            corpus = make_corpus(work / f"{label}.txt", megabytes, seed=1)
            cache = work / f"cache-{label}"
            shutil.rmtree(cache, ignore_errors=True)
            first = run_pretrain(corpus, megabytes, tokenizer_dir, cache, work / f"out-{label}", args.smoke)
            (manifest_path,) = cache.glob("*/manifest.json")
            manifest = json.loads(manifest_path.read_text())
            second = run_pretrain(corpus, megabytes, tokenizer_dir, cache, work / f"out-{label}", args.smoke)
            assert not any("tokenized" in line for line in second["log"]), second["log"]  # the cache was reused
            text_mb = manifest["text_bytes"] / 1e6
            rows.append(
                {
                    "corpus": label,
                    "text_MB": round(text_mb, 1),
                    "train_tokens": manifest["files"]["train"]["tokens"],
                    "dtype": manifest["dtype"],
                    "shards_MB": round(sum(f.stat().st_size for f in manifest_path.parent.glob("*.bin")) / 1e6, 1),
                    "tokenize_s": manifest["seconds"],
                    "tokenize_MB_per_s": round(text_mb / max(manifest["seconds"], 1e-9), 2),
                    "tokenize_threads": manifest["threads"],
                    "first_peak_rss_MB": first["peak_rss_MB"],
                    "first_data_ready_s": first["data_ready_s"],
                    "second_peak_rss_MB": second["peak_rss_MB"],
                    "second_data_ready_s": second["data_ready_s"],
                    "train_tokens_per_s": second["tokens_per_s"],
                }
            )
            print(f"{label}: {rows[-1]}", file=sys.stderr)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    small, large = rows
    peak_gap = max(large["first_peak_rss_MB"], large["second_peak_rss_MB"]) - max(
        small["first_peak_rss_MB"], small["second_peak_rss_MB"]
    )
    summary = {"corpus": "large - small", "peak_rss_gap_MB": peak_gap, "within_100MB": peak_gap <= 100}
    rows.append(summary)
    common.print_table("Pretraining data at scale (token shards)", rows)
    common.write_results(args.output, "data_scale", rows, args.smoke, cores=os.cpu_count())


if __name__ == "__main__":
    run_cli(main)  # a usage error is one line, as in every command
